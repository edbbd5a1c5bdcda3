// Package cmdline finds processes by what their command line contains, and
// stops them, reading /proc (Linux). The agent uses it to find DSS's
// processes in its data directory, the local backend to find a machine's
// processes. Only this module's packages may import it (it is internal).
package cmdline

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Find returns the live processes (zombies excluded, and never this one)
// whose command line contains every one of the substrings.
func Find(substrings ...string) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	self := os.Getpid()
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		if Matches(pid, substrings...) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// Matches reports whether pid is alive, not a zombie, and its command line
// contains every substring.
func Matches(pid int, substrings ...string) bool {
	line, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
	if err != nil {
		return false
	}
	for _, s := range substrings {
		if !bytes.Contains(line, []byte(s)) {
			return false
		}
	}
	state := procState(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	return state != "" && state != "Z"
}

// procState is the state letter in a /proc stat file (R, S, D, T, Z, …),
// or "" if it cannot be read (the process or thread is gone).
func procState(statFile string) string {
	stat, err := os.ReadFile(statFile)
	if err != nil {
		return ""
	}
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return ""
	}
	if f := strings.Fields(string(stat[i+1:])); len(f) > 0 {
		return f[0]
	}
	return ""
}

// Stop sends SIGTERM to the processes and, after grace, SIGKILL to those
// still alive; it waits (a few seconds at most) until they are gone, and
// returns how many it had to kill.
func Stop(pids []int, grace time.Duration) int {
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGTERM)
	}
	alive := func() []int {
		var out []int
		for _, pid := range pids {
			if syscall.Kill(pid, 0) == nil && !zombie(pid) {
				out = append(out, pid)
			}
		}
		return out
	}
	deadline := time.Now().Add(grace)
	for len(alive()) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	left := alive()
	for _, pid := range left {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	deadline = time.Now().Add(5 * time.Second)
	for len(alive()) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	return len(left)
}

func zombie(pid int) bool {
	state := procState(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	return state == "" || state == "Z"
}

// WaitStopped waits, for at most timeout, until every thread of pid is
// stopped (state T or t) after a SIGSTOP, which kill only asks for. It says
// whether they are; a process gone counts as stopped.
func WaitStopped(pid int, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for {
		if allStopped(pid) {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(time.Millisecond)
	}
}

// Running describes the threads of pid that are not stopped: each one's
// id, state letter, the kernel function it waits in (wchan, where the
// kernel shows it) and its name, for an error that says why a pause did
// not take.
func Running(pid int) []string {
	dir := filepath.Join("/proc", strconv.Itoa(pid), "task")
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	var out []string
	for _, t := range tasks {
		state := procState(filepath.Join(dir, t.Name(), "stat"))
		if holdsStill(state) {
			continue
		}
		wchan, _ := os.ReadFile(filepath.Join(dir, t.Name(), "wchan"))
		comm, _ := os.ReadFile(filepath.Join(dir, t.Name(), "comm"))
		out = append(out, "thread "+t.Name()+" ("+strings.TrimSpace(string(comm))+") in state "+state+" waiting in "+string(wchan))
	}
	return out
}

func allStopped(pid int) bool {
	tasks, err := os.ReadDir(filepath.Join("/proc", strconv.Itoa(pid), "task"))
	if err != nil {
		return true // gone
	}
	for _, t := range tasks {
		if !holdsStill(procState(filepath.Join("/proc", strconv.Itoa(pid), "task", t.Name(), "stat"))) {
			return false
		}
	}
	return true
}

// holdsStill says whether a thread in state runs no more: ended, stopped,
// or dying.
func holdsStill(state string) bool {
	switch state {
	case "", "T", "t", "Z", "X":
		return true
	}
	return false
}
