package cmdline

import (
	"bufio"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// TestHelperProcess is not a test: it is the process the tests start, a copy
// of the test binary that sleeps (ignoring SIGTERM if asked) and never forks.
func TestHelperProcess(t *testing.T) {
	switch os.Getenv("CMDLINE_HELPER") {
	case "":
		return
	case "stubborn":
		signal.Ignore(syscall.SIGTERM)
	}
	os.Stdout.WriteString("ready\n")
	time.Sleep(time.Minute)
	os.Exit(0)
}

func helper(t *testing.T, mode, marker string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "--", marker)
	cmd.Env = append(os.Environ(), "CMDLINE_HELPER="+mode)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	// Wait until it is ready (its signal handling set up).
	if _, err := bufio.NewReader(out).ReadString('\n'); err != nil {
		t.Fatalf("helper: %v", err)
	}
	go cmd.Wait()
	return cmd
}

func TestFindAndStop(t *testing.T) {
	marker := filepath.Join(t.TempDir(), "unique-marker")
	polite := helper(t, "polite", marker+"-polite")
	stubborn := helper(t, "stubborn", marker+"-stubborn")
	var pids []int
	deadline := time.Now().Add(5 * time.Second)
	for len(pids) < 2 && time.Now().Before(deadline) {
		pids = Find(marker)
		time.Sleep(20 * time.Millisecond)
	}
	if len(pids) != 2 {
		t.Fatalf("found %v, want the two helpers %d and %d", pids, polite.Process.Pid, stubborn.Process.Pid)
	}
	if got := Find(marker, "stubborn"); len(got) != 1 || got[0] != stubborn.Process.Pid {
		t.Fatalf("narrowed search found %v", got)
	}
	if killed := Stop(pids, 500*time.Millisecond); killed != 1 {
		t.Fatalf("killed %d, want 1 (the one ignoring SIGTERM)", killed)
	}
	if left := Find(marker); len(left) != 0 {
		t.Fatalf("still running: %v", left)
	}
	if Matches(os.Getpid(), marker) {
		t.Fatal("a process matches what its command line does not hold")
	}
}

// TestWaitStopped: every thread of a process is seen stopped only once it
// has taken its SIGSTOP, and no longer after SIGCONT.
func TestWaitStopped(t *testing.T) {
	pid := helper(t, "polite", filepath.Join(t.TempDir(), "stopped-marker")).Process.Pid
	if WaitStopped(pid, 50*time.Millisecond) {
		t.Fatal("a running process is seen stopped")
	}
	if len(Running(pid)) == 0 {
		t.Fatal("a running process has no running thread")
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	if !WaitStopped(pid, 5*time.Second) {
		t.Fatal("a stopped process is not seen stopped")
	}
	if r := Running(pid); len(r) != 0 {
		t.Fatalf("a stopped process has running threads: %v", r)
	}
	if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for allStopped(pid) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if allStopped(pid) {
		t.Fatal("a resumed process is still seen stopped")
	}
	if !WaitStopped(1<<22+7, 0) {
		t.Fatal("a process gone is not taken as stopped")
	}
}
