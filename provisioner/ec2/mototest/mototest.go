// Package mototest starts the moto AWS server (python3 -m moto.server) on a
// loopback port for a test, with AMI, instance type and key pair
// validation on, and stops it when the test ends. Tests of the EC2 backend
// and the e2e tests import it.
package mototest

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Server is a running moto server.
type Server struct {
	// URL is its endpoint, for every service.
	URL string
	// Env holds the AWS variables a process needs to talk to it (fake
	// credentials, no shared config, a region).
	Env []string
}

// Region is the region tests use.
const Region = "us-east-1"

// Run starts moto and waits until it answers. A machine without moto fails
// the test: CI installs it (.ci/run), so it never skips.
func Run(t testing.TB) *Server {
	t.Helper()
	if err := exec.Command("python3", "-c", "import moto.server").Run(); err != nil {
		t.Fatalf("moto is needed (python3 -c 'import moto.server' failed: %v); .ci/run installs it", err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	logPath := filepath.Join(t.TempDir(), "moto.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("python3", "-m", "moto.server", "-H", "127.0.0.1", "-p", strconv.Itoa(port))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "MOTO_ENABLE_AMI_VALIDATION=true", "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION=true",
		"MOTO_ENABLE_KEYPAIR_VALIDATION=true")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start moto: %v", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); logf.Close(); close(done) }()
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
	})
	s := &Server{URL: fmt.Sprintf("http://127.0.0.1:%d", port)}
	s.Env = []string{"AWS_ACCESS_KEY_ID=testing", "AWS_SECRET_ACCESS_KEY=testing", "AWS_SESSION_TOKEN=",
		"AWS_REGION=" + Region, "AWS_CONFIG_FILE=/dev/null", "AWS_SHARED_CREDENTIALS_FILE=/dev/null", "AWS_EC2_METADATA_DISABLED=true"}
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get(s.URL + "/moto-api/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return s
			}
		}
		select {
		case <-done:
			log, _ := os.ReadFile(logPath)
			t.Fatalf("moto exited:\n%s", log)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("moto did not answer on %s within a minute", s.URL)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// SetEnv sets the AWS variables for the rest of the test (an in-process
// backend reads them through the standard credential chain).
func (s *Server) SetEnv(t testing.TB) {
	for _, kv := range s.Env {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
}

// Reset forgets every resource moto holds.
func (s *Server) Reset(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, s.URL+"/moto-api/reset", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("reset moto: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("reset moto: %s", resp.Status)
	}
}
