package local

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/fleetmanager/fm/protocol"
)

// fakeMachine starts a process that the backend takes for the agent of
// inst's machine (its command line names the machine's agent config), and
// stops it at the end of the test.
func fakeMachine(t *testing.T, b *Backend, inst string) int {
	t.Helper()
	cmd := exec.Command("sh", "-c", "while :; do sleep 1; done", "agent", b.configPath(inst))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = syscall.Kill(cmd.Process.Pid, syscall.SIGCONT)
		_ = cmd.Wait()
	})
	return cmd.Process.Pid
}

// waitRunning waits until a thread of pid runs (is not stopped).
func waitRunning(pid int) bool {
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if len(cmdline.Running(pid)) > 0 {
			return true
		}
		time.Sleep(5 * time.Millisecond)
	}
	return false
}

// TestPausedStopsAndResumes: fn runs with the machine's processes
// stopped; they run again afterwards, and no pause marker is left.
func TestPausedStopsAndResumes(t *testing.T) {
	b := &Backend{cfg: Config{Dir: t.TempDir()}}
	pid := fakeMachine(t, b, "in-a")
	n, _, err := b.paused("in-a", func() error {
		if !cmdline.WaitStopped(pid, 0) {
			t.Error("the machine runs during the pause")
		}
		if _, err := os.Stat(b.pauseMarker("in-a")); err != nil {
			t.Errorf("no pause marker during the pause: %v", err)
		}
		return nil
	})
	if err != nil || n != 1 {
		t.Fatalf("paused: %d processes, %v", n, err)
	}
	if !waitRunning(pid) {
		t.Fatal("the machine was not resumed")
	}
	if _, err := os.Stat(b.pauseMarker("in-a")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pause marker left: %v", err)
	}
}

// TestPausedNoticesAResume: a machine resumed by someone else while it
// was being archived gives no archive of one point in time, so the
// snapshot is tried again (Unavailable), however fn ended.
func TestPausedNoticesAResume(t *testing.T) {
	b := &Backend{cfg: Config{Dir: t.TempDir()}}
	pid := fakeMachine(t, b, "in-a")
	ran := false
	_, _, err := b.paused("in-a", func() error {
		ran = true
		_ = syscall.Kill(pid, syscall.SIGCONT)
		if !waitRunning(pid) {
			t.Error("the process did not resume")
		}
		return nil
	})
	if !ran || protocol.CodeOf(err) != protocol.CodeUnavailable || !strings.Contains(err.Error(), "resumed by something else") {
		t.Fatalf("a resume during the pause (pass run: %v) gave %v, want Unavailable, resumed by something else", ran, err)
	}
}

// TestTakeOverResumesOnlyMachinesLeftPaused: a provisioner killed during
// a pause leaves its marker; a backend made (a standby starting) resumes
// nothing, and the one whose provisioner takes the lease resumes that
// machine. A machine stopped without a marker (by an operator) is left
// alone.
func TestTakeOverResumesOnlyMachinesLeftPaused(t *testing.T) {
	dir := t.TempDir()
	b := &Backend{cfg: Config{Dir: dir}}
	left := fakeMachine(t, b, "in-left")
	other := fakeMachine(t, b, "in-other")
	for _, pid := range []int{left, other} {
		if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		if !cmdline.WaitStopped(pid, 5*time.Second) {
			t.Fatal("not stopped")
		}
	}
	if err := os.MkdirAll(dir+"/paused", 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(b.pauseMarker("in-left"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	standby, err := New(Config{Dir: dir, AgentBinary: "fm", NATSURL: "nats://127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	if !cmdline.WaitStopped(left, 0) {
		t.Fatal("a backend only made, not taking over, resumed a machine")
	}
	standby.TakeOver(context.Background())
	if !waitRunning(left) {
		t.Fatal("the machine left paused was not resumed")
	}
	if _, err := os.Stat(b.pauseMarker("in-left")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pause marker left after the resume: %v", err)
	}
	if !cmdline.WaitStopped(other, 0) {
		t.Fatal("a machine stopped without a pause marker was resumed")
	}
}
