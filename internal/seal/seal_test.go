package seal

import (
	"encoding/base64"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestSealOpen(t *testing.T) {
	b, err := New(NewKey())
	if err != nil {
		t.Fatal(err)
	}
	const here = "fm_secrets/in-a/adminAPIKey"
	for _, plain := range []string{"", "hunter2", strings.Repeat("x", 10000), "ünïcödé"} {
		s := b.Seal(plain, here)
		if plain != "" && (!IsSealed(s) || strings.Contains(s, plain)) {
			t.Fatalf("seal(%q) = %q", plain, s)
		}
		got, err := b.Open(s, here)
		if err != nil || got != plain {
			t.Fatalf("open: %q %v", got, err)
		}
	}
	if first, second := b.Seal("same", here), b.Seal("same", here); first == second {
		t.Fatal("sealing is deterministic (no nonce)")
	}
	other, _ := New(NewKey())
	if _, err := other.Open(b.Seal("x", here), here); err == nil {
		t.Fatal("opened with another key")
	}
	if _, err := b.Open("plain", here); !errors.Is(err, ErrNotSealed) {
		t.Fatalf("plain value: %v", err)
	}
	if _, err := b.Open(prefix+"!!!", here); err == nil {
		t.Fatal("malformed value opened")
	}
	if _, err := New([]byte("short")); err == nil {
		t.Fatal("short key accepted")
	}
}

// TestASealedValueOpensOnlyWhereItBelongs: a value moved to another object
// or field does not open; one sealed before values were bound opens
// anywhere (FM seals it bound at its next write).
func TestASealedValueOpensOnlyWhereItBelongs(t *testing.T) {
	b, _ := New(NewKey())
	s := b.Seal("the admin key of in-a", "fm_secrets/in-a/adminAPIKey")
	for _, elsewhere := range []string{"fm_secrets/in-b/adminAPIKey", "fm_secrets/in-a/initialPassword", "", "fm_secrets/in-a/adminAPIKey "} {
		if got, err := b.Open(s, elsewhere); err == nil {
			t.Errorf("opened for %q: %q", elsewhere, got)
		}
	}
	// A value of before the binding: AES-GCM without associated data.
	nonce := make([]byte, b.aead.NonceSize())
	v1 := prefixV1 + base64.RawStdEncoding.EncodeToString(b.aead.Seal(nonce, nonce, []byte("old"), nil))
	if !IsSealed(v1) {
		t.Fatal("a value sealed before the binding is not seen as sealed")
	}
	if got, err := b.Open(v1, "anywhere"); err != nil || got != "old" {
		t.Fatalf("a value sealed before the binding: %q %v", got, err)
	}
}

func TestKeyFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "k", "secrets.key")
	k1, err := LoadOrCreateKey(p)
	if err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(p)
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v", st.Mode())
	}
	k2, err := LoadOrCreateKey(p)
	if err != nil || string(k1) != string(k2) {
		t.Fatal("the key changed on reload")
	}
	os.WriteFile(p, []byte("garbage"), 0o600)
	if _, err := LoadOrCreateKey(p); err == nil {
		t.Fatal("a garbage key file was accepted")
	}
}

func FuzzOpen(f *testing.F) {
	b, _ := New(NewKey())
	f.Add(b.Seal("secret", "here"))
	f.Add(prefix)
	f.Fuzz(func(t *testing.T, s string) { _, _ = b.Open(s, "here") })
}
