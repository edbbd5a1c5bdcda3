package e2e

import (
	"context"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fleetmanager/fm/agent"
	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/fleetmanager/fm/internal/fleetsim"
	"github.com/fleetmanager/fm/internal/tarball"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// agentMachine runs an agent binary (`fm agent`, or the slim build's
// `fm-agent agent`) for one instance against a test bus.
type agentMachine struct {
	bus      *bustest.Server
	js       jetstream.JetStream
	instance string
	root     string
	data     string
	proc     *Proc
}

func startAgentMachine(t testing.TB, bin string) *agentMachine {
	t.Helper()
	srv := bustest.Run(t)
	m := &agentMachine{bus: srv, js: srv.JetStream(t), instance: "in-e2eagent", root: t.TempDir(), data: t.TempDir()}
	cfgFile := filepath.Join(m.root, "etc", "fm-agent.json")
	me, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	if err := agent.WriteConfigFile(cfgFile, agent.Config{Instance: m.instance, NATSURL: srv.URL(),
		RootDir: m.root, DataDir: m.data, PackageManager: "none", DSSUser: me.Username}); err != nil {
		t.Fatal(err)
	}
	m.proc = Start(t, bin, nil, "agent", "--config", cfgFile, "--log-format", "json")
	t.Cleanup(func() { stopDSS(m.data) })
	return m
}

// stopDSS stops a stand-in left running in a data volume.
func stopDSS(data string) {
	dss := filepath.Join(data, "dataiku", "dss_data", "bin", "dss")
	if _, err := os.Stat(dss); err == nil {
		_, _, _ = runQuiet(dss, "stop")
	}
}

func (m *agentMachine) desire(t testing.TB, gen uint64, kitPath string) {
	t.Helper()
	sum, err := os.ReadFile(kitPath)
	if err != nil {
		t.Fatal(err)
	}
	d := &protocol.DesiredState{Instance: m.instance, Generation: gen, NodeType: "design", HeartbeatSeconds: 10,
		DSS: protocol.DSSTarget{Version: "14.0.0", Port: freePortInt(t), Kit: protocol.KitSource{Path: kitPath, SHA256: sha256Hex(sum)}}}
	data, err := protocol.Encode(d)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := m.js.KeyValue(context.Background(), protocol.BucketDesired)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(context.Background(), m.instance, data); err != nil {
		t.Fatal(err)
	}
}

func (m *agentMachine) waitReady(t testing.TB, gen uint64) protocol.AgentStatus {
	t.Helper()
	kv, err := m.js.KeyValue(context.Background(), protocol.BucketAgents)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		if e, err := kv.Get(context.Background(), m.instance); err == nil {
			var st protocol.AgentStatus
			if protocol.Decode(e.Value(), &st) == nil && st.Phase == protocol.PhaseReady && st.Generation == gen {
				return st
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("the agent never reached generation %d", gen)
	return protocol.AgentStatus{}
}

func TestAgentProcess(t *testing.T) {
	bin := AgentBin(fmBin(t)) // the slim build, as machines run it
	m := startAgentMachine(t, bin)
	m.desire(t, 1, filepath.Join(buildDir, "kits", "dataiku-dss-14.0.0-standin.tar.gz"))
	st := m.waitReady(t, 1)
	if st.DSS.State != protocol.DSSRunning || st.AgentVersion == "" {
		t.Fatalf("%+v", st)
	}
	if err := m.proc.Interrupt(15 * time.Second); err != nil {
		t.Fatalf("fm agent exited with %v after SIGINT", err)
	}
	if !strings.Contains(m.proc.Stderr(), `"message":"agent stopped"`) {
		t.Fatalf("no clean stop in the log:\n%s", m.proc.Stderr())
	}
	// Bad configuration: a clear error and exit status 2, from both builds.
	for _, b := range []string{bin, fmBin(t)} {
		_, errOut, code := Run(t, b, nil, "agent", "--instance", "bad.id", "--nats-url", "nats://127.0.0.1:1", "--root", "relative", "--data", "/tmp")
		if code != 2 || !strings.Contains(errOut, "not a valid instance id") || !strings.Contains(errOut, "absolute path") {
			t.Fatalf("%s: bad config: exit %d: %s", filepath.Base(b), code, errOut)
		}
		_, errOut, code = Run(t, b, nil, "agent", "stray")
		if code != 2 || !strings.Contains(errOut, `takes no arguments (got "stray")`) {
			t.Fatalf("%s: a stray argument: exit %d: %s", filepath.Base(b), code, errOut)
		}
	}
	// The slim build runs nothing but the agent. Both name the commit they
	// were built from, when the checkout has its history.
	out, errOut, code := Run(t, bin, nil, "version")
	if code != 0 || !strings.Contains(out, "agent build") {
		t.Fatalf("fm-agent version: exit %d: %s%s", code, out, errOut)
	}
	commit := "commit unknown"
	if head, err := exec.Command("git", "rev-parse", "HEAD").Output(); err == nil {
		commit = "commit " + strings.TrimSpace(string(head)) + ", committed 20"
	}
	for _, b := range []string{bin, fmBin(t)} {
		if out, _, code := Run(t, b, nil, "version"); code != 0 || !strings.Contains(out, commit) {
			t.Fatalf("%s version: exit %d: %q, want %q", filepath.Base(b), code, out, commit)
		}
	}
	if _, errOut, code := Run(t, bin, nil, "instance", "list"); code != 2 || !strings.Contains(errOut, "not a command of the agent build") {
		t.Fatalf("fm-agent instance list: exit %d: %s", code, errOut)
	}
}

// BenchmarkAgentIdle measures what an idle agent (DSS running, heartbeats
// every 10s, checks every 10s) costs its machine: resident memory and CPU,
// over a minute (FM_BENCH_IDLE_SECONDS: CI's smoke run takes 5). Run it
// with:
//
//	go test -run '^$' -bench AgentIdle -benchtime 1x ./e2e/
func BenchmarkAgentIdle(b *testing.B) {
	window := 60 * time.Second
	if v := os.Getenv("FM_BENCH_IDLE_SECONDS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			b.Fatalf("FM_BENCH_IDLE_SECONDS=%q", v)
		}
		window = time.Duration(n) * time.Second
	}
	for _, bc := range []struct{ name, bin string }{
		{"fm-agent", AgentBin(fmBinPlain(b))}, // the slim build machines run
		{"fm", fmBinPlain(b)},                 // the one binary, for the ratio
	} {
		b.Run(bc.name, func(b *testing.B) {
			m := startAgentMachine(b, bc.bin)
			m.desire(b, 1, filepath.Join(buildDir, "plain", "kits", "dataiku-dss-14.0.0-standin.tar.gz"))
			m.waitReady(b, 1)
			pid := m.proc.cmd.Process.Pid
			time.Sleep(10 * time.Second) // let the startup settle
			u0, err := fleetsim.ProcessUsage(pid)
			if err != nil {
				b.Fatal(err)
			}
			at0 := time.Now()
			time.Sleep(window)
			u1, err := fleetsim.ProcessUsage(pid)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(u1.RSS)/(1<<20), "RSS-MiB")
			b.ReportMetric((u1.CPU-u0.CPU).Seconds()/time.Since(at0).Seconds()*100, "CPU-%")
			_ = m.proc.Interrupt(15 * time.Second)
		})
	}
}

func sha256Hex(b []byte) string {
	return hex.EncodeToString(sha256Sum(b))
}

// agentStatus is the agent's last status in fm_agents.
func (m *agentMachine) status(t testing.TB) (protocol.AgentStatus, bool) {
	t.Helper()
	var st protocol.AgentStatus
	kv, err := m.js.KeyValue(context.Background(), protocol.BucketAgents)
	if err != nil {
		t.Fatal(err)
	}
	e, err := kv.Get(context.Background(), m.instance)
	if err != nil {
		return st, false
	}
	return st, protocol.Decode(e.Value(), &st) == nil
}

// restartAgent starts the machine's agent again (after it was killed).
func (m *agentMachine) restartAgent(t testing.TB, bin string) {
	t.Helper()
	m.proc = Start(t, bin, nil, "agent", "--config", filepath.Join(m.root, "etc", "fm-agent.json"), "--log-format", "json")
}

func (m *agentMachine) dssPort(t testing.TB) int {
	st, _ := m.status(t)
	return st.DSS.Port
}

// TestAKilledAgentLeavesDSSServing: DSS does not live in the agent's
// process group (nor, with systemd, in its unit): an agent killed with
// SIGKILL leaves DSS answering, and the next agent adopts it rather than
// starting another.
func TestAKilledAgentLeavesDSSServing(t *testing.T) {
	bin := AgentBin(fmBin(t))
	m := startAgentMachine(t, bin)
	m.desire(t, 1, filepath.Join(buildDir, "kits", "dataiku-dss-14.0.0-standin.tar.gz"))
	m.waitReady(t, 1)
	port := m.dssPort(t)
	dssDir := filepath.Join(m.data, "dataiku", "dss_data")
	before := cmdline.Find(dssDir, "serve")
	if len(before) != 1 {
		t.Fatalf("%d DSS processes", len(before))
	}
	if err := syscall.Kill(m.proc.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-m.proc.done
	// DSS keeps answering, for a second at least, with no agent at all.
	client := &http.Client{Timeout: 5 * time.Second}
	for i := 0; i < 10; i++ {
		resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/api/health", port))
		if err != nil {
			t.Fatalf("DSS stopped answering when its agent was killed: %v", err)
		}
		resp.Body.Close()
		time.Sleep(100 * time.Millisecond)
	}
	restarted := time.Now()
	m.restartAgent(t, bin)
	deadline := time.Now().Add(time.Minute)
	for {
		st, ok := m.status(t)
		if ok && st.Time.After(restarted) && st.Phase == protocol.PhaseReady && st.DSS.State == protocol.DSSRunning {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the new agent never reported DSS running: %+v", st)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if after := cmdline.Find(dssDir, "serve"); len(after) != 1 || after[0] != before[0] {
		t.Fatalf("DSS processes before %v, after %v: the new agent did not adopt the running DSS", before, after)
	}
}

// slowKit is the stand-in kit whose installer takes a few seconds first.
func slowKit(t *testing.T) string {
	t.Helper()
	src := filepath.Join(buildDir, "kits", "dataiku-dss-14.0.0-standin.tar.gz")
	dir := t.TempDir()
	f, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := tarball.Extract(f, dir, tarball.Options{ConfineLinks: true, Folder: "kit"}); err != nil {
		t.Fatal(err)
	}
	top := filepath.Join(dir, "dataiku-dss-14.0.0-standin")
	if err := os.Rename(filepath.Join(top, "installer.sh"), filepath.Join(top, "installer-real.sh")); err != nil {
		t.Fatal(err)
	}
	// It records when each run starts and ends beside the kit.
	slow := `#!/bin/sh
# The stand-in's installer, slowed down (e2e: an agent is killed while it runs).
log="$(dirname "$0")/../runs.log"
echo "start $$" >>"$log"
sleep 4
"$(dirname "$0")/installer-real.sh" "$@"
rc=$?
echo "end $$" >>"$log"
exit $rc
`
	if err := os.WriteFile(filepath.Join(top, "installer.sh"), []byte(slow), 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "dataiku-dss-14.0.0-slow.tar.gz")
	w, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if err := tarball.Write(w, dir, tarball.Gzip); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestAnInstallerLeftByAKilledAgentRunsAlone: an agent killed while DSS's
// installer runs leaves the installer running (it is its own process
// group); the next agent waits for it (it holds the install lock) instead
// of starting a second installer on the same data directory, then sees
// what it did.
func TestAnInstallerLeftByAKilledAgentRunsAlone(t *testing.T) {
	bin := AgentBin(fmBin(t))
	m := startAgentMachine(t, bin)
	m.desire(t, 1, slowKit(t))
	deadline := time.Now().Add(time.Minute)
	for len(cmdline.Find(m.data, "installer.sh")) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the installer never started")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := syscall.Kill(m.proc.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-m.proc.done
	if len(cmdline.Find(m.data, "installer")) == 0 {
		t.Fatal("the installer died with the agent: nothing to test")
	}
	m.restartAgent(t, bin)
	m.waitReady(t, 1)
	// Never two installers at once: each run ended before the next began.
	runs, _ := filepath.Glob(filepath.Join(m.root, "opt", "dataiku", "*", "runs.log"))
	if len(runs) != 1 {
		t.Fatalf("installer run logs: %v", runs)
	}
	b, err := os.ReadFile(runs[0])
	if err != nil {
		t.Fatal(err)
	}
	open := 0
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if strings.HasPrefix(line, "start") {
			open++
		} else {
			open--
		}
		if open > 1 {
			t.Fatalf("two installers ran at once on one data directory:\n%s", b)
		}
	}
	log, err := os.ReadFile(filepath.Join(m.data, "dataiku", "dss_data", "run", "install.log"))
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(log), "installed DSS stand-in"); n != 1 {
		t.Fatalf("DSS was installed %d times:\n%s", n, log)
	}
}
