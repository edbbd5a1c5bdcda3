package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
	"github.com/nats-io/nats.go/jetstream"
)

// TestFMRolesFailOver runs FM as a fleet that must not stop with one
// machine runs it: three NATS nodes, two fm server replicas behind a load
// balancer, and two provisioners, one of them active by lease. Any replica
// answers any call (an operation begun on one is at once found on the
// other; a write on one shows on the other within a bounded lag). The
// active provisioner killed with an operation just begun, the standby
// takes over and carries it out. The active one stopped (SIGSTOP) for
// longer than its lease, the standby takes over, and once resumed the one
// deposed acts on nothing. A replica killed with an operation it began in
// flight, the other carries it to its end and takes the snapshot
// scheduler's lease. A NATS node killed, operations go on.
// Every operation succeeds once, no request is carried out by two
// provisioners, each command runs once on the machine, the audit trail
// holds every request, and every stream has its three replicas current.
func TestFMRolesFailOver(t *testing.T) {
	lb := StartLoadBalancer(t)
	advertise := []string{"--advertise-url", "https://" + lb.Addr}
	c := startClusterFM(t, advertise...)
	serverA, addrA := c.server, c.addr
	addrB := FreePort(t)
	serverB := c.startServer(t, filepath.Join(c.tmp, "fm-b"), addrB, advertise...)
	lb.SetBackends(addrA, addrB)
	viaA, viaB := c.env, c.envOf(addrB)
	c.env = c.envOf(lb.Addr) // what operators' scripts use
	p1 := c.prov
	p1.WaitStderr("holding the provisioner lease", 30*time.Second)
	p2 := c.startProvisioner(t)
	provs := []*Proc{p1, p2} // every provisioner process started
	in := c.newInstance(t, "f1")

	var ops []string        // the test's journal: every operation it began
	did := map[string]int{} // and how many of each action
	begin := func(env []string, action string) string {
		t.Helper()
		id := jsonField(t, c.fmAt(t, env, "instance", action, in, "--output", "json"), "jobId")
		ops, did[action] = append(ops, id), did[action]+1
		return id
	}
	wait := func(env []string, id string) {
		t.Helper()
		c.fmAt(t, env, "op", "wait", id, "--output", "json") // fails unless it succeeded
	}
	wait(viaB, begin(c.env, "provision"))
	// Each provisioner says whether it is the active one, and the active
	// one counts its calls to the backend.
	for i, want := range [][]string{{"fm_provisioner_lease_held 1",
		`fm_provisioner_backend_calls_total{backend="local",call="reprovision",result="ok"} 1`},
		{"fm_provisioner_lease_held 0"}} {
		got := scrapeProvisioner(t, provs[i])
		for _, w := range want {
			if !strings.Contains(got, w) {
				t.Errorf("provisioner %d's metrics lack %s", i+1, w)
			}
		}
	}

	// Each replica keeps copies of the buckets, fed by watchers: a write
	// through one shows in the other's lists within a bounded lag.
	client := TrustingClient(t, filepath.Join(c.data, "tls", "ca.pem"), 30*time.Second)
	keyFile := filepath.Join(c.data, "admin-key.json")
	restA, restB := NewPython(t, "https://"+addrA, keyFile), NewPython(t, "https://"+addrB, keyFile)
	restA.Client, restB.Client = client, client
	var lags []time.Duration
	for i := range 20 {
		var tpl struct{ ID string }
		if code := restA.Do(t, "POST", "/instance-settings-templates", fmt.Sprintf(`{"label":"lag-%d"}`, i), &tpl); code/100 != 2 || tpl.ID == "" {
			t.Fatalf("template not created: %d", code)
		}
		written := time.Now()
		for {
			var list []struct{ ID string }
			restB.Do(t, "GET", "/instance-settings-templates", "", &list)
			if slices.ContainsFunc(list, func(x struct{ ID string }) bool { return x.ID == tpl.ID }) {
				break
			}
			if time.Since(written) > 10*time.Second {
				t.Fatalf("a template created through one replica is not listed by the other after 10 s")
			}
			time.Sleep(time.Millisecond)
		}
		lags = append(lags, time.Since(written))
	}
	slices.Sort(lags)
	t.Logf("replica lag (a write through one replica listed by the other), 20 writes: p50 %s, max %s",
		lags[len(lags)/2].Round(100*time.Microsecond), lags[len(lags)-1].Round(100*time.Microsecond))

	// An operation begun through one replica is found at once through the
	// other (it reads the bus when its copy lacks it).
	id := begin(viaA, "restart-dss")
	if code := restB.Do(t, "GET", "/futures/"+id+"?peek=True", "", nil); code != 200 {
		t.Errorf("an operation begun through replica A: %d from replica B", code)
	}
	wait(viaB, id)

	// The active provisioner killed with an operation just begun, twice: a
	// snapshot (the local backend pauses DSS to take it), then a stop. Each
	// time the standby takes the lease and carries it out, and a new
	// standby is started.
	active, standby := p1, p2
	for _, action := range []string{"snapshot", "stop"} {
		if action == "snapshot" {
			id = jsonField(t, c.fmAt(t, c.env, "snapshot", "create", in, "--output", "json"), "futureId")
			ops, did[action] = append(ops, id), did[action]+1
		} else {
			id = begin(c.env, action)
		}
		active.Kill()
		killed := time.Now()
		wait(c.env, id)
		standby.WaitStderr("holding the provisioner lease", time.Minute)
		t.Logf("active provisioner killed: the %s begun ended %s later", action, time.Since(killed).Round(time.Millisecond))
		active, standby = standby, c.startProvisioner(t)
		provs = append(provs, standby)
	}
	var snaps []map[string]any
	if err := json.Unmarshal([]byte(c.fm(t, "snapshot", "list", in, "--output", "json")), &snaps); err != nil || len(snaps) != 1 {
		t.Errorf("after one snapshot was taken: %v (%v)", snaps, err)
	}

	// The active provisioner stopped for longer than its lease (as a frozen
	// machine or one cut off is), the moment the bus has handed it a
	// request: the standby takes over and carries the request out, and the
	// one deposed, resumed, acts on nothing, not even on what it was handed.
	// When the stop missed the request (the provisioner's last fetch had
	// ended), the provisioner is resumed to carry it out, and the stop is
	// tried again with the next operation.
	provision, err := c.adminJS(t).Consumer(context.Background(), protocol.StreamProvision, provisioner.ConsumerName)
	if err != nil {
		t.Fatal(err)
	}
	running := false // the instance, since the stop above
	var paused time.Time
	for try := 1; ; try++ {
		active.Pause()
		paused = time.Now()
		id = begin(c.env, map[bool]string{true: "stop", false: "start"}[running])
		running = !running
		taken := false
		for deadline := time.Now().Add(time.Second); !taken && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			info, err := provision.Info(context.Background())
			taken = err == nil && info.NumAckPending > 0
		}
		if taken {
			t.Logf("the provisioner stopped as it was handed a request, at try %d", try)
			break
		}
		active.Resume()
		wait(c.env, id)
		// A try misses when the provisioner's pull (1 s long) ended before
		// the operation's request was published, which a loaded machine
		// makes likely: each try is a few seconds, so many are allowed.
		if try == 15 {
			t.Fatal("in 15 tries, the provisioner was never stopped with a request handed to it")
		}
	}
	wait(c.env, id)
	standby.WaitStderr("holding the provisioner lease", time.Minute)
	t.Logf("active provisioner stopped (SIGSTOP): the operation begun ended %s later", time.Since(paused).Round(time.Millisecond))
	mark := len(active.Stderr())
	active.Resume()
	for deadline := time.Now().Add(time.Minute); !strings.Contains(active.Stderr()[mark:], "lease lost"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the provisioner resumed after its lease passed does not say it lost it")
		}
	}
	if !running {
		wait(c.env, begin(c.env, "start"))
	}
	wait(c.env, begin(c.env, "stop"))
	wait(c.env, begin(c.env, "start"))
	after := active.Stderr()[mark:]
	for _, acting := range []string{"machine operation done", "operation done", "request already handled", "machine lost"} {
		if strings.Contains(after, acting) {
			t.Errorf("the deposed provisioner, resumed, logged %q:\n%s", acting, tail(after, 4000))
		}
	}

	// A NATS node killed with operations under way (through the agent, then
	// through the provisioner), and started again.
	c.nats.Kill(1)
	down := time.Now()
	wait(c.env, begin(c.env, "restart-dss"))
	wait(c.env, begin(c.env, "stop"))
	wait(c.env, begin(c.env, "start"))
	t.Logf("a NATS node killed: a restart of DSS, a stop and a start ended %s later", time.Since(down).Round(time.Millisecond))
	c.nats.Start(1)
	c.nats.WaitHealthy(1, 2*time.Minute)

	// A replica killed with an operation it began in flight: the other
	// carries it to its end, and takes the snapshot scheduler's lease if
	// the one killed held it.
	type replica struct {
		proc       *Proc
		env        []string
		data, addr string
	}
	replicas := []replica{{serverA, viaA, c.data, addrA}, {serverB, viaB, filepath.Join(c.tmp, "fm-b"), addrB}}
	leases, err := c.adminJS(t).KeyValue(context.Background(), protocol.BucketLeases)
	if err != nil {
		t.Fatal(err)
	}
	// The scheduler's holder is named "<host>-<pid>-<id>".
	schedulerPid := func() int {
		e, err := leases.Get(context.Background(), "snapshot-scheduler")
		if err != nil {
			return 0
		}
		parts := strings.Split(string(e.Value()), "-")
		for i, part := range parts {
			if pid, err := strconv.Atoi(part); err == nil && i+1 < len(parts) && parts[i+1] == "srv" {
				return pid
			}
		}
		return 0
	}
	k := slices.IndexFunc(replicas, func(r replica) bool { return r.proc.Pid() == schedulerPid() })
	if k < 0 {
		t.Fatalf("no replica holds the snapshot scheduler's lease (held by pid %d)", schedulerPid())
	}
	gone, other := replicas[k], replicas[1-k]
	id = begin(gone.env, "restart-dss")
	gone.proc.Kill()
	killed := time.Now()
	wait(c.env, id)
	t.Logf("server replica killed: the operation it had begun ended %s later (through the other)", time.Since(killed).Round(time.Millisecond))
	for deadline := time.Now().Add(time.Minute); schedulerPid() != other.proc.Pid(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the other replica did not take the snapshot scheduler's lease")
		}
	}
	t.Logf("server replica killed: the other holds the snapshot scheduler's lease %s later", time.Since(killed).Round(time.Millisecond))
	c.startServer(t, gone.data, gone.addr, advertise...)
	wait(other.env, begin(gone.env, "restart-dss"))

	c.checkInstanceRunning(t, in)
	c.checkSucceeded(t, ops)
	c.checkAudit(t, did)
	c.checkRanOnce(t, in, ops, "restart-dss", did["restart-dss"])
	// Each request was carried out by one provisioner only.
	done := map[string]int{}
	for _, p := range provs {
		for line := range strings.Lines(p.Stderr()) {
			var e struct{ Request, Message string }
			if json.Unmarshal([]byte(line), &e) == nil && e.Message == "machine operation done" {
				done[e.Request]++
			}
		}
	}
	for req, n := range done {
		if n != 1 {
			t.Errorf("request %s was carried out %d times", req, n)
		}
	}
	if len(done) < 7 {
		t.Errorf("the provisioners carried out %d requests, want at least 7: %v", len(done), done)
	}
	c.checkReplicas(t)
	c.checkEvents(t, ops)
	// The agents' logs reached FM_LOGS, each message acknowledged through
	// the agents' account: an agent sends the messages after one the bus
	// did not acknowledge only once it is, so without acknowledgements one
	// message a source would be stored, sent again for ever.
	logs, err := c.adminJS(t).Stream(context.Background(), protocol.StreamLogs)
	if err != nil {
		t.Fatal(err)
	}
	info, err := logs.Info(context.Background(), jetstream.WithSubjectFilter(protocol.LogSubject(in, protocol.LogSourceAgent)))
	if err != nil {
		t.Fatal(err)
	}
	if n := info.State.Subjects[protocol.LogSubject(in, protocol.LogSourceAgent)]; n < 2 {
		t.Errorf("FM_LOGS has %d messages of the agent's log, want several", n)
	}
}
