package backup

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// craftedBackup is a backup file holding no stream and the given files
// (entry name under files/ -> content), in order, as a hostile one may.
func craftedBackup(t *testing.T, files ...[2]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(zw)
	m, err := json.Marshal(Manifest{Format: Format})
	if err != nil {
		t.Fatal(err)
	}
	if err := addBytes(tw, manifestName, m); err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if err := addBytes(tw, filesDir+f[0], []byte(f[1])); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// tree lists what lies under top: path -> "dir", "file CONTENT" or
// "link TARGET".
func tree(t *testing.T, top string) map[string]string {
	t.Helper()
	found := map[string]string{}
	err := filepath.WalkDir(top, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(top, p)
		switch {
		case d.Type()&fs.ModeSymlink != 0:
			l, _ := os.Readlink(p)
			found[rel] = "link " + l
		case d.IsDir():
			found[rel] = "dir"
		default:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			found[rel] = "file " + string(b)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return found
}

// TestRestoreFilesRefusesBadBackups: a backup with a file named outside the
// data folder, or one that the data folder cannot take, is refused before
// anything is written, inside the data folder or outside it.
func TestRestoreFilesRefusesBadBackups(t *testing.T) {
	tests := []struct {
		name string
		// files are the backup's; the data folder is top/data, beside
		// top/victim, and prepare may put things in it first.
		files   func(top string) [][2]string
		prepare func(t *testing.T, top string)
		want    error
		wantMsg string
	}{
		{name: "dot-dot name", files: func(string) [][2]string {
			return [][2]string{{"secrets.key", "key"}, {"../evil", "x"}, {"../victim", "pwned"}}
		}, want: ErrBadFileName, wantMsg: `"../evil"`},
		{name: "dot-dot inside a name", files: func(string) [][2]string {
			return [][2]string{{"secrets.key", "key"}, {"tls/../../evil", "x"}}
		}, want: ErrBadFileName, wantMsg: `"tls/../../evil"`},
		{name: "absolute name", files: func(top string) [][2]string {
			return [][2]string{{"secrets.key", "key"}, {filepath.ToSlash(filepath.Join(top, "victim")), "pwned"}}
		}, want: ErrBadFileName, wantMsg: "nothing was restored"},
		{name: "a name not in its plain form", files: func(string) [][2]string {
			return [][2]string{{"secrets.key", "key"}, {"./secrets.key", "other"}}
		}, want: ErrBadFileName, wantMsg: `"./secrets.key"`},
		{name: "a file that is the folder of another", files: func(string) [][2]string {
			return [][2]string{{"tls", "x"}, {"tls/ca.pem", "ca"}}
		}, want: ErrBadFileName, wantMsg: `"tls" is a file and the folder of "tls/ca.pem"`},
		{name: "a file the data folder holds otherwise", files: func(string) [][2]string {
			return [][2]string{{"a.key", "a"}, {"secrets.key", "key"}}
		}, prepare: func(t *testing.T, top string) {
			write(t, filepath.Join(top, "data", "secrets.key"), "another key")
		}, wantMsg: "fresh data folder", want: ErrFolderNotFresh},
		{name: "a link in the data folder that leads out", files: func(string) [][2]string {
			return [][2]string{{"a.key", "a"}, {"out/victim", "pwned"}}
		}, prepare: func(t *testing.T, top string) {
			if err := os.MkdirAll(filepath.Join(top, "data"), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink("..", filepath.Join(top, "data", "out")); err != nil {
				t.Fatal(err)
			}
		}, wantMsg: "out/victim cannot be checked"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			top := t.TempDir()
			write(t, filepath.Join(top, "victim"), "untouched")
			if tt.prepare != nil {
				tt.prepare(t, top)
			}
			before := tree(t, top)
			_, files, err := ReadFiles(bytes.NewReader(craftedBackup(t, tt.files(top)...)))
			if err != nil {
				t.Fatal(err)
			}
			err = RestoreFiles(filepath.Join(top, "data"), files)
			if err == nil || !strings.Contains(err.Error(), tt.wantMsg) || (tt.want != nil && !errors.Is(err, tt.want)) {
				t.Fatalf("got %v, want %v saying %q", err, tt.want, tt.wantMsg)
			}
			if after := tree(t, top); !reflect.DeepEqual(after, before) {
				t.Fatalf("the refused restore changed:\n%v\nwas\n%v", after, before)
			}
		})
	}
}

// TestRestoreFiles: a backup's files go into a fresh data folder (0600,
// folders 0700), and the same restore again (one cut short, run again) is
// harmless.
func TestRestoreFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	files := map[string][]byte{"secrets.key": []byte("key"), "nats-auth/operator.nk": []byte("seed"), "tls/ca.pem": []byte("ca")}
	for round := range 2 {
		if err := RestoreFiles(dir, files); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		want := map[string]string{".": "dir", "nats-auth": "dir", "tls": "dir",
			"secrets.key": "file key", "nats-auth/operator.nk": "file seed", "tls/ca.pem": "file ca"}
		if got := tree(t, dir); !reflect.DeepEqual(got, want) {
			t.Fatalf("round %d: %v", round, got)
		}
	}
	for name, perm := range map[string]fs.FileMode{"secrets.key": 0o600, "tls/ca.pem": 0o600, "tls": 0o700} {
		if info, err := os.Stat(filepath.Join(dir, name)); err != nil || info.Mode().Perm() != perm {
			t.Errorf("%s: %v %v, want %v", name, info, err, perm)
		}
	}
}

func write(t *testing.T, p, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}
