package agent

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
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
		{name: "a wrong digest", tool: "aws", src: protocol.ToolSource{URL: srv.URL + "/kubectl", SHA256: sum("/eksctl.tar.gz")}, err: "SHA-256 is not the image's", fetches: 1},
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
	// What a kill left (a temporary folder) goes at the tool's next
	// install; a replaced version's folder went when the link moved.
	os.MkdirAll(filepath.Join(m.rooted("opt", "fm-tools"), ".kubectl-123456", "half"), 0o755)
	if _, err := r.installTool(context.Background(), "kubectl", src("/kubectl-v2", "")); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(m.rooted("opt", "fm-tools"))
	var kept []string
	for _, e := range entries {
		kept = append(kept, e.Name())
		if strings.HasPrefix(e.Name(), ".") {
			t.Errorf("left behind: %s", e.Name())
		}
	}
	if len(kept) != 3 || !strings.HasPrefix(kept[0], "eksctl-") || !strings.HasPrefix(kept[1], "kubectl-"+sum("/kubectl-v2")[:16]) || !strings.HasPrefix(kept[2], "python3.8-") {
		t.Errorf("tool folders: %v, want one per tool, at its digest", kept)
	}

	// The machine's own program is left alone; a file:// URL must name a
	// regular file (a pipe would block for ever).
	own := link("helm")
	os.MkdirAll(filepath.Dir(own), 0o755)
	os.WriteFile(own, []byte("the machine's helm"), 0o755)
	if _, err := r.installTool(context.Background(), "helm", src("/kubectl", "")); !errors.Is(err, errOwnProgram) {
		t.Errorf("the machine's own program: %v", err)
	}
	if _, missing, err := r.installTools(context.Background(), map[string]protocol.ToolSource{"helm": src("/kubectl", "")}, "helm"); err != nil || len(missing) != 1 || !strings.Contains(missing[0], "the machine's own kept") {
		t.Errorf("a tool the machine has its own of: %v %v", missing, err)
	}
	if b, _ := os.ReadFile(own); string(b) != "the machine's helm" {
		t.Errorf("the machine's own program changed: %q", b)
	}
	fifo := filepath.Join(t.TempDir(), "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := r.installTool(context.Background(), "jq", protocol.ToolSource{URL: "file://" + fifo, SHA256: sum("/kubectl")}); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("a pipe: %v", err)
	}
	local := filepath.Join(t.TempDir(), "yq")
	os.WriteFile(local, files["/kubectl"], 0o644)
	if _, err := r.installTool(context.Background(), "yq", protocol.ToolSource{URL: "file://" + local, SHA256: sum("/kubectl")}); err != nil || !strings.Contains(run("yq"), "kubectl v1") {
		t.Errorf("a file:// tool: %v", err)
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
