package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/fleetmanager/fm/internal/atomicfile"
)

// cmdControl is bin/dss start|stop|status|restart. Its exit code follows
// the LSB: status exits 0 when DSS runs and 3 when it does not.
func cmdControl(args []string) int {
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "usage: dss start|stop|status|restart")
		return 2
	}
	action := args[0]
	fs := flag.NewFlagSet("ctl", flag.ContinueOnError)
	dir := fs.String("d", "", "data directory")
	if err := fs.Parse(args[1:]); err != nil || *dir == "" {
		fmt.Fprintln(os.Stderr, "usage: dss start|stop|status|restart (-d DATA_DIR)")
		return 2
	}
	d := dataDir(*dir)
	var err error
	switch action {
	case "start":
		err = d.start()
	case "stop":
		err = d.stop()
	case "restart":
		if err = d.stop(); err == nil {
			err = d.start()
		}
	case "status":
		if pid, ok := d.runningPID(); ok {
			if d.answers() {
				fmt.Printf("backend                          RUNNING   pid %d, uptime ok\n", pid)
				return 0
			}
			fmt.Printf("backend                          RUNNING   pid %d, not answering\n", pid)
			return 1
		}
		fmt.Println("backend                          STOPPED")
		return 3
	default:
		err = fmt.Errorf("unknown action %q: use start, stop, status or restart", action)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "dss:", err)
		return 1
	}
	return 0
}

func (d dataDir) pidFile() string { return d.path("run", "dss.pid") }

// runningPID returns the pid of this data directory's service, if it runs.
// The process must still be a stand-in serving this directory: a reused pid
// does not count.
func (d dataDir) runningPID() (int, bool) {
	b, err := os.ReadFile(d.pidFile())
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, false
	}
	if syscall.Kill(pid, 0) != nil {
		return 0, false
	}
	cmdline, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
	if err != nil {
		return 0, false
	}
	abs, _ := filepath.Abs(string(d))
	if !bytes.Contains(cmdline, []byte("serve")) || !bytes.Contains(cmdline, []byte(abs)) {
		return 0, false
	}
	// A zombie still answers kill 0.
	if stat, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat")); err == nil {
		if f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:])); len(f) > 0 && f[0] == "Z" {
			return 0, false
		}
	}
	return pid, true
}

func (d dataDir) answers() bool {
	port, _, err := d.settings()
	if err != nil {
		return false
	}
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/api/health", port))
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == 200
}

func (d dataDir) start() error {
	if pid, ok := d.runningPID(); ok {
		fmt.Printf("backend already running (pid %d)\n", pid)
		return nil
	}
	installed, err := d.installedVersion()
	if err != nil {
		return err
	}
	if installed != version {
		return fmt.Errorf("the data directory holds DSS %q but the installed binaries are %s; run installer.sh -u", installed, version)
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	abs, err := filepath.Abs(string(d))
	if err != nil {
		return err
	}
	logf, err := os.OpenFile(d.path("run", "backend.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(exe, "serve", "-d", abs)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own session: DSS outlives the shell (or agent) that started it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	if err := atomicfile.WriteFile(d.pidFile(), []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o644); err != nil {
		_ = cmd.Process.Kill()
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			_ = os.Remove(d.pidFile())
			return fmt.Errorf("backend exited during startup (%v); see %s", err, d.path("run", "backend.log"))
		case <-time.After(100 * time.Millisecond):
		}
		if d.answers() {
			fmt.Printf("backend started (pid %d)\n", cmd.Process.Pid)
			return nil
		}
	}
	_ = cmd.Process.Kill()
	return errors.New("backend did not answer within 60s")
}

func (d dataDir) stop() error {
	pid, ok := d.runningPID()
	if !ok {
		_ = os.Remove(d.pidFile())
		fmt.Println("backend not running")
		return nil
	}
	_ = syscall.Kill(pid, syscall.SIGTERM)
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if _, ok := d.runningPID(); !ok {
			_ = os.Remove(d.pidFile())
			fmt.Println("backend stopped")
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	time.Sleep(200 * time.Millisecond)
	_ = os.Remove(d.pidFile())
	fmt.Println("backend killed after 20s")
	return nil
}
