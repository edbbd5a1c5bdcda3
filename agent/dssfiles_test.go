package agent

import (
	"context"
	"errors"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// within10s runs fn and fails the test if it has not returned within ten
// seconds: what the DSS account put in the agent's way must not wedge it.
func within10s(t *testing.T, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { defer close(done); fn() }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not return within 10s", what)
	}
}

// TestRootReadsNothingThroughTheDSSUsersFiles: the DSS account owns the data
// volume's dataiku folder, and may put, where the agent (root) reads a file
// of DSS's, a link to a file of root's, a link to a device or a FIFO. The
// agent reads nothing of root's file through them (DSS's version and
// install.ini, what DSS reads at start, DSS's log it ships), and none of them
// wedges it.
func TestRootReadsNothingThroughTheDSSUsersFiles(t *testing.T) {
	kinds := []struct {
		name string
		put  func(t *testing.T, path, secret string)
	}{
		{"link to a file of root's", func(t *testing.T, path, secret string) {
			if err := os.Symlink(secret, path); err != nil {
				t.Fatal(err)
			}
		}},
		{"relative link out", func(t *testing.T, path, secret string) {
			rel, err := filepath.Rel(filepath.Dir(path), secret)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(rel, path); err != nil {
				t.Fatal(err)
			}
		}},
		{"link to a device", func(t *testing.T, path, _ string) {
			if err := os.Symlink("/dev/zero", path); err != nil {
				t.Fatal(err)
			}
		}},
		{"FIFO", func(t *testing.T, path, _ string) {
			if err := syscall.Mkfifo(path, 0o666); err != nil {
				t.Fatal(err)
			}
		}},
	}
	// Each reader returns what the agent got; it must not hold SECRET.
	readers := []struct {
		rel    string
		secret string
		read   func(t *testing.T, m *machine, secretPath string) string
	}{
		{"dss_data/dss-version.json", `{"product_version":"SECRET"}`, func(t *testing.T, m *machine, _ string) string {
			v, _ := m.installedVersion()
			return v
		}},
		{"dss_data/install.ini", "[general]\nnodetype = SECRET\n", func(t *testing.T, m *machine, _ string) string {
			ini, _ := m.readINI()
			return ini["general.nodetype"]
		}},
		{"dss_data/run/backend.log", "SECRET\n", func(t *testing.T, m *machine, _ string) string {
			s := newLogShipper("in-test", zerolog.Nop())
			ctx, cancel := context.WithCancel(context.Background())
			cancel() // one pass
			s.tail(ctx, "dss", m.dssLogPath(), filepath.Join(t.TempDir(), "offsets.json"), m.openDSSLog)
			var got strings.Builder
			for _, c := range s.pending {
				got.Write(c.data)
			}
			return got.String()
		}},
		{"dss_data/lib/jdbc/driver.jar", "SECRET", func(t *testing.T, m *machine, secretPath string) string {
			// What DSS reads at start is summed, not kept: root's file was
			// read if the sum follows it.
			before := m.dssInputs()
			if err := os.WriteFile(secretPath, []byte("SECRET, changed"), 0o600); err != nil {
				t.Fatal(err)
			}
			if m.dssInputs() != before {
				return "SECRET followed"
			}
			return ""
		}},
		{"dss_data/bin/env-site.sh", "export SECRET=1\n", func(t *testing.T, m *machine, secretPath string) string {
			before := m.dssInputs()
			if err := os.WriteFile(secretPath, []byte("export SECRET=2\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			if m.dssInputs() != before {
				return "SECRET followed"
			}
			return ""
		}},
	}
	for _, k := range kinds {
		for _, rd := range readers {
			t.Run(k.name+"/"+rd.rel, func(t *testing.T) {
				m := newMachine(Config{Instance: "in-test", RootDir: t.TempDir(), DataDir: t.TempDir()}, zerolog.Nop())
				secret := filepath.Join(t.TempDir(), "root-only")
				if err := os.WriteFile(secret, []byte(rd.secret), 0o600); err != nil {
					t.Fatal(err)
				}
				path := filepath.Join(m.dssFolder(), rd.rel)
				if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
					t.Fatal(err)
				}
				k.put(t, path, secret)
				var got string
				within10s(t, "reading "+rd.rel, func() { got = rd.read(t, m, secret) })
				if strings.Contains(got, "SECRET") {
					t.Fatalf("the agent read root's file through %s: %q", rd.rel, got)
				}
			})
		}
	}
}

// dssUserForTest is an unprivileged account for the DSS user, whose tests
// need root (the agent switches to it only as root).
func dssUserForTest(t *testing.T) *account {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: the agent reads and writes as the DSS user only as root")
	}
	u, err := user.Lookup("nobody")
	if err != nil {
		t.Skipf("no unprivileged user to run DSS as: %v", err)
	}
	uid, _ := strconv.ParseUint(u.Uid, 10, 32)
	gid, _ := strconv.ParseUint(u.Gid, 10, 32)
	return &account{name: u.Username, uid: uint32(uid), gid: uint32(gid), home: u.HomeDir}
}

// reachableDir is a new folder the account can enter and write.
func reachableDir(t *testing.T, acc *account) string {
	t.Helper()
	dir := t.TempDir()
	for p := dir; p != "/" && p != os.TempDir(); p = filepath.Dir(p) {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chown(dir, int(acc.uid), int(acc.gid)); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestFilesOfTheDSSUserAreBounded: what the agent reads and writes as the DSS
// user (through a shell run as it) is a regular file of bounded size, and
// every shell is bounded in time, whatever the account put in the way.
func TestFilesOfTheDSSUserAreBounded(t *testing.T) {
	acc := dssUserForTest(t)
	f := accountFiles{acc: acc, timeout: accountFileTimeout}
	dir := reachableDir(t, acc)
	path := func(name string) string { return filepath.Join(dir, name) }
	if err := syscall.Mkfifo(path("fifo"), 0o666); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/dev/zero", path("zero")); err != nil {
		t.Fatal(err)
	}
	big, err := os.Create(path("big"))
	if err != nil {
		t.Fatal(err)
	}
	if err := big.Truncate(maxDSSFileBytes + 1); err != nil {
		t.Fatal(err)
	}
	big.Close()
	if err := syscall.Mkfifo(path("env-site.sh.fm-new"), 0o666); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{path("fifo"), path("env-site.sh.fm-new")} {
		if err := os.Chown(p, int(acc.uid), int(acc.gid)); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	tests := []struct {
		name string
		do   func() error
		want string // in the error; "" for none
	}{
		{"read a FIFO", func() error { _, err := f.readFile(ctx, path("fifo")); return err }, "not a regular file"},
		{"read a link to a device", func() error { _, err := f.readFile(ctx, path("zero")); return err }, "not a regular file"},
		{"read a file too large", func() error { _, err := f.readFile(ctx, path("big")); return err }, "larger than"},
		{"write where a FIFO waits", func() error { return f.writeFile(ctx, path("env-site.sh"), []byte("export A=1\n"), 0o644) }, ""},
		{"a shell that does not end", func() error {
			_, err := accountFiles{acc: acc, timeout: time.Second}.run(ctx, nil, "sleep 60; true", path("x"))
			return err
		}, "not done within"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var err error
			within10s(t, tc.name, func() { err = tc.do() })
			switch {
			case tc.want == "" && err != nil:
				t.Fatal(err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want) || errors.Is(err, os.ErrNotExist)):
				t.Fatalf("error %v, want one saying %q", err, tc.want)
			}
		})
	}
	if b, err := os.ReadFile(path("env-site.sh")); err != nil || string(b) != "export A=1\n" {
		t.Fatalf("env-site.sh written as %q (%v)", b, err)
	}
}

// TestChownToUserChangesLinksNotTheirTargets: the login user owns its home
// and may swap a link in for ~/.ssh or authorized_keys; the agent gives the
// link to the user, never what it leads to.
func TestChownToUserChangesLinksNotTheirTargets(t *testing.T) {
	acc := dssUserForTest(t)
	target := filepath.Join(t.TempDir(), "root-only")
	if err := os.WriteFile(target, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(t.TempDir(), "authorized_keys")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	m := newMachine(Config{RootDir: "/", DataDir: t.TempDir()}, zerolog.Nop())
	m.chownToUser(acc.name, link)
	owner := func(p string, stat func(string) (os.FileInfo, error)) uint32 {
		st, err := stat(p)
		if err != nil {
			t.Fatal(err)
		}
		return st.Sys().(*syscall.Stat_t).Uid
	}
	if got := owner(target, os.Stat); got != 0 {
		t.Errorf("the link's target was given to uid %d", got)
	}
	if got := owner(link, os.Lstat); got != acc.uid {
		t.Errorf("the link is owned by uid %d, not the user's %d", got, acc.uid)
	}
}
