package e2e

import (
	"context"
	"encoding/hex"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/agent"
	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// agentMachine runs `fm agent` for one instance against a test bus.
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
	if err := agent.WriteConfigFile(cfgFile, agent.Config{Instance: m.instance, NATSURL: srv.URL(),
		RootDir: m.root, DataDir: m.data, PackageManager: "none"}); err != nil {
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
	kv, _ := m.js.KeyValue(context.Background(), protocol.BucketDesired)
	if _, err := kv.Put(context.Background(), m.instance, data); err != nil {
		t.Fatal(err)
	}
}

func (m *agentMachine) waitReady(t testing.TB, gen uint64) protocol.AgentStatus {
	t.Helper()
	kv, _ := m.js.KeyValue(context.Background(), protocol.BucketAgents)
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
	bin := fmBin(t)
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
	// Bad configuration: a clear error and exit status 2.
	_, errOut, code := Run(t, bin, nil, "agent", "--instance", "bad.id", "--nats-url", "nats://127.0.0.1:1", "--root", "relative", "--data", "/tmp")
	if code != 2 || !strings.Contains(errOut, "not a valid instance id") || !strings.Contains(errOut, "absolute path") {
		t.Fatalf("bad config: exit %d: %s", code, errOut)
	}
}

// BenchmarkAgentIdle measures what an idle agent (DSS running, heartbeats
// every 10s, checks every 10s) costs its machine: resident memory and CPU,
// over a minute. Run it with:
//
//	go test -run '^$' -bench AgentIdle -benchtime 1x ./e2e/
func BenchmarkAgentIdle(b *testing.B) {
	bin := fmBinPlain(b)
	m := startAgentMachine(b, bin)
	m.desire(b, 1, filepath.Join(buildDir, "plain", "kits", "dataiku-dss-14.0.0-standin.tar.gz"))
	m.waitReady(b, 1)
	pid := m.proc.cmd.Process.Pid
	time.Sleep(10 * time.Second) // let the startup settle
	cpu0, at0 := cpuTicks(b, pid), time.Now()
	idle := 60 * time.Second
	time.Sleep(idle)
	cpu1, at1 := cpuTicks(b, pid), time.Now()
	rss := rssKiB(b, pid)
	b.ReportMetric(float64(rss)/1024, "RSS-MiB")
	b.ReportMetric(float64(cpu1-cpu0)/100/at1.Sub(at0).Seconds()*100, "CPU-%")
	_ = m.proc.Interrupt(15 * time.Second)
}

// cpuTicks is utime+stime of a process, in clock ticks (1/100 s).
func cpuTicks(tb testing.TB, pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		tb.Fatal(err)
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	u, _ := strconv.ParseInt(f[11], 10, 64)
	s, _ := strconv.ParseInt(f[12], 10, 64)
	return u + s
}

func rssKiB(tb testing.TB, pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		tb.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			n, _ := strconv.ParseInt(strings.Fields(line)[1], 10, 64)
			return n
		}
	}
	return 0
}

func sha256Hex(b []byte) string {
	return hex.EncodeToString(sha256Sum(b))
}
