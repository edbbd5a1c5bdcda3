package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/deploy/standin/kit"
	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

var (
	natsServerOnce sync.Once
	natsServerBin  string
	natsServerErr  error
)

// natsServer builds nats-server once per test binary.
func natsServer(t *testing.T) string {
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
	nats     *NATSCluster
	server   *Proc
	prov     *Proc
	env      []string
	bin      string
	data     string
	machines string // the local backend's folder
}

func startClusterFM(t *testing.T) *clusterFM {
	t.Helper()
	bin := fmBin(t)
	tmp := t.TempDir()
	authority := filepath.Join(tmp, "nats-auth")
	conf, errOut, code := Run(t, bin, nil, "nats-config", "--nats-authority", authority)
	if code != 0 {
		t.Fatalf("fm nats-config: exit %d: %s", code, errOut)
	}
	c := &clusterFM{nats: StartNATSCluster(t, natsServer(t), conf), bin: bin, data: filepath.Join(tmp, "fm")}
	addr := FreePort(t)
	c.server = Start(t, bin, nil, "server", "--data", c.data, "--listen", addr, "--nats-url", c.nats.URLs(),
		"--nats-authority", authority, "--nats-ca", c.nats.CA, "--replicas", "3", "--heartbeat-seconds", "1",
		"--default-vpc", "vpc-local", "--default-subnet", "subnet-local", "--default-region", "local")
	c.server.WaitStdout("REST API https://"+addr, 90*time.Second)
	c.env = []string{"FM_URL=https://" + addr, "FM_KEY_FILE=" + filepath.Join(c.data, "admin-key.json"),
		"FM_CA_FILE=" + filepath.Join(c.data, "tls", "ca.pem")}
	creds := filepath.Join(tmp, "provisioner.creds")
	c.fm(t, "nats-creds", "--role", "provisioner", "-o", creds)
	c.machines = filepath.Join(tmp, "machines")
	t.Cleanup(func() { cmdline.Stop(cmdline.Find(c.machines), 2*time.Second) })
	c.prov = Start(t, bin, nil, "provisioner", "--backend", "local", "--dir", c.machines, "--nats-url", c.nats.URLs(),
		"--nats-creds", creds, "--nats-ca", c.nats.CA, "--secret-key-file", filepath.Join(c.data, "secrets.key"))
	c.prov.WaitStdout("local backend", 30*time.Second)
	return c
}

func (c *clusterFM) fm(t *testing.T, args ...string) string {
	t.Helper()
	out, errOut, code := Run(t, c.bin, c.env, args...)
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
	c.fm(t, "image", "add", "--file", write("image.json", map[string]any{"id": "dss-14-" + label, "label": "DSS 14",
		"dssVersion": "14.0.0", "kit": map[string]string{"path": kitPath}}))
	vn := jsonField(t, c.fm(t, "network", "create", "--label", label+"-net", "--default", "--output", "json"), "id")
	tpl := jsonField(t, c.fm(t, "template", "create", "--label", label+"-tpl", "--output", "json"), "id")
	return jsonField(t, c.fm(t, "instance", "create", "--label", label, "--network", vn, "--template", tpl,
		"--image", "dss-14-"+label, "--output", "json"), "id")
}

// TestNATSNodeLossLosesNothing runs FM on three NATS nodes and kills each
// node in turn (SIGKILL) with an instance running: while a node is down,
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
	start := time.Now()
	run("instance", "restart-dss", in)
	run("instance", "stop", in)
	run("instance", "start", in)
	t.Logf("no node down: three operations in %s", time.Since(start).Round(time.Millisecond))
	for i := range c.nats.Nodes {
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
	var st map[string]any
	if err := json.Unmarshal([]byte(c.fm(t, "instance", "status", in, "--output", "json")), &st); err != nil || st["state"] != "running" {
		t.Fatalf("instance not running after the faults: %v (%v)", st, err)
	}
	for _, op := range ops {
		var f map[string]any
		if err := json.Unmarshal([]byte(c.fm(t, "op", "get", op, "--output", "json")), &f); err != nil || f["state"] != "succeeded" {
			t.Errorf("operation %s: %v (%v)", op, f, err)
		}
	}
	var actions []string // fm audit --output json writes one record per line
	for dec := json.NewDecoder(strings.NewReader(c.fm(t, "audit", "--output", "json"))); dec.More(); {
		var a map[string]any
		if err := dec.Decode(&a); err != nil {
			t.Fatal(err)
		}
		actions = append(actions, fmt.Sprint(a["action"]))
	}
	for action, want := range map[string]int{"reprovision": 1, "restart-dss": 4, "stop": 4, "start": 4} {
		n := 0
		for _, a := range actions {
			if strings.HasSuffix(a, "/actions/"+action) {
				n++
			}
		}
		if n != want {
			t.Errorf("the audit trail has %d records of %s, want %d: %v", n, action, want, actions)
		}
	}
	// Each command ran exactly once on the machine, however often it was
	// sent.
	agentLog := readFile(t, filepath.Join(c.machines, "machines", in, "root", "var", "log", "fm-agent.log"))
	ran := map[string]int{}
	for line := range strings.Lines(agentLog) {
		var e struct{ Command, Kind, Message string }
		if json.Unmarshal([]byte(line), &e) == nil && e.Message == "running a command" && e.Kind == "restart-dss" {
			ran[strings.TrimSuffix(e.Command, "-cmd")]++
		}
	}
	restarts := 0
	for _, op := range ops {
		if n, ok := ran[op]; ok {
			restarts++
			if n != 1 {
				t.Errorf("the command of %s ran %d times", op, n)
			}
		}
	}
	if restarts != 4 {
		t.Errorf("the agent ran the commands of %d restarts of DSS, want 4: %v", restarts, ran)
	}
	c.checkReplicas(t)
	c.checkReport(t)
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

// checkReplicas checks that every stream (buckets and object stores are
// streams) has three replicas, all current.
func (c *clusterFM) checkReplicas(t *testing.T) {
	t.Helper()
	creds := filepath.Join(t.TempDir(), "admin.creds")
	c.fm(t, "nats-creds", "--role", "admin", "-o", creds)
	nc, err := nats.Connect(c.nats.URLs(), nats.UserCredentials(creds), nats.RootCAs(c.nats.CA))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	// Each stream FM declares, with each replica current, as soon as the
	// last node restarted catches up. Each is asked for by name: a list
	// leaves out a stream without a leader.
	topo := bus.DefaultTopology()
	var names []string
	for _, kv := range topo.KeyValues() {
		names = append(names, "KV_"+kv.Bucket)
	}
	for _, st := range topo.Streams() {
		names = append(names, st.Name)
	}
	for _, o := range topo.ObjectStores() {
		names = append(names, "OBJ_"+o.Bucket)
	}
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
