package agent

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/fleetmanager/fm/protocol"
	"github.com/rs/zerolog"
)

func tarGz(t *testing.T, files map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	for name, content := range files {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(content)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		tw.Write([]byte(content))
	}
	tw.Close()
	gz.Close()
	return buf.Bytes()
}

// TestInstallTool: an image's tool is downloaded, checked, unpacked when an
// archive, and linked from /usr/local/bin; the same tool again is not
// fetched; a new digest replaces it; a wrong digest, an archive without the
// program or one that leads outside its folder change nothing.
func TestInstallTool(t *testing.T) {
	files := map[string][]byte{
		"/kubectl":           []byte("#!/bin/sh\necho kubectl v1\n"),
		"/kubectl-v2":        []byte("#!/bin/sh\necho kubectl v2\n"),
		"/eksctl.tar.gz":     tarGz(t, map[string]string{"eksctl": "#!/bin/sh\necho eksctl\n", "LICENSE": "x"}),
		"/python.tgz":        tarGz(t, map[string]string{"python-3.8/bin/python3.8": "#!/bin/sh\necho 3.8\n"}),
		"/empty.tar.gz":      tarGz(t, map[string]string{"README": "nothing"}),
		"/escape.tar.gz":     tarGz(t, map[string]string{"../../evil": "x"}),
		"/not-a-tarball.tgz": []byte("plain"),
	}
	var hits atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		b, ok := files[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Write(b)
	}))
	t.Cleanup(srv.Close)
	sum := func(p string) string { s := sha256.Sum256(files[p]); return hex.EncodeToString(s[:]) }
	src := func(p, binary string) protocol.ToolSource {
		return protocol.ToolSource{URL: srv.URL + p, SHA256: sum(p), Binary: binary}
	}
	m := newMachine(Config{RootDir: t.TempDir(), DataDir: t.TempDir(), ServiceManager: "none", DSSUser: currentUser(t)}, zerolog.Nop())
	r := &actionRunner{m: m, http: srv.Client()}
	link := func(name string) string { return m.rooted("usr", "local", "bin", name) }
	run := func(name string) string {
		t.Helper()
		b, err := os.ReadFile(link(name))
		if err != nil {
			return ""
		}
		return string(b)
	}
	tests := []struct {
		name, tool string
		src        protocol.ToolSource
		err        string
		want       string // what the linked program holds after
		fetches    int32
	}{
		{name: "a program", tool: "kubectl", src: src("/kubectl", ""), want: "echo kubectl v1", fetches: 1},
		{name: "the same again, not fetched", tool: "kubectl", src: src("/kubectl", ""), want: "echo kubectl v1"},
		{name: "a new digest replaces it", tool: "kubectl", src: src("/kubectl-v2", ""), want: "echo kubectl v2", fetches: 1},
		{name: "an archive", tool: "eksctl", src: src("/eksctl.tar.gz", ""), want: "echo eksctl", fetches: 1},
		{name: "a program deep in an archive", tool: "python3.8", src: src("/python.tgz", "python-3.8/bin/python3.8"), want: "echo 3.8", fetches: 1},
		{name: "a wrong digest", tool: "aws", src: protocol.ToolSource{URL: srv.URL + "/kubectl", SHA256: sum("/eksctl.tar.gz")}, err: "SHA-256 is", fetches: 1},
		{name: "an archive without the program", tool: "helm", src: src("/empty.tar.gz", ""), err: "has no helm", fetches: 1},
		{name: "an archive leading outside", tool: "evil", src: src("/escape.tar.gz", ""), err: "evil", fetches: 1},
		{name: "not an archive", tool: "jq", src: src("/not-a-tarball.tgz", ""), err: "jq", fetches: 1},
		{name: "not there", tool: "yq", src: protocol.ToolSource{URL: srv.URL + "/nope", SHA256: sum("/kubectl")}, err: "404", fetches: 1},
		{name: "a bad name", tool: "../x", src: src("/kubectl", ""), err: "not a program name"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := hits.Load()
			_, err := r.installTool(context.Background(), tc.tool, tc.src)
			if (err == nil) != (tc.err == "") || err != nil && !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("err = %v, want %q", err, tc.err)
			}
			if got := hits.Load() - before; got != tc.fetches {
				t.Errorf("fetched %d times, want %d", got, tc.fetches)
			}
			if tc.err != "" {
				if _, err := os.Lstat(link(tc.tool)); !os.IsNotExist(err) && !strings.Contains(tc.tool, "/") {
					t.Errorf("a refused tool is linked: %v", err)
				}
				return
			}
			if got := run(tc.tool); !strings.Contains(got, tc.want) {
				t.Errorf("/usr/local/bin/%s holds %q, want %q", tc.tool, got, tc.want)
			}
			if st, err := os.Stat(link(tc.tool)); err != nil || st.Mode().Perm()&0o111 == 0 {
				t.Errorf("the program is not executable: %v %v", st, err)
			}
		})
	}
	// Nothing a refusal or a replaced version left behind but the kept
	// folders: no temporary folder, nothing outside.
	entries, _ := os.ReadDir(m.rooted("opt", "fm-tools"))
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") {
			t.Errorf("left behind: %s", e.Name())
		}
	}
	if _, err := os.Stat(filepath.Join(m.rooted("opt"), "evil")); !os.IsNotExist(err) {
		t.Error("an archive wrote outside its folder")
	}

	// INSTALL_DEPRECATED_PYTHON takes its builds from the image's tools.
	tools := map[string]protocol.ToolSource{"python3.8": src("/python.tgz", "python-3.8/bin/python3.8")}
	for _, tc := range []struct {
		params string
		status protocol.Status
		msg    string
	}{
		{`{"install_py36":false,"install_py37":false,"install_py38":true}`, protocol.StatusOK, "already installed"},
		{`{"install_py37":true,"install_py38":true}`, protocol.StatusUnsupported, "no python3.7 build"},
		{`{}`, protocol.StatusOK, "no deprecated Python"},
	} {
		res := r.run(context.Background(), action(protocol.ActionInstallDeprecatedPython, tc.params), 0, ansibleFacts{}, tools)
		if res.status != tc.status || !strings.Contains(res.message, tc.msg) {
			t.Errorf("%s: %s %q, want %s %q", tc.params, res.status, res.message, tc.status, tc.msg)
		}
	}
}
