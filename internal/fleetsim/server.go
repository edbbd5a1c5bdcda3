package fleetsim

import (
	"context"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// serverProc is the `fm server` under measurement, in a process of its
// own with its embedded bus, so that its CPU and memory are its own.
type serverProc struct {
	bin, data string
	args      []string
	restURL   string
	pprofURL  string // Go's profiles of the server, when asked for
	natsURL   string
	cmd       *exec.Cmd
	exited    chan struct{}
	logFile   *os.File
	env       []string // added to the server's environment
}

// freePort is a free port below Linux's ephemeral range (32768 and up):
// the server listens there again when it restarts under the fleet, whose
// thousands of connections take their local ports from that range, and
// could hold the server's own meanwhile.
func freePort() (int, error) {
	for range 1000 {
		port := 20000 + mrand.IntN(12000)
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			continue
		}
		_ = l.Close()
		return port, nil
	}
	return 0, errors.New("no free port below 32000")
}

func startServer(ctx context.Context, cfg Config) (*serverProc, error) {
	bin, dir, syncAlways, heartbeat, profile := cfg.FM, cfg.Dir, cfg.SyncAlways, cfg.HeartbeatSeconds, cfg.ProfileDir != ""
	rest, err := freePort()
	if err != nil {
		return nil, err
	}
	bus, err := freePort()
	if err != nil {
		return nil, err
	}
	s := &serverProc{bin: bin, data: filepath.Join(dir, "fm"),
		restURL: fmt.Sprintf("http://127.0.0.1:%d", rest), natsURL: fmt.Sprintf("nats://127.0.0.1:%d", bus)}
	s.args = []string{"server", "--data", s.data, "--listen", fmt.Sprintf("127.0.0.1:%d", rest),
		"--nats-listen", fmt.Sprintf("127.0.0.1:%d", bus), "--tls=false", "--sync-always=" + strconv.FormatBool(syncAlways),
		"--heartbeat-seconds", strconv.Itoa(heartbeat), "--agent-binary", "none",
		"--default-vpc", "vpc-0be4c4be4c4be4c40", "--default-subnet", "subnet-0be4c4be4c4be4c40", "--default-region", "eu-west-1", "--log-format", "json", "--log-level", "warn"}
	if profile {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		s.pprofURL = fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/", port)
		s.args = append(s.args, "--pprof-addr", fmt.Sprintf("127.0.0.1:%d", port))
	}
	if cfg.ServerMemoryLimit != "" {
		s.env = []string{"GOMEMLIMIT=" + cfg.ServerMemoryLimit}
	}
	if s.logFile, err = os.Create(filepath.Join(dir, "fm-server.log")); err != nil {
		return nil, err
	}
	if err := s.start(ctx); err != nil {
		s.logFile.Close()
		return nil, err
	}
	return s, nil
}

// start runs the process and waits until its REST API answers.
func (s *serverProc) start(ctx context.Context) error {
	cmd := exec.Command(s.bin, s.args...)
	cmd.Env = append(os.Environ(), s.env...)
	cmd.Stdout, cmd.Stderr = s.logFile, s.logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start fm server: %w", err)
	}
	s.cmd, s.exited = cmd, make(chan struct{})
	go func() { _ = cmd.Wait(); close(s.exited) }()
	// A server that starts under 10,000 reconnecting agents takes a while.
	deadline := time.Now().Add(3 * time.Minute)
	for {
		select {
		case <-s.exited:
			return fmt.Errorf("fm server exited at start; see %s", s.logFile.Name())
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("fm server did not answer within 3 minutes; see %s", s.logFile.Name())
		}
		resp, err := http.Get(s.restURL + "/api/public/tenants/main/images")
		if err != nil {
			continue
		}
		resp.Body.Close()
		if _, err := os.Stat(filepath.Join(s.data, "admin-key.json")); err == nil {
			return nil
		}
	}
}

// stop ends the process gracefully (SIGTERM), killing it after a minute.
func (s *serverProc) stop() error {
	if s.cmd == nil {
		return nil
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(time.Minute):
		_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
		<-s.exited
		return errors.New("fm server did not stop within a minute; killed")
	}
	s.cmd = nil
	return nil
}

func (s *serverProc) close() {
	_ = s.stop()
	s.logFile.Close()
}

// Usage is a process's CPU time so far and its resident memory now.
type Usage struct {
	CPU time.Duration
	RSS int64 // bytes
}

// clockTicks is the kernel's USER_HZ, which /proc's times count in: 100 on
// every Linux this runs on.
const clockTicks = 100

// ProcessUsage reads a process's Usage from /proc.
func ProcessUsage(pid int) (Usage, error) {
	var u Usage
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return u, err
	}
	// The command name may hold spaces: fields count from after its ')'.
	f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
	if len(f) < 13 {
		return u, fmt.Errorf("/proc/%d/stat: too few fields", pid)
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	u.CPU = time.Duration(ut+st) * time.Second / clockTicks
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return u, err
	}
	for _, line := range strings.Split(string(status), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			u.RSS = kb << 10
		}
	}
	return u, nil
}

func (s *serverProc) usage() (Usage, error) {
	if s.cmd == nil {
		return Usage{}, errors.New("fm server is not running")
	}
	return ProcessUsage(s.cmd.Process.Pid)
}
