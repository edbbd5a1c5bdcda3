package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/deploy/standin/kit"
	"github.com/fleetmanager/fm/internal/crashpoint/crashtable"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

var (
	natsServerOnce sync.Once
	natsServerBin  string
	natsServerErr  error
)

// natsServer builds nats-server once per test binary.
func natsServer(t testing.TB) string {
	t.Helper()
	natsServerOnce.Do(func() { natsServerBin, natsServerErr = BuildNATSServer(buildDir) })
	if natsServerErr != nil {
		t.Fatal(natsServerErr)
	}
	return natsServerBin
}

// clusterFM is FM on a three-node NATS cluster: fm server with R3 streams
// and buckets, and a provisioner of local machines, both connected by the
// nodes' URLs.
type clusterFM struct {
	nats      *NATSCluster
	server    *Proc
	prov      *Proc
	env       []string
	bin       string
	tmp       string
	authority string
	data      string // the first server's data folder, whose keys every replica shares
	addr      string // the first server's REST address
	machines  string // the local backend's folder
}

func startClusterFM(t *testing.T, serverArgs ...string) *clusterFM {
	t.Helper()
	bin := fmBin(t)
	tmp := t.TempDir()
	authority := filepath.Join(tmp, "nats-auth")
	conf, errOut, code := Run(t, bin, nil, "nats-config", "--nats-authority", authority)
	if code != 0 {
		t.Fatalf("fm nats-config: exit %d: %s", code, errOut)
	}
	c := &clusterFM{nats: StartNATSCluster(t, natsServer(t), conf), bin: bin, tmp: tmp, authority: authority, data: filepath.Join(tmp, "fm")}
	c.addr = FreePort(t)
	c.server = c.startServer(t, c.data, c.addr, serverArgs...)
	c.env = c.envOf(c.addr)
	c.machines = filepath.Join(tmp, "machines")
	t.Cleanup(func() { StopUnder(c.machines) })
	c.prov = c.startProvisioner(t)
	return c
}

// startServer starts an fm server on the cluster, with its data folder in
// data, serving at addr (host:port); args are more flags. Replicas after the
// first share its keys: the one that seals secrets, the TLS certificate and
// the admin key (each would make its own otherwise).
func (c *clusterFM) startServer(t *testing.T, data, addr string, args ...string) *Proc {
	t.Helper()
	args = append([]string{"server", "--data", data, "--listen", addr, "--nats-url", c.nats.URLs(),
		"--nats-authority", c.authority, "--nats-ca", c.nats.CA, "--replicas", "3", "--heartbeat-seconds", "1",
		"--default-vpc", "vpc-local", "--default-subnet", "subnet-local", "--default-region", "local"}, args...)
	if data != c.data {
		tls := filepath.Join(c.data, "tls")
		args = append(args, "--secret-key-file", filepath.Join(c.data, "secrets.key"), "--admin-key-file", filepath.Join(c.data, "admin-key.json"),
			"--tls-cert", filepath.Join(tls, "server.pem"), "--tls-key", filepath.Join(tls, "server-key.pem"), "--tls-ca", filepath.Join(tls, "ca.pem"))
	}
	p := Start(t, c.bin, nil, args...)
	p.WaitStdout("REST API https://"+addr, 90*time.Second)
	return p
}

// envOf is the CLI's environment for the server (or load balancer) at addr.
func (c *clusterFM) envOf(addr string) []string {
	return []string{"FM_URL=https://" + addr, "FM_KEY_FILE=" + filepath.Join(c.data, "admin-key.json"),
		"FM_CA_FILE=" + filepath.Join(c.data, "tls", "ca.pem")}
}

// startProvisioner starts a provisioner of local machines in the cluster's
// machine folder (several share it: they stand for provisioners on one
// cloud, one active at a time).
func (c *clusterFM) startProvisioner(t *testing.T) *Proc {
	t.Helper()
	creds := filepath.Join(c.tmp, "provisioner.creds")
	if _, err := os.Stat(creds); err != nil {
		c.fm(t, "nats-creds", "--role", "provisioner", "-o", creds)
	}
	p := Start(t, c.bin, nil, "provisioner", "--backend", "local", "--dir", c.machines, "--nats-url", c.nats.URLs(),
		"--nats-creds", creds, "--nats-ca", c.nats.CA, "--secret-key-file", filepath.Join(c.data, "secrets.key"),
		"--metrics-addr", "127.0.0.1:0")
	p.WaitStdout("local backend", 30*time.Second)
	return p
}

// scrapeProvisioner reads the metrics of a provisioner startProvisioner
// started, at the address it printed.
func scrapeProvisioner(t *testing.T, p *Proc) string {
	t.Helper()
	out := p.WaitStdout("/metrics", 10*time.Second)
	i := strings.Index(out, "http://")
	j := strings.Index(out[i:], "/metrics")
	resp, err := http.Get(out[i:i+j] + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func (c *clusterFM) fm(t *testing.T, args ...string) string {
	t.Helper()
	return c.fmAt(t, c.env, args...)
}

// fmAt runs the CLI with env (the server it talks to), failing the test
// unless it succeeds.
func (c *clusterFM) fmAt(t *testing.T, env []string, args ...string) string {
	t.Helper()
	out, errOut, code := Run(t, c.bin, env, args...)
	if code != 0 {
		t.Fatalf("fm %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

// newInstance registers the stand-in DSS 14 kit as an image, and creates a
// network, a template and an instance of it.
func (c *clusterFM) newInstance(t *testing.T, label string) string {
	t.Helper()
	tmp := t.TempDir()
	write := func(name string, v any) string { return WriteJSON(t, tmp, name, v) }
	kitPath := filepath.Join(filepath.Dir(c.bin), "kits", kit.FileName("14.0.0"))
	c.fm(t, "image", "add", "--file", write("image.json", map[string]any{"id": "dss-14-" + label, "label": "DSS 14 " + label,
		"dssVersion": "14.0.0", "kit": map[string]string{"path": kitPath}}))
	vn := jsonField(t, c.fm(t, "network", "create", "--label", label+"-net", "--default", "--output", "json"), "id")
	tpl := jsonField(t, c.fm(t, "template", "create", "--label", label+"-tpl", "--output", "json"), "id")
	return jsonField(t, c.fm(t, "instance", "create", "--label", label, "--network", vn, "--template", tpl,
		"--image", "dss-14-"+label, "--output", "json"), "id")
}

// TestNATSNodeLossLosesNothing runs FM on three NATS nodes and kills a node
// (SIGKILL; each node in turn with FM_CRASH_FULL=1) with an instance running: while a node is down,
// FM's roles and the agent carry on through the other two (operations
// started then complete, a command reaches the agent and its answer comes
// back), and the node, started again, catches up. Every stream and bucket
// is on three nodes, every operation ends once and succeeds, and the audit
// trail holds each request made.
func TestNATSNodeLossLosesNothing(t *testing.T) {
	c := startClusterFM(t)
	in := c.newInstance(t, "c1")
	var ops []string // the test's own journal: every operation it started
	run := func(args ...string) {
		t.Helper()
		start := time.Now()
		out := c.fm(t, append(args, "--wait", "--output", "json")...)
		ops = append(ops, jsonField(t, out, "jobId"))
		t.Logf("  %s: %s", args[1], time.Since(start).Round(time.Millisecond))
	}
	run("instance", "provision", in)
	c.tryToStallTheStreams(t, in)
	start := time.Now()
	run("instance", "restart-dss", in)
	run("instance", "stop", in)
	run("instance", "start", in)
	t.Logf("no node down: three operations in %s", time.Since(start).Round(time.Millisecond))
	// CI kills the node leading FM_OPS's bucket (its stream then elects a
	// leader with operations under way); FM_CRASH_FULL=1 kills each node
	// in turn.
	kill := []int{c.leaderOf(t, "KV_"+protocol.BucketOps)}
	if crashtable.Full() {
		kill = []int{0, 1, 2}
	}
	for _, i := range kill {
		c.nats.Kill(i)
		down := time.Now()
		run("instance", "restart-dss", in)
		run("instance", "stop", in)
		run("instance", "start", in)
		t.Logf("%s down: three operations in %s", c.nats.Nodes[i].Name, time.Since(down).Round(time.Millisecond))
		c.nats.Start(i)
		took := c.nats.WaitHealthy(i, 2*time.Minute)
		t.Logf("%s back and current in %s", c.nats.Nodes[i].Name, took.Round(time.Millisecond))
	}
	c.checkInstanceRunning(t, in)
	c.checkSucceeded(t, ops)
	n := 1 + len(kill)
	c.checkAudit(t, map[string]int{"provision": 1, "restart-dss": n, "stop": n, "start": n})
	c.checkRanOnce(t, in, ops, "restart-dss", n)
	c.checkReplicas(t)
	c.checkEvents(t, ops)
	c.checkReport(t)
}

// leaderOf is the index of the node leading stream name.
func (c *clusterFM) leaderOf(t *testing.T, name string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := c.adminJS(t).Stream(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i, n := range c.nats.Nodes {
		if info.Cluster != nil && n.Name == info.Cluster.Leader {
			return i
		}
	}
	t.Fatalf("stream %s has no leader among the nodes: %+v", name, info.Cluster)
	return 0
}

// tryToStallTheStreams does what a compromised agent could do to stall a
// stream of three replicas for good (docs/security.md): with the
// credentials instance in's machine holds, it stores on each subject an
// agent stores on a message whose Nats-Expected-Last-Msg-Id does not match.
// The relay in fm server drops the header: each is stored, every stream
// keeps a leader and its replicas (checkReplicas), and what the test does
// next goes through them. The messages are harmless: an event and a log
// line that do not decode, the agent's own status again. (FM_DIAG takes
// chunks only for a collect-diagnosis under way, through the same relay.)
func (c *clusterFM) tryToStallTheStreams(t *testing.T, in string) {
	t.Helper()
	creds := filepath.Join(t.TempDir(), "agent.creds")
	if err := os.WriteFile(creds, machineCreds(t, filepath.Join(c.machines, "machines"), in), 0o600); err != nil {
		t.Fatal(err)
	}
	_, js := ConnectJetStream(t, c.nats.URLs(), nats.UserCredentials(creds), nats.RootCAs(c.nats.CA),
		nats.CustomInboxPrefix(protocol.InboxPrefix(in)))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	kv, err := c.adminJS(t).KeyValue(ctx, protocol.BucketAgents)
	if err != nil {
		t.Fatal(err)
	}
	status, err := kv.Get(ctx, in)
	if err != nil {
		t.Fatal(err)
	}
	for subject, data := range map[string][]byte{
		protocol.EventSubject(in, protocol.EventStep):    []byte("not an event"),
		protocol.LogSubject(in, protocol.LogSourceAgent): []byte("not a log batch"),
		protocol.KVSubject(protocol.BucketAgents, in):    status.Value(),
	} {
		m := nats.NewMsg(subject)
		m.Data = data
		m.Header.Set("Nats-Expected-Last-Msg-Id", "not-the-last")
		if _, err := js.PublishMsg(ctx, m); err != nil {
			t.Fatalf("%s: %v", subject, err)
		}
	}
	c.checkReplicas(t)
}

// checkInstanceRunning checks that instance in is running.
func (c *clusterFM) checkInstanceRunning(t *testing.T, in string) {
	t.Helper()
	var st map[string]any
	if err := json.Unmarshal([]byte(c.fm(t, "instance", "status", in, "--output", "json")), &st); err != nil || st["state"] != "running" {
		t.Fatalf("instance not running after the faults: %v (%v)", st, err)
	}
}

// checkSucceeded checks that every operation of ops succeeded.
func (c *clusterFM) checkSucceeded(t *testing.T, ops []string) {
	t.Helper()
	for _, op := range ops {
		var f map[string]any
		if err := json.Unmarshal([]byte(c.fm(t, "op", "get", op, "--output", "json")), &f); err != nil || f["state"] != "succeeded" {
			t.Errorf("operation %s: %v (%v)", op, f, err)
		}
	}
}

// checkAudit checks that the audit trail holds as many records of each
// instance action (the CLI's name: provision, stop, snapshot, …) as want
// says.
func (c *clusterFM) checkAudit(t *testing.T, want map[string]int) {
	t.Helper()
	var actions []string // fm audit --output json writes one record per line
	for dec := json.NewDecoder(strings.NewReader(c.fm(t, "audit", "--limit", "1000", "--output", "json"))); dec.More(); {
		var a map[string]any
		if err := dec.Decode(&a); err != nil {
			t.Fatal(err)
		}
		actions = append(actions, fmt.Sprint(a["action"]))
	}
	for action, n := range want {
		path, ok := map[string]string{"provision": "/actions/reprovision", "snapshot": "/snapshots"}[action]
		if !ok {
			path = "/actions/" + action
		}
		got := 0
		for _, a := range actions {
			if strings.HasSuffix(a, path) {
				got++
			}
		}
		if got != n {
			t.Errorf("the audit trail has %d records of %s, want %d: %v", got, action, n, actions)
		}
	}
}

// checkEvents checks that FM_EVENTS holds events of every operation of ops
// (the provisioner's or the agent's reports, by which each ended), read
// back from the stream itself.
func (c *clusterFM) checkEvents(t *testing.T, ops []string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	st, err := c.adminJS(t).Stream(ctx, protocol.StreamEvents)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		m, err := st.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue // dropped by the stream's limits
		}
		if err != nil {
			t.Fatalf("FM_EVENTS: event %d: %v", seq, err)
		}
		var e struct {
			OpID string `json:"opId"`
		}
		if json.Unmarshal(m.Data, &e) == nil && e.OpID != "" {
			seen[e.OpID]++
		}
	}
	for _, op := range ops {
		if seen[op] == 0 {
			t.Errorf("FM_EVENTS has no event of operation %s", op)
		}
	}
}

// checkRanOnce checks in the agent's log of instance in that the command
// of each operation of ops that sent one of kind ran exactly once, and that
// the commands of want operations ran.
func (c *clusterFM) checkRanOnce(t *testing.T, in string, ops []string, kind string, want int) {
	t.Helper()
	agentLog := readFile(t, filepath.Join(c.machines, "machines", in, "root", "var", "log", "fm-agent.log"))
	ran := map[string]int{}
	for line := range strings.Lines(agentLog) {
		var e struct{ Command, Kind, Message string }
		if json.Unmarshal([]byte(line), &e) == nil && e.Message == "running a command" && e.Kind == kind {
			ran[strings.TrimSuffix(e.Command, "-cmd")]++
		}
	}
	got := 0
	for _, op := range ops {
		if n, ok := ran[op]; ok {
			got++
			if n != 1 {
				t.Errorf("the command of %s ran %d times", op, n)
			}
		}
	}
	if got != want {
		t.Errorf("the agent ran the %s commands of %d operations, want %d: %v", kind, got, want, ran)
	}
}

// checkReport runs the operator's health check of docs/cluster.md, nats
// server report jetstream, with monitoring credentials: every node is in
// it, and the monitoring user may not touch FM's streams.
func (c *clusterFM) checkReport(t *testing.T) {
	t.Helper()
	natsBin, err := exec.LookPath("nats")
	if err != nil {
		t.Fatal("the NATS CLI is not on PATH; `make test` installs it")
	}
	creds := filepath.Join(t.TempDir(), "monitor.creds")
	c.fm(t, "nats-creds", "--role", "monitor", "-o", creds)
	nats := func(timeout string, args ...string) (string, error) {
		cmd := exec.Command(natsBin, append([]string{"--server", c.nats.URLs(), "--tlsca", c.nats.CA, "--creds", creds, "--timeout", timeout}, args...)...)
		cmd.Env = append(os.Environ(), "NATS_CONTEXT=", "HOME="+t.TempDir())
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := nats("10s", "server", "report", "jetstream")
	if err != nil {
		t.Fatalf("nats server report jetstream: %v\n%s", err, out)
	}
	for _, n := range c.nats.Nodes {
		if !strings.Contains(out, n.Name) {
			t.Errorf("the report has no %s:\n%s", n.Name, out)
		}
	}
	// What a monitoring user may not ask: every client's address and user
	// (CONNZ), a profile (PROFILEZ), a change of FM's accounts.
	for _, subject := range []string{"$SYS.REQ.SERVER.PING.CONNZ", "$SYS.REQ.SERVER.PING.PROFILEZ", "$SYS.REQ.CLAIMS.UPDATE"} {
		// The CLI reports the refusal, then waits out its timeout.
		out, _ := nats("2s", "request", subject, "{}")
		if !strings.Contains(out, `Permissions Violation for Publish to "`+subject+`"`) {
			t.Errorf("a monitoring user's request on %s was not refused:\n%s", subject, out)
		}
	}
}

// adminJS is JetStream on the cluster with FM's admin NATS credentials,
// closed when the test ends.
func (c *clusterFM) adminJS(t *testing.T) jetstream.JetStream {
	t.Helper()
	creds := filepath.Join(t.TempDir(), "admin.creds")
	c.fm(t, "nats-creds", "--role", "admin", "-o", creds)
	return c.nats.JetStream(t, creds)
}

// checkReplicas checks that every stream (buckets and object stores are
// streams) has three replicas, all current.
func (c *clusterFM) checkReplicas(t *testing.T) {
	t.Helper()
	js := c.adminJS(t)
	// Each stream FM declares, with each replica current, as soon as the
	// last node restarted catches up. Each is asked for by name: a list
	// leaves out a stream without a leader.
	names := bus.DefaultTopology().StreamNames()
	var problems []string
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(500 * time.Millisecond) {
		problems = problems[:0]
		for _, name := range names {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			st, err := js.Stream(ctx, name)
			var info *jetstream.StreamInfo
			if err == nil {
				info, err = st.Info(ctx)
			}
			cancel()
			switch {
			case err != nil:
				problems = append(problems, fmt.Sprintf("stream %s: %v", name, err))
			case info.Config.Replicas != 3 || info.Cluster == nil || info.Cluster.Leader == "" || len(info.Cluster.Replicas) != 2:
				problems = append(problems, fmt.Sprintf("stream %s: %d replicas configured, cluster %+v", name, info.Config.Replicas, info.Cluster))
			default:
				for _, r := range info.Cluster.Replicas {
					if !r.Current || r.Offline {
						problems = append(problems, fmt.Sprintf("stream %s: replica %s not current (%+v)", name, r.Name, r))
					}
				}
			}
		}
		if len(problems) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after a minute: %s", strings.Join(problems, "\n"))
		}
	}
}
