package tarball

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestRoundTrip(t *testing.T) {
	roundTrip(t, Gzip)
}

// roundTrip writes a folder with c and extracts it: the same files, modes,
// times and links.
func roundTrip(t *testing.T, c Codec) {
	src := t.TempDir()
	os.MkdirAll(filepath.Join(src, "a", "b"), 0o750)
	os.WriteFile(filepath.Join(src, "a", "b", "f.txt"), []byte("content"), 0o640)
	old := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	os.Chtimes(filepath.Join(src, "a", "b", "f.txt"), old, old)
	os.Symlink("/elsewhere/outside", filepath.Join(src, "link"))
	var buf bytes.Buffer
	if err := Write(&buf, src, c); err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(buf.Bytes(), c.Magic) {
		t.Fatalf("%s archive starts with %x", c.Name, buf.Bytes()[:4])
	}
	dst := filepath.Join(t.TempDir(), "out")
	if err := Extract(bytes.NewReader(buf.Bytes()), dst, Options{Codecs: []Codec{c}}); err != nil {
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
	err = Extract(bytes.NewReader(buf.Bytes()), t.TempDir(), Options{ConfineLinks: true, Folder: "kit folder", Codecs: []Codec{c}})
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
	for _, tc := range []struct{ name, data, want string }{
		{"not gzip", "not gzip", "not a gzip archive"},
		{"empty", "", "not a gzip archive"},
		{"a gzip header cut short", "\x1f\x8b\x08", "not a gzip archive"},
	} {
		err := Extract(strings.NewReader(tc.data), t.TempDir(), Options{})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
	// Another codec is read only when asked for.
	plain := Codec{Name: "plain", Ext: ".tar.plain", Magic: []byte("PLAIN"),
		NewWriter: func(w io.Writer) (io.WriteCloser, error) {
			if _, err := w.Write([]byte("PLAIN")); err != nil {
				return nil, err
			}
			return nopCloser{w}, nil
		},
		NewReader: func(r io.Reader) (io.Reader, func(), error) {
			_, err := io.ReadFull(r, make([]byte, 5))
			return r, func() {}, err
		}}
	var buf bytes.Buffer
	if err := Write(&buf, t.TempDir(), plain); err != nil {
		t.Fatal(err)
	}
	if err := Extract(bytes.NewReader(buf.Bytes()), t.TempDir(), Options{}); err == nil || !strings.Contains(err.Error(), "not a gzip archive") {
		t.Errorf("a codec not asked for: %v", err)
	}
	if err := Extract(bytes.NewReader(buf.Bytes()), t.TempDir(), Options{Codecs: []Codec{plain}}); err != nil {
		t.Errorf("a codec asked for: %v", err)
	}
	// Codecs replace gzip: a gzipped archive where another is asked for is
	// refused, whatever it holds.
	var gz bytes.Buffer
	if err := Write(&gz, t.TempDir(), Gzip); err != nil {
		t.Fatal(err)
	}
	if err := Extract(&gz, t.TempDir(), Options{Codecs: []Codec{plain}}); err == nil || !strings.Contains(err.Error(), "not a plain archive") {
		t.Errorf("gzip where plain is asked for: %v", err)
	}
	if err := Extract(strings.NewReader("neither"), t.TempDir(), Options{Codecs: []Codec{Gzip, plain}}); err == nil || !strings.Contains(err.Error(), "not a gzip or plain archive") {
		t.Errorf("neither codec: %v", err)
	}
}

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }

// entry is one member of a hand-made archive.
type entry struct {
	typ        byte
	name, link string
	body       string
	deleted    bool // a Writer.Deleted entry
}

func file(name, body string) entry   { return entry{typ: tar.TypeReg, name: name, body: body} }
func dir(name string) entry          { return entry{typ: tar.TypeDir, name: name} }
func symlink(name, to string) entry  { return entry{typ: tar.TypeSymlink, name: name, link: to} }
func hardlink(name, to string) entry { return entry{typ: tar.TypeLink, name: name, link: to} }
func deleted(name string) entry      { return entry{typ: tar.TypeReg, name: name, deleted: true} }

// archive is a gzipped tar of entries, in order, as a hostile sender would
// write it.
func archive(t *testing.T, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	for _, e := range entries {
		h := &tar.Header{Typeflag: e.typ, Name: e.name, Linkname: e.link, Mode: 0o644, Size: int64(len(e.body))}
		if e.typ == tar.TypeDir {
			h.Mode = 0o755
		}
		if e.deleted {
			h.PAXRecords, h.Format = map[string]string{deletedKey: "1"}, tar.FormatPAX
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(e.body)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := gz.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// outsideOf lists what lies under top but not under dst: the only paths an
// extraction into dst must leave as they were.
func outsideOf(t *testing.T, top, dst string) map[string]string {
	t.Helper()
	found := map[string]string{}
	err := filepath.WalkDir(top, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if path == dst {
			return filepath.SkipDir
		}
		rel, _ := filepath.Rel(top, path)
		switch {
		case d.Type()&fs.ModeSymlink != 0:
			l, _ := os.Readlink(path)
			found[rel] = "link to " + l
		case d.Type().IsRegular():
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			found[rel] = "file " + string(b)
		default:
			found[rel] = d.Type().String()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return found
}

// TestExtractConfinesHostileArchives: whatever an archive holds, in
// whatever order, extraction creates or changes nothing outside the folder.
// Each archive is refused; hard links, which Extract skips, create nothing.
func TestExtractConfinesHostileArchives(t *testing.T) {
	tests := []struct {
		name string
		// entries are made for a destination top/p/d, beside the file
		// top/p/victim.
		entries func(top string) []entry
		confine bool
		wantErr string // "" when the archive is accepted
	}{
		{"absolute name", func(top string) []entry {
			return []entry{file(filepath.Join(top, "p", "evil"), "x")}
		}, false, "leaves the folder"},
		{"dot-dot name", func(string) []entry { return []entry{file("../evil", "x")} }, false, "leaves the folder"},
		{"dot-dot inside a name", func(string) []entry { return []entry{file("a/../../evil", "x")} }, false, "leaves the folder"},
		{"dot-dot folder", func(string) []entry { return []entry{dir("../evil/")} }, false, "leaves the folder"},
		{"symlink chain, then a file through it, confined", func(string) []entry {
			return []entry{symlink("a", "."), symlink("b", "a/.."), file("b/evil", "x")}
		}, true, "points outside"},
		{"symlink chain, then a file through it", func(string) []entry {
			return []entry{symlink("a", "."), symlink("b", "a/.."), file("b/evil", "x")}
		}, false, "leads outside the folder through a link"},
		{"symlink chain made in reverse order, confined", func(string) []entry {
			return []entry{symlink("b", "a/.."), symlink("a", ".")}
		}, true, "points outside"},
		{"symlink made through a symlink, confined", func(string) []entry {
			return []entry{symlink("d", "."), symlink("d/l", "../victim"), file("l", "pwned")}
		}, true, "points outside"},
		{"absolute symlink, confined", func(top string) []entry {
			return []entry{symlink("l", filepath.Join(top, "p", "victim"))}
		}, true, "points outside"},
		// A later entry replaces the link rather than writing through it.
		{"absolute symlink, then a file of its name", func(top string) []entry {
			return []entry{symlink("l", filepath.Join(top, "p", "victim")), file("l", "pwned")}
		}, false, ""},
		{"absolute symlink to a folder, then a file through it", func(top string) []entry {
			return []entry{symlink("l", filepath.Join(top, "p")), file("l/evil", "x")}
		}, false, "leads outside the folder through a link"},
		{"relative symlink out, then a file through it", func(string) []entry {
			return []entry{symlink("l", ".."), file("l/evil", "x")}
		}, false, "leads outside the folder through a link"},
		{"relative symlink out, then a folder through it", func(string) []entry {
			return []entry{symlink("l", "../"), dir("l/sub/")}
		}, false, "leads outside the folder through a link"},
		{"hard link out, then a file of its name", func(string) []entry {
			return []entry{hardlink("h", "../victim"), file("h", "inside")}
		}, false, ""},
		{"absolute hard link, then a file of its name", func(top string) []entry {
			return []entry{hardlink("h", filepath.Join(top, "p", "victim")), file("h", "inside")}
		}, false, ""},
		{"a loop of links, confined", func(string) []entry {
			return []entry{symlink("l1", "l2"), symlink("l2", "l1")}
		}, true, "too many levels of symbolic links"},
		{"a file, then a folder of its name", func(string) []entry {
			return []entry{file("x", "x"), dir("x/"), file("x/evil", "x")}
		}, false, ""},
		{"a folder, then a file of its name", func(string) []entry {
			return []entry{dir("x/"), file("x/in", "x"), file("x", "x")}
		}, false, ""},
		{"a deletion out of the folder", func(string) []entry { return []entry{deleted("../victim")} }, false, "leaves the folder"},
		{"a deletion in what is not a snapshot", func(string) []entry { return []entry{file("a", "x"), deleted("a")} }, false, "only FM's snapshots may"},
		// In a snapshot, a deletion goes through no link: there is no entry
		// of that path, so nothing is deleted.
		{"a deletion through a symlink out, in a snapshot", func(string) []entry {
			return []entry{symlink("l", ".."), deleted("l/victim")}
		}, false, ""},
		{"a deletion through an absolute symlink, in a snapshot", func(top string) []entry {
			return []entry{symlink("l", filepath.Join(top, "p")), deleted("l/victim")}
		}, false, ""},
		{"a deletion of the folder itself, in a snapshot", func(string) []entry { return []entry{file("a", "x"), deleted(".")} }, false, "cannot be deleted"},
		{"a file, then a symlink of its name", func(string) []entry {
			return []entry{file("x", "x"), symlink("x", ".."), file("x/evil", "x")}
		}, false, "x"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			top := t.TempDir()
			dst := filepath.Join(top, "p", "d")
			if err := os.MkdirAll(dst, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(top, "p", "victim"), []byte("untouched"), 0o644); err != nil {
				t.Fatal(err)
			}
			before := outsideOf(t, top, dst)
			err := Extract(bytes.NewReader(archive(t, tt.entries(top)...)), dst,
				Options{ConfineLinks: tt.confine, Snapshot: strings.HasSuffix(tt.name, "in a snapshot")})
			switch {
			case tt.wantErr == "" && err != nil:
				t.Errorf("refused: %v", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Errorf("got error %v, want one saying %q", err, tt.wantErr)
			}
			if after := outsideOf(t, top, dst); !reflect.DeepEqual(after, before) {
				t.Errorf("outside the folder:\n%v\nwas\n%v", after, before)
			}
		})
	}
}

// TestExtractKeepsLinksInside: confined, links that stay inside the folder
// (up and down, through other links, dangling) are kept as they were, a
// file written through one lands inside, and "./" names are the folder.
func TestExtractKeepsLinksInside(t *testing.T) {
	dst := t.TempDir()
	err := Extract(bytes.NewReader(archive(t,
		dir("./"),
		file("./top.txt", "top"),
		dir("lib/"),
		file("lib/libx.so.1", "elf"),
		symlink("lib/libx.so", "libx.so.1"),
		symlink("here", "."),
		symlink("up", "lib/.."),
		symlink("bin/x", "../lib/libx.so"),
		symlink("dangling", "lib/not-yet/../none"),
		symlink("via", "here/lib"),
		file("via/written", "through a link"),
	)), dst, Options{ConfineLinks: true})
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{"lib/libx.so": "libx.so.1", "bin/x": "../lib/libx.so", "up": "lib/..", "dangling": "lib/not-yet/../none"} {
		if got, err := os.Readlink(filepath.Join(dst, name)); err != nil || got != want {
			t.Errorf("%s: %q %v, want %q", name, got, err, want)
		}
	}
	if b, err := os.ReadFile(filepath.Join(dst, "bin", "x")); err != nil || string(b) != "elf" {
		t.Errorf("bin/x reads %q %v", b, err)
	}
	if b, err := os.ReadFile(filepath.Join(dst, "top.txt")); err != nil || string(b) != "top" {
		t.Errorf("top.txt: %q %v", b, err)
	}
	if b, err := os.ReadFile(filepath.Join(dst, "lib", "written")); err != nil || string(b) != "through a link" {
		t.Errorf("lib/written: %q %v", b, err)
	}
}

// TestExtractMaxBytes: an archive that unpacks to more than MaxBytes is
// refused however small it is packed; one within it is unpacked.
func TestExtractMaxBytes(t *testing.T) {
	src := t.TempDir()
	os.WriteFile(filepath.Join(src, "zeros"), make([]byte, 1<<20), 0o644)
	var buf bytes.Buffer
	if err := Write(&buf, src, Gzip); err != nil {
		t.Fatal(err)
	}
	if buf.Len() > 64<<10 {
		t.Fatalf("the archive packs to %d bytes", buf.Len())
	}
	for _, tc := range []struct {
		max  int64
		fail bool
	}{{512 << 10, true}, {4 << 20, false}, {0, false}} {
		err := Extract(bytes.NewReader(buf.Bytes()), t.TempDir(), Options{MaxBytes: tc.max})
		if (err != nil) != tc.fail || tc.fail && !strings.Contains(err.Error(), "more than its limit") {
			t.Errorf("MaxBytes %d: %v", tc.max, err)
		}
	}
}
