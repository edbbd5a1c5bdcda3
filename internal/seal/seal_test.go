package seal

import (
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
	for _, plain := range []string{"", "hunter2", strings.Repeat("x", 10000), "ünïcödé"} {
		s := b.Seal(plain)
		if plain != "" && (!IsSealed(s) || strings.Contains(s, plain)) {
			t.Fatalf("seal(%q) = %q", plain, s)
		}
		got, err := b.Open(s)
		if err != nil || got != plain {
			t.Fatalf("open: %q %v", got, err)
		}
	}
	if first, second := b.Seal("same"), b.Seal("same"); first == second {
		t.Fatal("sealing is deterministic (no nonce)")
	}
	other, _ := New(NewKey())
	if _, err := other.Open(b.Seal("x")); err == nil {
		t.Fatal("opened with another key")
	}
	if _, err := b.Open("plain"); !errors.Is(err, ErrNotSealed) {
		t.Fatalf("plain value: %v", err)
	}
	if _, err := b.Open(prefix + "!!!"); err == nil {
		t.Fatal("malformed value opened")
	}
	if _, err := New([]byte("short")); err == nil {
		t.Fatal("short key accepted")
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
	f.Add(b.Seal("secret"))
	f.Add(prefix)
	f.Fuzz(func(t *testing.T, s string) { _, _ = b.Open(s) })
}
