package local

import (
	"errors"
	"os"
	"os/exec"
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

// waitRunning waits until no thread of pid is stopped.
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
	_, _, err := b.paused("in-a", func() error {
		_ = syscall.Kill(pid, syscall.SIGCONT)
		if !waitRunning(pid) {
			t.Error("the process did not resume")
		}
		return nil
	})
	if protocol.CodeOf(err) != protocol.CodeUnavailable {
		t.Fatalf("a resume during the pause gave %v, want Unavailable", err)
	}
}

// TestNewResumesOnlyMachinesLeftPaused: a provisioner killed during a
// pause leaves its marker, and the next backend resumes that machine; a
// machine stopped without a marker (by an operator, or paused by another
// provisioner on the same folder just now) is left alone.
func TestNewResumesOnlyMachinesLeftPaused(t *testing.T) {
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
	if _, err := New(Config{Dir: dir, AgentBinary: "fm", NATSURL: "nats://127.0.0.1:1"}); err != nil {
		t.Fatal(err)
	}
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
