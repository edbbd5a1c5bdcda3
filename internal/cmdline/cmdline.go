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
	stat, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return false
	}
	if i := bytes.LastIndexByte(stat, ')'); i > 0 {
		if f := strings.Fields(string(stat[i+1:])); len(f) > 0 && f[0] == "Z" {
			return false
		}
	}
	return true
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
	stat, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return true
	}
	i := bytes.LastIndexByte(stat, ')')
	f := strings.Fields(string(stat[i+1:]))
	return len(f) > 0 && f[0] == "Z"
}
