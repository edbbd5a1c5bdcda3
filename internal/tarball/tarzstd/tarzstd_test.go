package tarzstd

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fleetmanager/fm/internal/tarball"
)

func TestRoundTrip(t *testing.T) {
	src := t.TempDir()
	if err := os.MkdirAll(filepath.Join(src, "a"), 0o750); err != nil {
		t.Fatal(err)
	}
	content := strings.Repeat("DSS data ", 100000)
	if err := os.WriteFile(filepath.Join(src, "a", "f"), []byte(content), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("a/f", filepath.Join(src, "l")); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := tarball.Write(&buf, src, Codec); err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(buf.Bytes(), Codec.Magic) || buf.Len() > len(content)/10 {
		t.Fatalf("%d bytes starting %x: not zstd, or not compressed", buf.Len(), buf.Bytes()[:4])
	}
	dst := t.TempDir()
	if err := tarball.Extract(&buf, dst, tarball.Options{Codecs: []tarball.Codec{Codec}}); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(dst, "a", "f"))
	if err != nil || string(got) != content {
		t.Fatalf("extracted %d bytes, %v", len(got), err)
	}
	if l, _ := os.Readlink(filepath.Join(dst, "l")); l != "a/f" {
		t.Fatalf("link %q", l)
	}
}

func TestDamagedFrames(t *testing.T) {
	for _, tc := range []struct{ name, data, want string }{
		{"a frame cut short", "\x28\xb5\x2f\xfd\x00", "read archive"},
		// A frame header asking for a 2 GiB window (exponent 21: 2^31).
		{"a window past the bound", "\x28\xb5\x2f\xfd\x00\xa8", "window"},
	} {
		err := tarball.Extract(strings.NewReader(tc.data), t.TempDir(), tarball.Options{Codecs: []tarball.Codec{Codec}})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
}
