package packaging

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The units the package installs, and the highest systemd-analyze security
// exposure each may have (0 is best, 10 worst). The agent manages the
// machine as root, unsandboxed (fm-agent.service says why).
var units = []struct {
	name        string
	maxExposure float64
}{
	{"fm-server.service", 2.0},
	{"fm-provisioner.service", 2.0},
	{"fm-nats.service", 2.0},
	{"fm-agent.service", 10},
}

// tools are the programs the tests run; CI installs them and sets
// FM_REQUIRE_PACKAGING, so that the tests cannot skip there.
func needTools(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"dpkg", "dpkg-deb", "systemd-analyze", "useradd"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("FM_REQUIRE_PACKAGING") != "" {
				t.Fatalf("%s not found: the package's tests need dpkg and systemd", tool)
			}
			t.Skipf("%s not found: the package's tests need dpkg and systemd (FM_REQUIRE_PACKAGING=1 makes this a failure)", tool)
		}
	}
	if os.Geteuid() != 0 {
		if os.Getenv("FM_REQUIRE_PACKAGING") != "" {
			t.Fatal("dpkg --root installs as root: run the package's tests as root")
		}
		t.Skip("dpkg --root installs as root: the package's tests run as root (CI does)")
	}
}

func repoRoot(t *testing.T) string {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(filepath.Dir(filepath.Dir(file)))
}

func run(t *testing.T, env []string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = repoRoot(t)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// build runs build.sh for this machine's architecture into a new folder,
// as version (SOURCE_DATE_EPOCH fixed, as a commit's date fixes it).
func build(t *testing.T, out, version string) {
	t.Helper()
	run(t, []string{"VERSION=" + version, "FM_COMMIT=0123456789abcdef0123456789abcdef01234567", "SOURCE_DATE_EPOCH=1796644519"},
		"deploy/packaging/build.sh", out, runtime.GOARCH)
}

// sums is every file under dir by its path, as SHA-256.
func sums(t *testing.T, dir string) map[string]string {
	t.Helper()
	got := map[string]string{}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		h := sha256.Sum256(b)
		got[rel] = hex.EncodeToString(h[:])
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// throwawayRoot is a root dpkg installs into: its database, the users of a
// fresh system, and what a machine the package installs on has (systemd's
// own units, kill), so that systemd-analyze can verify the units in it.
func throwawayRoot(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	for _, d := range []string{"var/lib/dpkg/info", "var/lib/dpkg/updates", "etc", "usr/bin", "usr/lib/systemd/system"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []struct{ name, content string }{
		{"var/lib/dpkg/status", ""},
		{"etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"},
		{"etc/group", "root:x:0:\n"},
		{"etc/shadow", "root:*:20000:0:99999:7:::\n"},
		{"etc/gshadow", "root:*::\n"},
	} {
		if err := os.WriteFile(filepath.Join(root, f.name), []byte(f.content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("usr/bin", filepath.Join(root, "bin")); err != nil {
		t.Fatal(err)
	}
	run(t, nil, "cp", "-a", "/usr/lib/systemd/system/.", filepath.Join(root, "usr/lib/systemd/system"))
	kill, err := exec.LookPath("kill")
	if err != nil {
		t.Fatal(err)
	}
	run(t, nil, "cp", kill, filepath.Join(root, "usr/bin/kill"))
	return root
}

func dpkg(t *testing.T, root string, args ...string) string {
	t.Helper()
	return run(t, nil, "dpkg", append([]string{"--root=" + root, "--force-script-chrootless", "--log=/dev/null", "--force-confold"}, args...)...)
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

// TestPackage builds the fm package twice (the same bytes both times),
// installs it into a throwaway root, verifies and rates its units, upgrades
// it with changed settings and data in place, and removes and purges it:
// settings are kept until purged, data and the user always.
func TestPackage(t *testing.T) {
	needTools(t)
	first, second := t.TempDir(), t.TempDir()
	build(t, first, "v1.0.0")

	t.Run("reproducible", func(t *testing.T) {
		build(t, second, "v1.0.0")
		a, b := sums(t, first), sums(t, second)
		if len(a) != 5 {
			t.Fatalf("the build made %v, not fm, fm-agent, nats-server, a .deb and an .rpm", a)
		}
		for name, sum := range a {
			if b[name] != sum {
				t.Errorf("%s differs between two builds of one commit", name)
			}
		}
	})

	deb := filepath.Join(first, "fm_1.0.0_"+runtime.GOARCH+".deb")
	root := throwawayRoot(t)
	dpkg(t, root, "-i", deb)

	t.Run("installed", func(t *testing.T) {
		for path, mode := range map[string]os.FileMode{
			"usr/bin/fm": 0o755, "usr/bin/fm-agent": 0o755, "usr/lib/fm/nats-server": 0o755,
			"etc/fm/server.env": 0o644, "etc/fm/provisioner.env": 0o644, "etc/fm/nats.env": 0o644,
			"etc/fm/nats/nats-server.conf": 0o644, "var/lib/fm": os.ModeDir | 0o755,
		} {
			fi, err := os.Stat(filepath.Join(root, path))
			if err != nil {
				t.Errorf("%s: %v", path, err)
			} else if fi.Mode()&(os.ModeDir|os.ModePerm) != mode {
				t.Errorf("%s: mode %v, want %v", path, fi.Mode(), mode)
			}
		}
		if !regexp.MustCompile(`(?m)^fm:x:\d+:\d+:Fleet Manager:/var/lib/fm:/usr/sbin/nologin$`).MatchString(readFile(t, filepath.Join(root, "etc/passwd"))) {
			t.Errorf("no fm system user:\n%s", readFile(t, filepath.Join(root, "etc/passwd")))
		}
		out := run(t, nil, filepath.Join(root, "usr/bin/fm"), "version")
		if !strings.Contains(out, "fm v1.0.0 (commit 0123456789ab") {
			t.Errorf("fm version: %s", out)
		}
		conf := run(t, nil, "dpkg-deb", "-f", deb, "Version")
		if strings.TrimSpace(conf) != "1.0.0" {
			t.Errorf("package version %q", conf)
		}
	})

	t.Run("units", func(t *testing.T) {
		for _, u := range units {
			t.Run(u.name, func(t *testing.T) {
				if out := run(t, nil, "systemd-analyze", "verify", "--root="+root, "--man=no", u.name); strings.TrimSpace(out) != "" {
					t.Errorf("systemd-analyze verify %s:\n%s", u.name, out)
				}
				out := run(t, nil, "systemd-analyze", "security", "--offline=true", "--root="+root, "--no-pager", u.name)
				m := regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+)`).FindStringSubmatch(out)
				if m == nil {
					t.Fatalf("no exposure level in:\n%s", out)
				}
				score, _ := strconv.ParseFloat(m[1], 64)
				t.Logf("%s: systemd-analyze security exposure %.1f", u.name, score)
				if score > u.maxExposure {
					t.Errorf("%s: exposure %.1f, over %.1f", u.name, score, u.maxExposure)
				}
			})
		}
	})

	t.Run("the units' commands run", func(t *testing.T) {
		unitsRun(t, root)
	})

	// What an operator changed and what FM stored, before an upgrade.
	serverEnv := filepath.Join(root, "etc/fm/server.env")
	changed := readFile(t, serverEnv) + "FM_ADVERTISE_URL=https://fm.example.com:10000\n"
	if err := os.WriteFile(serverEnv, []byte(changed), 0o644); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(root, "var/lib/fm/server/jetstream/stored")
	if err := os.MkdirAll(filepath.Dir(data), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(data, []byte("a fleet"), 0o600); err != nil {
		t.Fatal(err)
	}

	t.Run("upgrade", func(t *testing.T) {
		newer := t.TempDir()
		build(t, newer, "v1.1.0")
		dpkg(t, root, "-i", filepath.Join(newer, "fm_1.1.0_"+runtime.GOARCH+".deb"))
		if out := run(t, nil, filepath.Join(root, "usr/bin/fm"), "version"); !strings.Contains(out, "fm v1.1.0") {
			t.Errorf("after the upgrade, fm version: %s", out)
		}
		if got := readFile(t, serverEnv); got != changed {
			t.Errorf("the upgrade changed the operator's settings:\n%s", got)
		}
		if got := readFile(t, data); got != "a fleet" {
			t.Errorf("the upgrade changed FM's data: %q", got)
		}
		if n := strings.Count(readFile(t, filepath.Join(root, "etc/passwd")), "\nfm:"); n != 1 {
			t.Errorf("%d fm users after the upgrade", n)
		}
	})

	t.Run("remove and purge", func(t *testing.T) {
		dpkg(t, root, "-r", "fm")
		if exists(filepath.Join(root, "usr/bin/fm")) || exists(filepath.Join(root, "usr/lib/systemd/system/fm-server.service")) {
			t.Error("removed, the binary or a unit is still there")
		}
		if got := readFile(t, serverEnv); got != changed {
			t.Errorf("removed, the settings are %q", got)
		}
		dpkg(t, root, "-P", "fm")
		if exists(serverEnv) {
			t.Error("purged, the settings are still there")
		}
		if got := readFile(t, data); got != "a fleet" {
			t.Errorf("purged, FM's data is %q", got)
		}
	})
}

// unitsRun runs fm-server's and fm-provisioner's commands as their units
// do: the packaged binary, the packaged settings as the environment (data
// in a folder of the test's, ports free ones), fm-provisioner's
// ExecStartPre (its credentials minted with the server's admin key), until
// the provisioner holds its lease on the server's bus.
func unitsRun(t *testing.T, root string) {
	data := t.TempDir()
	api, bus := freePort(t), freePort(t)
	rewrite := strings.NewReplacer("/var/lib/fm", data, "0.0.0.0:10000", api, "0.0.0.0:4222", bus,
		"127.0.0.1:10000", api, "127.0.0.1:4222", bus, "/usr/bin/fm", filepath.Join(root, "usr/bin/fm"))
	service := func(unit string) (env []string, pre, start []string) {
		text := readFile(t, filepath.Join(root, "usr/lib/systemd/system", unit))
		text = strings.ReplaceAll(text, "\\\n", " ")
		for _, line := range strings.Split(text, "\n") {
			key, value, _ := strings.Cut(line, "=")
			switch key {
			case "EnvironmentFile":
				for _, l := range strings.Split(readFile(t, filepath.Join(root, value)), "\n") {
					if l != "" && !strings.HasPrefix(l, "#") {
						env = append(env, rewrite.Replace(l))
					}
				}
			case "ExecStartPre":
				// "-": the unit starts even when this fails; here it must not.
				pre = strings.Fields(rewrite.Replace(strings.TrimPrefix(value, "-")))
			case "ExecStart":
				start = strings.Fields(rewrite.Replace(value))
			}
		}
		return env, pre, start
	}

	serverEnv, _, serverStart := service("fm-server.service")
	server := exec.Command(serverStart[0], serverStart[1:]...)
	server.Env = append(os.Environ(), serverEnv...)
	serverLog, err := os.Create(filepath.Join(t.TempDir(), "server.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer serverLog.Close()
	server.Stdout, server.Stderr = serverLog, serverLog
	if err := server.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = server.Process.Kill(); _ = server.Wait() }()

	env, pre, start := service("fm-provisioner.service")
	// The server makes the admin key and the CA the provisioner's start
	// reads: its ExecStartPre runs once they are there (systemd orders the
	// units, After=fm-server.service; Restart= tries again).
	deadline := time.Now().Add(2 * time.Minute)
	for {
		cmd := exec.Command(pre[0], pre[1:]...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("fm-provisioner's ExecStartPre: %v\n%s\nserver: %s", err, out, readFile(t, serverLog.Name()))
		}
		time.Sleep(200 * time.Millisecond)
	}
	prov := exec.Command(start[0], start[1:]...)
	prov.Env = append(os.Environ(), append(env, "AWS_REGION=eu-west-1")...)
	logs, err := prov.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := prov.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = prov.Process.Kill(); _ = prov.Wait() }()
	held := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(logs)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "holding the provisioner lease") {
				held <- true
				return
			}
		}
		held <- false
	}()
	select {
	case ok := <-held:
		if !ok {
			t.Fatalf("the provisioner stopped without its lease; server: %s", readFile(t, serverLog.Name()))
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("the provisioner did not take its lease within 2 minutes")
	}
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestPackageVersions: git describe's versions become package versions
// that start with a digit and sort as the releases they name do.
func TestPackageVersions(t *testing.T) {
	// In the order the versions sort in, but for the ones marked aside: a
	// build with uncommitted changes sorts after its commit, and untagged
	// commits sort before every release, in no order among themselves.
	ordered := []struct {
		describe, version string
		aside             bool
	}{
		{"1234567", "0.0.0+g1234567", true},
		{"8b0d4c1", "0.0.0+g8b0d4c1", false},
		{"8b0d4c1-dirty", "0.0.0+g8b0d4c1.dirty", true},
		{"v1.2.0-rc.1", "1.2.0~rc.1", false},
		{"v1.2.0-rc.1-3-gabc1234", "1.2.0~rc.1+3.gabc1234", false},
		{"v1.2.0", "1.2.0", false},
		{"v1.2.0-dirty", "1.2.0+dirty", true},
		{"v1.2.0-3-gabc1234", "1.2.0+3.gabc1234", false},
		{"v1.2.0-3-gabc1234-dirty", "1.2.0+3.gabc1234.dirty", true},
		{"v1.10.0", "1.10.0", false},
	}
	for _, tc := range ordered {
		t.Run(tc.describe, func(t *testing.T) {
			if got := strings.TrimSpace(run(t, nil, "deploy/packaging/build.sh", "--package-version", tc.describe)); got != tc.version {
				t.Errorf("package version of %s: %q, want %q", tc.describe, got, tc.version)
			}
		})
	}
	if _, err := exec.LookPath("dpkg"); err != nil {
		t.Skip("dpkg not found: the order is not checked")
	}
	lt := func(a, b string) {
		t.Helper()
		if err := exec.Command("dpkg", "--compare-versions", a, "lt", b).Run(); err != nil {
			t.Errorf("dpkg does not sort %s before %s", a, b)
		}
	}
	prev := ""
	for i, tc := range ordered {
		switch {
		case strings.HasSuffix(tc.describe, "-dirty"):
			lt(ordered[i-1].version, tc.version)
		case tc.aside:
			lt(tc.version, "1.2.0~rc.1")
		default:
			if prev != "" {
				lt(prev, tc.version)
			}
			prev = tc.version
		}
	}
}
