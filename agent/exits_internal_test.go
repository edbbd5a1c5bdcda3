package agent

import (
	"os/exec"
	"testing"
)

func TestDSSExited(t *testing.T) {
	if dssExited(nil) {
		t.Fatal("no process known: not an exit")
	}
	a, b := exec.Command("sleep", "60"), exec.Command("sleep", "60")
	for _, c := range []*exec.Cmd{a, b} {
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Process.Kill(); _ = c.Wait() })
	}
	pids := []int{a.Process.Pid, b.Process.Pid}
	if dssExited(pids) {
		t.Fatal("both live: not an exit")
	}
	_ = a.Process.Kill()
	_ = a.Wait()
	if dssExited(pids) {
		t.Fatal("one lives: not an exit")
	}
	_ = b.Process.Kill()
	_ = b.Wait()
	if !dssExited(pids) {
		t.Fatal("both gone: an exit")
	}
}
