package agent

import (
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/cmdline"
)

// TestDSSExited: DSS has exited when none of its processes is left: a pid
// gone, a zombie (not waited for yet) and a process of another program
// count as gone.
func TestDSSExited(t *testing.T) {
	const dir = "60.4242" // what DSS's processes name: here, sleep's argument
	if dssExited(nil, dir) {
		t.Fatal("no process known: not an exit")
	}
	a, b := exec.Command("sleep", dir), exec.Command("sleep", dir)
	other := exec.Command("sleep", "61")
	for _, c := range []*exec.Cmd{a, b, other} {
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Process.Kill(); _, _ = c.Process.Wait() })
	}
	pids := []int{a.Process.Pid, b.Process.Pid}
	if dssExited(pids, dir) {
		t.Fatal("both live: not an exit")
	}
	_ = a.Process.Kill()
	_, _ = a.Process.Wait()
	if dssExited(pids, dir) {
		t.Fatal("one lives: not an exit")
	}
	// Killed, not waited for: a zombie until the test ends.
	if err := syscall.Kill(b.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); cmdline.Matches(b.Process.Pid, dir); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the killed process never became a zombie")
		}
	}
	if !dssExited(pids, dir) {
		t.Fatal("one gone, one a zombie: an exit")
	}
	if !dssExited([]int{other.Process.Pid}, dir) {
		t.Fatal("a process of another program counts as DSS's")
	}
}
