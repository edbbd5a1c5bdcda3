// Package e2e holds end-to-end tests that build the fm binary and run it as
// operators do, driving it with the CLI and with raw HTTP shaped like
// Dataiku's Python client. The harness here builds the binary once and
// starts and stops fm processes; every process it starts is stopped by the
// test that started it.
package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fleetmanager/fm/deploy/standin/kit"
	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Build compiles fm, the slim agent build beside it (fm-agent, which fm dev
// and fm server then use for machines) and the stand-in kits into dir (kits
// in dir/kits, where `fm dev` looks by default) and returns fm's path. Tests
// build with the race detector; benchmarks without, since it changes what
// they measure.
func Build(dir string, race bool) (string, error) {
	return BuildFrom(ModuleRoot(), dir, race)
}

// ModuleRoot is the folder of this checkout's go.mod.
func ModuleRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(filepath.Dir(file))
}

// BuildFrom is Build of the FM source tree at root (another commit's, for
// the upgrade test); its stand-in kits are built from root too.
func BuildFrom(root, dir string, race bool) (string, error) {
	bin := filepath.Join(dir, "fm")
	build := func(out, pkg string, flags ...string) error {
		args := append([]string{"build", "-o", out}, flags...)
		if race {
			args = append(args, "-race")
		}
		cmd := exec.Command("go", append(args, pkg)...)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("build %s: %v\n%s", pkg, err, out)
		}
		return nil
	}
	// The slim agent build first: fm carries its digest, as `make build`
	// stamps it, and uses it only if it is that one.
	// Stamped as make build stamps them: fm version names the commit.
	// Without the toolchain's own record, so that the e2e check of fm
	// version proves the stamp on every machine.
	stamp := commitStamp(root)
	if err := build(AgentBin(bin), "./cmd/fm-agent", "-buildvcs=false", "-ldflags", stamp); err != nil {
		return "", err
	}
	slim, err := os.ReadFile(AgentBin(bin))
	if err != nil {
		return "", err
	}
	if err := build(bin, "./cmd/fm", "-buildvcs=false", "-ldflags", stamp+" -X main.agentSHA256="+hex.EncodeToString(sha256Sum(slim))); err != nil {
		return "", err
	}
	for _, v := range kit.Versions {
		if _, err := kit.Build(root, v, filepath.Join(dir, "kits")); err != nil {
			return "", err
		}
	}
	return bin, nil
}

// commitStamp is the -ldflags that name the checkout's commit and its
// date, as the Makefile sets them; empty outside a git checkout.
func commitStamp(root string) string {
	git := func(args ...string) string {
		cmd := exec.Command("git", args...)
		cmd.Dir = root
		out, err := cmd.Output()
		if err != nil {
			return ""
		}
		return strings.TrimSpace(string(out))
	}
	commit, date := git("rev-parse", "--verify", "-q", "HEAD"), git("-c", "log.showSignature=false", "log", "-1", "--format=%ct", "HEAD")
	if commit == "" || strings.ContainsAny(commit+date, " \t\n") {
		return ""
	}
	return "-X main.commit=" + commit + " -X main.commitDate=" + date
}

// AgentBin is the slim agent build Build put beside the fm binary bin.
func AgentBin(bin string) string { return filepath.Join(filepath.Dir(bin), "fm-agent") }

// Proc is a running fm process.
type Proc struct {
	t      testing.TB
	cmd    *exec.Cmd
	stdout *syncBuffer
	stderr *syncBuffer
	done   chan struct{}
	err    error
}

// syncBuffer is a bytes.Buffer safe for the process's writers and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Start runs bin with args; the process is killed when the test ends if it
// is still running.
func Start(t testing.TB, bin string, env []string, args ...string) *Proc {
	t.Helper()
	return StartIn(t, "", bin, env, args...)
}

// StartIn is Start in the working folder dir ("": the test's).
func StartIn(t testing.TB, dir, bin string, env []string, args ...string) *Proc {
	t.Helper()
	p := &Proc{t: t, stdout: &syncBuffer{}, stderr: &syncBuffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Dir = dir
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = p.stdout, p.stderr
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
		}
		if t.Failed() {
			t.Logf("%s stdout:\n%s\nstderr:\n%s", filepath.Base(bin), p.stdout, tail(p.stderr.String(), 4000))
		}
	})
	return p
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// Stdout is what the process wrote to standard output so far.
func (p *Proc) Stdout() string { return p.stdout.String() }

// WaitStdout polls until the process's standard output contains substr, for
// at most timeout: output goes through a pipe and may lag behind what the
// process has already done.
func (p *Proc) WaitStdout(substr string, timeout time.Duration) string {
	p.t.Helper()
	return p.wait(p.stdout, "standard output", substr, timeout)
}

// WaitStderr is WaitStdout on standard error (where fm's roles log).
func (p *Proc) WaitStderr(substr string, timeout time.Duration) string {
	p.t.Helper()
	return p.wait(p.stderr, "standard error", substr, timeout)
}

func (p *Proc) wait(b *syncBuffer, name, substr string, timeout time.Duration) string {
	p.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		out := b.String()
		if strings.Contains(out, substr) {
			return out
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("%s has no %q after %s:\n%s", name, substr, timeout, tail(out, 4000))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stderr is what the process wrote to standard error so far.
func (p *Proc) Stderr() string { return p.stderr.String() }

// Kill kills the process and its group at once (SIGKILL: nothing of it
// runs after) and waits until it is gone.
func (p *Proc) Kill() {
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

// Pause stops the process (SIGSTOP), not its children: like a machine
// frozen or cut off, it keeps its connections open and does nothing until
// Resume.
func (p *Proc) Pause() { p.Signal(syscall.SIGSTOP) }

// Resume lets a paused process go on (SIGCONT).
func (p *Proc) Resume() { p.Signal(syscall.SIGCONT) }

// Pid is the process's id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Signal sends sig to the process (not its children).
func (p *Proc) Signal(sig os.Signal) { _ = p.cmd.Process.Signal(sig) }

// Wait waits up to timeout for the process to end, and says whether it did.
func (p *Proc) Wait(timeout time.Duration) bool {
	select {
	case <-p.done:
		return true
	case <-time.After(timeout):
		return false
	}
}

// Exited says whether the process has ended.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Interrupt sends SIGINT and waits up to timeout for the process to exit,
// returning its exit error (nil for status 0).
func (p *Proc) Interrupt(timeout time.Duration) error {
	p.t.Helper()
	_ = p.cmd.Process.Signal(os.Interrupt)
	select {
	case <-p.done:
		return p.err
	case <-time.After(timeout):
		p.t.Fatalf("process did not exit within %s of SIGINT", timeout)
		return nil
	}
}

// freePortInt returns a loopback port that was free just now.
func freePortInt(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// runQuiet runs a program and returns its output and exit error.
func runQuiet(name string, args ...string) (string, string, error) {
	var out, errb bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

func sha256Sum(b []byte) []byte {
	s := sha256.Sum256(b)
	return s[:]
}

// StopUnder stops every process whose command line names dir (fm dev,
// the machines' agents, their DSS), as a test's clean-up: the agents
// first, so that none restarts a DSS it sees stopped, then the rest,
// again until none is left (at most 5 rounds).
func StopUnder(dir string) {
	for range 5 {
		cmdline.Stop(cmdline.Find(dir, "agent"), 2*time.Second)
		rest := cmdline.Find(dir)
		if len(rest) == 0 {
			return
		}
		cmdline.Stop(rest, 2*time.Second)
	}
}

// FileSHA256 is the hex SHA-256 of the file at path.
func FileSHA256(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(sha256Sum(b))
}

// handedOut remembers every port FreePort gave in this test binary: the
// kernel may give a port it just freed again, and two processes of one test
// (a cluster's routes) must not be told the same one.
var handedOut = struct {
	sync.Mutex
	ports map[string]bool
}{ports: map[string]bool{}}

// FreePort returns a loopback address with a port that was free just now and
// that FreePort has not returned before in this test binary.
func FreePort(t testing.TB) string {
	t.Helper()
	handedOut.Lock()
	defer handedOut.Unlock()
	for range 1000 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		l.Close()
		if !handedOut.ports[addr] {
			handedOut.ports[addr] = true
			return addr
		}
	}
	t.Fatal("no loopback port that was not handed out already")
	return ""
}

// WaitHTTP polls url until it answers 200, for at most timeout.
func WaitHTTP(t testing.TB, url string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s did not answer 200 within %s", url, timeout)
}

// Run runs bin to completion and returns its stdout, stderr and exit code.
func Run(t testing.TB, bin string, env []string, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run %s %v: %v", bin, args, err)
	}
	return out.String(), errb.String(), code
}

// Python is an HTTP client that sends what Dataiku's Python client sends:
// HTTP Basic on every request and JSON bodies without a Content-Type.
type Python struct {
	Base, KeyID, Secret string
	// Client sends the requests (nil: http.DefaultClient).
	Client *http.Client
}

// NewPython reads the key file of an fm data folder.
func NewPython(t testing.TB, base, keyFile string) *Python {
	t.Helper()
	b, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	var k struct{ ID, Secret string }
	if err := json.Unmarshal(b, &k); err != nil {
		t.Fatal(err)
	}
	return &Python{Base: base, KeyID: k.ID, Secret: k.Secret}
}

// Do sends a request to the tenant path and decodes a JSON answer into out.
func (p *Python) Do(t testing.TB, method, path, body string, out any) int {
	t.Helper()
	code, _, err := p.send(method, path, body, out)
	if err != nil {
		t.Fatal(err)
	}
	return code
}

// Try is Do returning its error (the request not answered, an error
// status with the answer's body, the one clue a failed call leaves, or an
// answer out cannot hold), for goroutines other than the test's.
func (p *Python) Try(method, path, body string, out any) (int, error) {
	code, data, err := p.send(method, path, body, out)
	if err == nil && code >= 400 {
		err = fmt.Errorf("%s %s: %d %s", method, path, code, bytes.TrimSpace(data))
	}
	return code, err
}

// send makes the call and decodes a JSON answer into out.
func (p *Python) send(method, path, body string, out any) (int, []byte, error) {
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, p.Base+"/api/public/tenants/main"+path, rd)
	if err != nil {
		return 0, nil, err
	}
	req.SetBasicAuth(p.KeyID, p.Secret)
	client := p.Client
	if client == nil {
		client = http.DefaultClient
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return resp.StatusCode, data, fmt.Errorf("%s %s: %d %s: %w", method, path, resp.StatusCode, data, err)
		}
	}
	return resp.StatusCode, data, nil
}

// ConnectJetStream connects to url with opts, until the test ends.
func ConnectJetStream(t testing.TB, url string, opts ...nats.Option) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return nc, js
}

// TrustingClient is an HTTP client that trusts the CA file (FM's, for its
// REST API), with a timeout.
func TrustingClient(t testing.TB, caFile string, timeout time.Duration) *http.Client {
	t.Helper()
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(readFile(t, caFile))) {
		t.Fatalf("no certificate in %s", caFile)
	}
	return &http.Client{Timeout: timeout, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}}
}

// readFile returns a file's content, failing the test if it cannot be read.
func readFile(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// WriteJSON writes v as JSON into the file name of dir, and returns its
// path: the input files of fm's commands (--file).
func WriteJSON(t testing.TB, dir, name string, v any) string {
	t.Helper()
	p := filepath.Join(dir, name)
	b, err := json.Marshal(v)
	if err == nil {
		err = os.WriteFile(p, b, 0o600)
	}
	if err != nil {
		t.Fatal(err)
	}
	return p
}
