package tarball

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// treeOf lists a folder: every entry's name, kind and mode, content and
// link target.
func treeOf(t *testing.T, root string) string {
	t.Helper()
	var lines []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		info, err := d.Info()
		if err != nil {
			return err
		}
		content := ""
		if info.Mode().IsRegular() {
			b, _ := os.ReadFile(p)
			content = string(b)
		}
		link, _ := os.Readlink(p)
		lines = append(lines, rel+"|"+info.Mode().String()+"|"+content+"|"+link)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return strings.Join(lines, "\n")
}

// TestLiveArchiveCatchesEveryChange: a live archive, extracted as a
// snapshot, is the folder as it was at the catch-up, whatever changed after
// the first pass: contents, entries that came and went, entries that became
// another kind, modes, a folder swapped for a link into the folder.
func TestLiveArchiveCatchesEveryChange(t *testing.T) {
	t.Run("stamps and recent changes", func(t *testing.T) { liveArchiveCase(t, false) })
	// Every file of the test is recent, so RecentWindow alone would read
	// them all again: here only what the stamps tell counts.
	t.Run("stamps only", func(t *testing.T) { liveArchiveCase(t, true) })
}

func liveArchiveCase(t *testing.T, stampsOnly bool) {
	src, dst := t.TempDir(), filepath.Join(t.TempDir(), "extracted")
	put := func(name, content string) {
		t.Helper()
		p := filepath.Join(src, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	put("same.txt", "unchanged")
	put("rewritten.txt", "aaaa")
	put("gone.txt", "deleted later")
	put("dir/gone/x", "a folder deleted later")
	put("dir/gone/sub/y", "and what it held")
	put("becomes-dir", "a file, then a folder")
	put("becomes-file/z", "a folder, then a file")
	put("renamed-from", "moved")
	put("real/SECRET", "kept")
	put("swapped/SECRET", "a folder, then a link to real/")
	put("becomes-fifo", "a file, then a pipe")
	put("modes/f", "in a folder whose mode changes")
	os.Symlink("same.txt", filepath.Join(src, "link"))
	os.Symlink("same.txt", filepath.Join(src, "link-becomes-file"))

	var archive bytes.Buffer
	la, err := NewLiveArchive(&archive, src, Gzip)
	if err != nil {
		t.Fatal(err)
	}
	if err := la.FirstPass(); err != nil {
		t.Fatal(err)
	}
	if stampsOnly {
		la.recent = math.MaxInt64
	}
	// Changes made while the first pass ran, or after it.
	put("rewritten.txt", "bbbb") // same size
	put("new/file.txt", "new")
	os.Remove(filepath.Join(src, "gone.txt"))
	os.RemoveAll(filepath.Join(src, "dir", "gone"))
	os.Remove(filepath.Join(src, "link"))
	os.Symlink("new/file.txt", filepath.Join(src, "link"))
	os.Remove(filepath.Join(src, "becomes-dir"))
	put("becomes-dir/inside", "now a folder")
	os.RemoveAll(filepath.Join(src, "becomes-file"))
	put("becomes-file", "now a file")
	os.Rename(filepath.Join(src, "renamed-from"), filepath.Join(src, "renamed-to"))
	os.Remove(filepath.Join(src, "link-becomes-file"))
	put("link-becomes-file", "not a link any more")
	os.Chmod(filepath.Join(src, "same.txt"), 0o600)
	os.Chmod(filepath.Join(src, "modes"), 0o700)
	os.RemoveAll(filepath.Join(src, "swapped"))
	os.Symlink("real", filepath.Join(src, "swapped"))
	os.Remove(filepath.Join(src, "becomes-fifo"))
	if err := syscall.Mkfifo(filepath.Join(src, "becomes-fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := la.CatchUp(); err != nil {
		t.Fatal(err)
	}
	if err := la.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Extract(&archive, dst, Options{Folder: "volume", Snapshot: true}); err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(src, "becomes-fifo")) // not data: not archived
	if got, want := treeOf(t, dst), treeOf(t, src); got != want {
		t.Fatalf("extracted:\n%s\nsource:\n%s", got, want)
	}
}

// TestLiveArchiveReadsRecentChangesAgain: a write through a shared mapping
// to a page already dirty moves no timestamp; the catch-up reads again
// every file changed within RecentWindow, so it is not missed.
func TestLiveArchiveReadsRecentChangesAgain(t *testing.T) {
	src, dst := t.TempDir(), filepath.Join(t.TempDir(), "extracted")
	p := filepath.Join(src, "mapped")
	if err := os.WriteFile(p, bytes.Repeat([]byte("1"), 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	mem, err := syscall.Mmap(int(f.Fd()), 0, 4096, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Munmap(mem)
	mem[0] = '2' // the page is dirty from here on
	var archive bytes.Buffer
	la, err := NewLiveArchive(&archive, src, Gzip)
	if err != nil {
		t.Fatal(err)
	}
	if err := la.FirstPass(); err != nil {
		t.Fatal(err)
	}
	mem[0] = '3' // no fault, so perhaps no timestamp
	if err := la.CatchUp(); err != nil {
		t.Fatal(err)
	}
	if err := la.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Extract(&archive, dst, Options{Snapshot: true}); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(dst, "mapped")); len(b) == 0 || b[0] != '3' {
		t.Fatalf("the archive holds %q…, the file %q…", b[:1], mem[:1])
	}
}

// TestSnapshotDeletionGoesThroughNoLink: a deletion of a path whose folder
// is now a link deletes nothing behind the link.
func TestSnapshotDeletionGoesThroughNoLink(t *testing.T) {
	dst := t.TempDir()
	data := archive(t, dir("real/"), file("real/SECRET", "kept"), symlink("y", "real"), deleted("y/SECRET"))
	if err := Extract(bytes.NewReader(data), dst, Options{Snapshot: true}); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(dst, "real", "SECRET")); err != nil || string(b) != "kept" {
		t.Fatalf("real/SECRET: %q %v", b, err)
	}
}

// TestStampsAgree: the catch-up pass's stamp (fstatat) of an unchanged
// entry is the first pass's (fstat of what was written), or every entry
// would be written twice.
func TestStampsAgree(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "f"), []byte("x"), 0o640); err != nil {
		t.Fatal(err)
	}
	os.Mkdir(filepath.Join(dir, "d"), 0o750)
	os.Symlink("f", filepath.Join(dir, "l"))
	for _, name := range []string{"f", "d", "l"} {
		info, err := os.Lstat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		var sys unix.Stat_t
		if err := unix.Fstatat(unix.AT_FDCWD, filepath.Join(dir, name), &sys, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			t.Fatal(err)
		}
		if a, b := stampOf(info), stamp(sys.Mode, sys.Size, sys.Mtim.Nano(), sys.Ctim.Nano(), sys.Ino); a != b {
			t.Errorf("%s: %+v against %+v", name, a, b)
		}
	}
}

// TestWalkEntersNoSwappedFolder: a folder swapped for a link while the
// first pass runs is written as the link and not entered (what it leads to
// stays out of the archive), and one swapped for another folder between
// being written and being entered is not entered either.
func TestWalkEntersNoSwappedFolder(t *testing.T) {
	src, outside := t.TempDir(), t.TempDir()
	const marker = "bytes of a file outside the folder"
	if err := os.WriteFile(filepath.Join(outside, "MARKER"), []byte(marker), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"a", "b", "c"} {
		if err := os.MkdirAll(filepath.Join(src, d), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(src, d, "old"), []byte("old"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var buf bytes.Buffer
	w, err := NewWriter(&buf, Gzip)
	if err != nil {
		t.Fatal(err)
	}
	err = w.addTree(src, func(rel string, info fs.FileInfo) {
		switch rel {
		case "a": // b is listed already, not yet looked at
			os.RemoveAll(filepath.Join(src, "b"))
			os.Symlink(outside, filepath.Join(src, "b"))
		case "c": // written as a folder, swapped before it is entered
			os.Rename(filepath.Join(src, "c"), filepath.Join(src, "c-old"))
			os.Mkdir(filepath.Join(src, "c"), 0o755)
			os.WriteFile(filepath.Join(src, "c", "new"), []byte("new"), 0o644)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(&buf)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	var entries []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(tr)
		if strings.Contains(string(body), marker) {
			t.Fatalf("%s holds what the swapped link leads to", h.Name)
		}
		entries = append(entries, h.Name+"->"+h.Linkname)
	}
	want := "a/->|a/old->|b->" + outside + "|c/->"
	if got := strings.Join(entries, "|"); got != want {
		t.Fatalf("entries %s, want %s", got, want)
	}
}
