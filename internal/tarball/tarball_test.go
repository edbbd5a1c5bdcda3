package tarball

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestRoundTrip(t *testing.T) {
	src := t.TempDir()
	os.MkdirAll(filepath.Join(src, "a", "b"), 0o750)
	os.WriteFile(filepath.Join(src, "a", "b", "f.txt"), []byte("content"), 0o640)
	old := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	os.Chtimes(filepath.Join(src, "a", "b", "f.txt"), old, old)
	os.Symlink("/elsewhere/outside", filepath.Join(src, "link"))
	var buf bytes.Buffer
	if err := Write(&buf, src); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "out")
	if err := Extract(bytes.NewReader(buf.Bytes()), dst, Options{}); err != nil {
		t.Fatal(err)
	}
	info, err := os.Stat(filepath.Join(dst, "a", "b", "f.txt"))
	if err != nil || info.Mode().Perm() != 0o640 || !info.ModTime().Equal(old) {
		t.Fatalf("file: %v %v", info, err)
	}
	if b, _ := os.ReadFile(filepath.Join(dst, "a", "b", "f.txt")); string(b) != "content" {
		t.Fatalf("content %q", b)
	}
	if d, _ := os.Stat(filepath.Join(dst, "a")); d.Mode().Perm() != 0o750 {
		t.Fatalf("folder mode %v", d.Mode())
	}
	if l, _ := os.Readlink(filepath.Join(dst, "link")); l != "/elsewhere/outside" {
		t.Fatalf("link %q", l)
	}
	// Confined, the same archive is refused for its link.
	err = Extract(bytes.NewReader(buf.Bytes()), t.TempDir(), Options{ConfineLinks: true, Folder: "kit folder"})
	if err == nil || !strings.Contains(err.Error(), "points outside the kit folder") {
		t.Fatalf("confined: %v", err)
	}
}

func TestExtractRefusesEscapes(t *testing.T) {
	for _, name := range []string{"../evil", "/abs/evil", "a/../../evil"} {
		var buf bytes.Buffer
		gz := gzip.NewWriter(&buf)
		tw := tar.NewWriter(gz)
		tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: 1, Typeflag: tar.TypeReg})
		tw.Write([]byte("x"))
		tw.Close()
		gz.Close()
		dir := t.TempDir()
		if err := Extract(&buf, dir, Options{}); err == nil || !strings.Contains(err.Error(), "leaves the folder") {
			t.Errorf("%s: %v", name, err)
		}
	}
	if err := Extract(strings.NewReader("not gzip"), t.TempDir(), Options{}); err == nil || !strings.Contains(err.Error(), "not a gzip archive") {
		t.Fatal(err)
	}
}
