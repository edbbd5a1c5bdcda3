package agent

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/fleetmanager/fm/protocol"
	"github.com/rs/zerolog"
)

// newIdleAgent is an agent that is not run (no bus): its machine, watchdog
// and commands are driven by the test. change, if set, adjusts its config.
func newIdleAgent(t *testing.T, change func(*Config)) *Agent {
	t.Helper()
	cfg := Config{Instance: "in-idle", NATSURL: "nats://127.0.0.1:1", RootDir: t.TempDir(), DataDir: t.TempDir(),
		PackageManager: "none", ServiceManager: "none", DSSUser: currentUser(t), HealthInterval: 50 * time.Millisecond,
		DSSStartTimeout: time.Second, DSSStopTimeout: time.Second, Logger: zerolog.Nop()}
	if change != nil {
		change(&cfg)
	}
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	a.rep = newReporter(cfg.Instance, "test", nil, nil, time.Second, zerolog.Nop())
	return a
}

// fakeInstalledDSS makes the agent's data directory look installed (DSS
// 14.0.0, reached at generation 1, nothing answering on its port), with a
// bin/dss that only records what it is asked; it returns the record.
func fakeInstalledDSS(t *testing.T, a *Agent) (calls string) {
	t.Helper()
	calls = filepath.Join(t.TempDir(), "calls")
	dss := a.m.dssDir
	for name, content := range map[string]string{
		"dss-version.json": `{"product_version":"14.0.0"}`,
		"install.ini":      fmt.Sprintf("[general]\nnodetype = design\n\n[server]\nport = %d\n", freePort(t)),
		"bin/dss":          "#!/bin/sh\necho \"$@\" >>" + calls + "\n",
	} {
		p := filepath.Join(dss, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.m.saveMarker(marker{Generation: 1}); err != nil {
		t.Fatal(err)
	}
	return calls
}

// startProcess starts /bin/sh running script with args ($0 and on) in a
// process group of its own, handing it files (from descriptor 3), and
// kills the group when the test ends.
func startProcess(t *testing.T, script string, files []*os.File, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("/bin/sh", append([]string{"-c", script}, args...)...)
	cmd.ExtraFiles = files
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_ = cmd.Wait()
	})
	return cmd
}

// sleeper is a script that lives for at most five minutes.
const sleeper = `i=0; while [ $i -lt 3000 ]; do sleep 0.1; i=$((i+1)); done`

// holdInstallLock starts what an agent killed mid-upgrade leaves running:
// DSS's installer, holding the install lock it inherited and naming the
// data directory on its command line (-d).
func holdInstallLock(t *testing.T, m *machine) *exec.Cmd {
	t.Helper()
	lock, err := m.tryLockInstall()
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	return startProcess(t, sleeper, []*os.File{lock}, "installer.sh", "-d", m.dssDir, "-u", "-y")
}

func alive(cmd *exec.Cmd) bool { return cmdline.Matches(cmd.Process.Pid) }

func waitUntil(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("never %s within %s", what, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestNothingTouchesDSSWhileAnInstallerRuns: an agent killed mid-upgrade
// leaves DSS's installer running, holding the install lock, DSS stopped.
// Until it ends, neither the next agent's watchdog nor a command (before
// any convergence takes the machine: the bus may be away) stops or starts
// DSS, nor kills the installer, which names the data directory as DSS
// does; stopping DSS kills only DSS.
func TestNothingTouchesDSSWhileAnInstallerRuns(t *testing.T) {
	command := func(kind protocol.CommandKind) func(t *testing.T, a *Agent) {
		return func(t *testing.T, a *Agent) {
			res := a.runCommand(context.Background(), protocol.Command{ID: "cmd-" + string(kind), Instance: a.cfg.Instance, Kind: kind,
				Params: []byte(`{"userName":"admin","password":"p"}`), Expires: time.Now().Add(500 * time.Millisecond)})
			if res.err == nil || res.err.Code != protocol.CodeUnavailable || !strings.Contains(res.err.Message, "installer still runs") {
				t.Errorf("%s while an installer runs: %+v", kind, res.err)
			}
		}
	}
	tests := []struct {
		name string
		act  func(t *testing.T, a *Agent)
	}{
		{"watchdog", func(t *testing.T, a *Agent) {
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { defer close(done); a.watchdog(ctx) }()
			defer func() { cancel(); <-done }()
			waitUntil(t, "reported installing", 10*time.Second, func() bool {
				return a.rep.currentStatus().DSS.State == protocol.DSSInstalling
			})
			// Long enough for the checks after which DSS would be restarted.
			time.Sleep(3 * unansweredChecks * a.cfg.HealthInterval)
		}},
		{"restart-dss", command(protocol.CommandRestartDSS)},
		{"start-dss", command(protocol.CommandStartDSS)},
		{"stop-dss", command(protocol.CommandStopDSS)},
		{"reset-user-password", command(protocol.CommandResetUserPassword)},
		{"stopping DSS", func(t *testing.T, a *Agent) {
			dss := startProcess(t, sleeper, nil, "dss-serve", "-d", a.m.dssDir)
			a.m.killDSS()
			waitUntil(t, "DSS killed", 5*time.Second, func() bool { return !alive(dss) })
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := newIdleAgent(t, nil)
			calls := fakeInstalledDSS(t, a)
			installer := holdInstallLock(t, a.m)
			tc.act(t, a)
			if !alive(installer) {
				t.Error("the installer was killed")
			}
			if b, _ := os.ReadFile(calls); len(b) > 0 {
				t.Errorf("bin/dss ran beside the installer: %q", b)
			}
		})
	}

	// Once the installer has ended (after half a second), the command runs.
	a := newIdleAgent(t, nil)
	calls := fakeInstalledDSS(t, a)
	lock, err := a.m.tryLockInstall()
	if err != nil {
		t.Fatal(err)
	}
	startProcess(t, "sleep 0.5", []*os.File{lock}, "installer.sh", "-d", a.m.dssDir)
	lock.Close()
	a.runCommand(context.Background(), protocol.Command{ID: "cmd-after", Instance: a.cfg.Instance, Kind: protocol.CommandRestartDSS,
		Expires: time.Now().Add(time.Minute)})
	if b, _ := os.ReadFile(calls); !strings.Contains(string(b), "start") {
		t.Errorf("restart-dss did not start DSS once the installer had ended: bin/dss ran %q", b)
	}
}

// TestLockInstallIsBounded: an installer left running past the install
// timeout is killed and the lock taken; holders that keep coming back
// (something restarts them) are killed again and again, and after a grace
// the step fails saying who holds the lock, instead of waiting for ever
// with the machine held.
func TestLockInstallIsBounded(t *testing.T) {
	tests := []struct {
		name   string
		holder func(t *testing.T, m *machine) *exec.Cmd
		taken  bool
	}{
		{"an installer that dies when killed", holdInstallLock, true},
		{"holders that come back", func(t *testing.T, m *machine) *exec.Cmd {
			path, _ := m.installLockPath()
			cmd := startProcess(t, `i=0; while [ $i -lt 600 ]; do flock "$1" sleep 30; i=$((i+1)); done`, nil, "respawner", path)
			waitUntil(t, "the lock held", 10*time.Second, func() bool {
				lock, err := m.tryLockInstall()
				if lock != nil {
					lock.Close()
				}
				return err == errInstallerRuns
			})
			return cmd
		}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := exec.LookPath("flock"); err != nil && !tc.taken {
				t.Skip("no flock(1)")
			}
			a := newIdleAgent(t, func(c *Config) { c.InstallTimeout = time.Second })
			tc.holder(t, a.m)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			lock, err := a.m.lockInstall(ctx)
			if lock != nil {
				lock.Close()
			}
			switch {
			case tc.taken && err != nil:
				t.Fatalf("the lock was not taken: %v", err)
			case !tc.taken && (err == nil || ctx.Err() != nil || !strings.Contains(err.Error(), "still hold")):
				t.Fatalf("lockInstall: %v (waited until the test's deadline: %v)", err, ctx.Err())
			}
		})
	}
}

// TestTheLicenseOutlivesAnAgentThatStopsDuringTheInstall: the license is
// handed to the installer as a file; an agent that stops returns while the
// installer runs on, and the file stays until the installer has ended.
func TestTheLicenseOutlivesAnAgentThatStopsDuringTheInstall(t *testing.T) {
	a := newIdleAgent(t, nil)
	dir := t.TempDir()
	installer := filepath.Join(dir, "installer.sh")
	script := fmt.Sprintf(`#!/bin/sh
while [ $# -gt 0 ]; do [ "$1" = -l ] && lic=$2; shift; done
echo "$lic" >%[1]s/license-path
touch %[1]s/started
i=0; while [ ! -e %[1]s/go ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done
cat "$lic" >%[1]s/read.tmp 2>&1; mv %[1]s/read.tmp %[1]s/read
`, dir)
	if err := os.WriteFile(installer, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.WriteFile(filepath.Join(dir, "go"), nil, 0o600) }) // the installer ends
	lock, err := a.m.lockInstall(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	a.installLock.Store(lock)
	const license = `{"content":{"licensee":"outlives the agent"}}`
	d := &protocol.DesiredState{Instance: a.cfg.Instance, Generation: 1, NodeType: "design",
		DSS: protocol.DSSTarget{Version: "14.0.0", Port: freePort(t), License: license}}
	ctx, cancel := context.WithCancel(context.Background())
	returned := make(chan error, 1)
	go func() { _, _, err := a.install(ctx, installer, d); returned <- err }()
	waitUntil(t, "the installer started", 10*time.Second, func() bool { _, err := os.Stat(filepath.Join(dir, "started")); return err == nil })
	cancel() // the agent stops
	select {
	case <-returned:
	case <-time.After(10 * time.Second):
		t.Fatal("install did not return when the agent stopped")
	}
	if err := os.WriteFile(filepath.Join(dir, "go"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	var read []byte
	waitUntil(t, "the installer read the license", 10*time.Second, func() bool {
		read, err = os.ReadFile(filepath.Join(dir, "read"))
		return err == nil
	})
	if string(read) != license {
		t.Fatalf("the installer read %q, not the license", read)
	}
	path, _ := os.ReadFile(filepath.Join(dir, "license-path"))
	waitUntil(t, "the license's copy removed", 10*time.Second, func() bool {
		_, err := os.Stat(strings.TrimSpace(string(path)))
		return os.IsNotExist(err)
	})
}
