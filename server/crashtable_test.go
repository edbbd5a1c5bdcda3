package server_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/internal/crashpoint"
	"github.com/fleetmanager/fm/internal/crashpoint/crashtable"
	"github.com/fleetmanager/fm/internal/natsauth"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
	"github.com/fleetmanager/fm/server/servertest"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
)

// TestCrashPoints is the server's crash-point table: starting a
// reprovision, ending it, a command, the deletion of an instance without a
// machine and a machine's join, each with the server killed at each of its
// crash points (its connection and listener gone, the goroutine that
// reached the point parked), the client sending its request again as a
// client whose answer was lost does, and a new server on the same bus.
// Each must end exactly once: one operation succeeded (another may have
// ended "never started", having done nothing), the instance in the state
// it should be, a machine's credentials those of the machine that joined
// last, the one before revoked.
func TestCrashPoints(t *testing.T) {
	var cases []crashtable.Case
	for _, sc := range serverScenarios() {
		var points []string
		if !t.Run(sc.name+"/record", func(t *testing.T) {
			if points = recordServer(t, sc); len(points) == 0 {
				t.Fatal("the work passes no crash point")
			}
		}) {
			continue
		}
		for _, n := range crashtable.Select(len(points), 1) {
			cases = append(cases, crashtable.Case{Operation: sc.name, N: n, Point: crashtable.Occurrence(points, n),
				Run: func(t *testing.T) { crashServer(t, sc, points, n) }})
		}
	}
	crashtable.Report(t, "server", crashtable.Run(t, "server", 3, cases))
}

// serverScenario is a piece of the server's work.
type serverScenario struct {
	name      string
	authority bool
	// setup prepares the instance (no crash) and returns its id.
	setup func(w *serverWorld) string
	// act sends the request; a crash may cut its answer.
	act func(w *serverWorld, id string)
	// done finishes as a client would (sending the request again) and
	// checks the outcome.
	done func(w *serverWorld, id string)
}

// serverWorld is a server whose crash hook can be switched, a fleet that
// plays the provisioner and the agents, and the scenario's state.
type serverWorld struct {
	t    *testing.T
	f    *fm
	hook *switchHook
	// machine keys a join scenario used.
	keyA, keyB nkeys.KeyPair
	tokA, tokB string
	// answered says the request act sent was answered 200 (act runs in a
	// goroutine of its own, which a crash may leave running).
	answered atomic.Bool
	// fleet plays the provisioner and agents (not in the join scenario).
	fleet *fakeFleet
}

// switchHook passes points to the hook of the moment, keeping only the
// server's own (a crash point of the work, not of folding, which passes
// points for every event it folds).
type switchHook struct {
	mu sync.Mutex
	fn crashpoint.Hook
}

func (h *switchHook) set(fn crashpoint.Hook) {
	h.mu.Lock()
	h.fn = fn
	h.mu.Unlock()
}

func (h *switchHook) at(point string) {
	if strings.HasPrefix(point, "server/fold/") {
		return
	}
	h.mu.Lock()
	fn := h.fn
	h.mu.Unlock()
	fn.At(point)
}

func newServerWorld(t *testing.T, authority bool) *serverWorld {
	w := &serverWorld{t: t, hook: &switchHook{}}
	opts := []servertest.Option{servertest.WithConfig(func(c *server.Config) {
		c.LocalBackend, c.SweepInterval, c.RepublishAfter, c.Crash = true, 100*time.Millisecond, 500*time.Millisecond, w.hook.at
	})}
	if authority {
		auth, err := natsauth.Open(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		opts = append(opts, servertest.WithConfig(func(c *server.Config) { c.Authority = auth }))
	}
	w.f = start(t, opts...)
	if !authority {
		// With NATS credentials machines join, which the fleet cannot fake:
		// the join scenario plays its machines itself.
		w.fleet = runFakeFleet(t, w.f.env.Bus)
	}
	return w
}

func (w *serverWorld) instance(label string) string {
	vn, tpl, _ := w.f.fleet()
	kit := w.f.addImageWithKit("dss-crash", "14.0.0")
	return w.f.createInstance(instanceBody(label, vn.ID, tpl.ID, kit.ID)).ID
}

// call sends a request that a crash may cut: a request that got no answer
// answers status 0.
func (w *serverWorld) call(method, path, body string) response {
	url := w.f.env.URL + path
	if !strings.HasPrefix(path, "/api/") {
		url = w.f.env.URL + tenantPath + path
	}
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		return response{}
	}
	req.SetBasicAuth(w.f.env.Key.ID, w.f.env.Key.Secret)
	client := http.Client{Timeout: 20 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		return response{}
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return response{status: resp.StatusCode, body: b, header: resp.Header}
}

// waitOps waits until the instance has no running operation and returns
// its operations.
func (w *serverWorld) waitOps(id string) []api.Future {
	w.t.Helper()
	deadline := time.Now().Add(45 * time.Second)
	for {
		var ops []api.Future
		w.f.ok(w.f.do("GET", "/futures?targetId="+id, ""), &ops)
		running := false
		for _, op := range ops {
			running = running || op.State == api.OpRunning
		}
		if !running {
			return ops
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("operations of %s still running: %+v", id, ops)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// exactlyOne checks that one operation of kind succeeded, and that any
// other ended "never started".
func (w *serverWorld) exactlyOne(ops []api.Future, kind string) {
	w.t.Helper()
	ok := 0
	for _, op := range ops {
		switch {
		case op.Kind == kind && op.State == api.OpSucceeded:
			ok++
		case op.State == api.OpFailed && op.Error != nil && op.Error.Message == "Operation never started":
			// Nothing was done, and nothing may have gone out for it.
			if subject := w.sentFor(op.JobID); subject != "" {
				w.t.Errorf("operation %s ended never started, but its request went out on %s", op.JobID, subject)
			}
		default:
			w.t.Errorf("operation %s %s ended %s: %+v", op.JobID, op.Kind, op.State, op.Error)
		}
	}
	if ok != 1 {
		w.t.Errorf("%d %s operations succeeded, want 1: %+v", ok, kind, ops)
	}
}

// sentFor returns what the fleet was sent for the operation (a provision
// request or a command), if anything was.
func (w *serverWorld) sentFor(jobID string) string {
	w.t.Helper()
	if w.fleet == nil {
		return ""
	}
	w.fleet.mu.Lock()
	defer w.fleet.mu.Unlock()
	for _, id := range w.fleet.seen {
		if strings.HasPrefix(id, jobID+"-") {
			return id
		}
	}
	return ""
}

// retried sends an action until the server takes it or says it is busy
// with one (the client's answer was lost): the action is under way. A
// deletion may find the instance deleted already.
func (w *serverWorld) retried(path string) {
	w.t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; {
		r := w.call("GET", path, "")
		if r.status == 200 || r.status == 409 && strings.Contains(string(r.body), "Operation in progress") ||
			r.status == 404 && strings.HasSuffix(path, "/delete") {
			return
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("%s: %d %s", path, r.status, r.body)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func serverScenarios() []serverScenario {
	reprovisioned := func(w *serverWorld) string {
		id := w.instance("crash")
		w.f.ok(w.f.do("GET", "/instances/"+id+"/actions/reprovision", ""), nil)
		w.exactlyOne(w.waitOps(id), "reprovision")
		return id
	}
	return []serverScenario{
		{name: "reprovision",
			setup: func(w *serverWorld) string { return w.instance("crash") },
			act:   func(w *serverWorld, id string) { w.call("GET", "/instances/"+id+"/actions/reprovision", "") },
			done: func(w *serverWorld, id string) {
				ops := w.waitOps(id)
				if !hasSucceeded(ops, "reprovision") {
					// The server died before the operation was under way: the
					// client sends it again.
					w.retried("/instances/" + id + "/actions/reprovision")
					ops = w.waitOps(id)
				}
				w.exactlyOne(ops, "reprovision")
				waitState(w.t, w.f, id, "running")
			}},
		{name: "restart-dss", setup: reprovisioned,
			act: func(w *serverWorld, id string) { w.call("GET", "/instances/"+id+"/actions/restart-dss", "") },
			done: func(w *serverWorld, id string) {
				ops := w.waitOps(id)
				if !hasSucceeded(ops, "restart-dss") {
					w.retried("/instances/" + id + "/actions/restart-dss")
					ops = w.waitOps(id)
				}
				w.exactlyOne(withoutKind(ops, "reprovision"), "restart-dss")
				waitState(w.t, w.f, id, "running")
			}},
		{name: "replay-setup-actions", setup: reprovisioned,
			act: func(w *serverWorld, id string) { w.call("GET", "/instances/"+id+"/actions/replay-setup-actions", "") },
			done: func(w *serverWorld, id string) {
				ops := w.waitOps(id)
				if !hasSucceeded(ops, "replay-setup-actions") {
					w.retried("/instances/" + id + "/actions/replay-setup-actions")
					ops = w.waitOps(id)
				}
				w.exactlyOne(withoutKind(ops, "reprovision"), "replay-setup-actions")
				waitState(w.t, w.f, id, "running")
			}},
		{name: "delete-without-machine",
			setup: func(w *serverWorld) string { return w.instance("crash") },
			act:   func(w *serverWorld, id string) { w.call("GET", "/instances/"+id+"/actions/delete", "") },
			done: func(w *serverWorld, id string) {
				ops := w.waitOps(id)
				if r := w.f.do("GET", "/instances/"+id, ""); r.status == 200 {
					w.retried("/instances/" + id + "/actions/delete")
					ops = w.waitOps(id)
				}
				w.exactlyOne(ops, "delete-instance")
				w.f.failed(w.f.do("GET", "/instances/"+id, ""), 404, "NotFound")
				// Its records go too (last of all its lifecycle), at once or
				// when the next server settles it.
				js := w.f.env.Bus.JetStream(w.t)
				for _, bucket := range []string{protocol.BucketLifecycle, protocol.BucketDesired, protocol.BucketSecrets} {
					kv, _ := js.KeyValue(context.Background(), bucket)
					for deadline := time.Now().Add(20 * time.Second); ; {
						if _, err := kv.Get(context.Background(), id); err != nil {
							break
						}
						if time.Now().After(deadline) {
							w.t.Errorf("%s still holds the deleted instance", bucket)
							break
						}
						time.Sleep(50 * time.Millisecond)
					}
				}
			}},
		{name: "join", authority: true,
			setup: func(w *serverWorld) string {
				id := w.instance("crash")
				// Machine A joined; its reprovision is given up on, and
				// another makes machine B.
				w.keyA, w.tokA = machineKey(w.t), w.f.provisionRequest(id).Spec.Join.Token
				w.f.ok(w.f.joinAs(id, w.tokA, w.keyA), nil)
				var ops []api.Future
				w.f.ok(w.f.do("GET", "/futures?targetId="+id, ""), &ops)
				w.f.ok(w.f.do("DELETE", "/futures/"+ops[0].JobID, ""), nil)
				waitState(w.t, w.f, id, "failed")
				w.keyB, w.tokB = machineKey(w.t), w.f.provisionRequest(id).Spec.Join.Token
				return id
			},
			act: func(w *serverWorld, id string) {
				w.answered.Store(w.call("POST", server.JoinPath, joinBody(w.t, id, w.tokB, w.keyB)).status == 200)
			},
			done: func(w *serverWorld, id string) {
				// Machine B asks again until it is answered, as its agent does.
				for deadline := time.Now().Add(30 * time.Second); !w.answered.Load(); {
					r := w.call("POST", server.JoinPath, joinBody(w.t, id, w.tokB, w.keyB))
					if r.status == 200 {
						break
					}
					if time.Now().After(deadline) {
						w.t.Fatalf("machine B was never answered: %d %s", r.status, r.body)
					}
					time.Sleep(100 * time.Millisecond)
				}
				js := w.f.env.Bus.JetStream(w.t)
				secrets := getJSON(w.t, js, protocol.BucketSecrets, id)
				if secrets["agentUser"] != publicKey(w.keyB) {
					w.t.Errorf("the instance's agent is %v, want machine B's", secrets["agentUser"])
				}
				revoked := getJSON(w.t, js, protocol.BucketSettings, "system.nats-revocations")
				if r, _ := revoked["expiring"].(map[string]any); r[publicKey(w.keyA)] == nil {
					w.t.Errorf("machine A's user is not revoked: %v", revoked)
				}
				if secrets["retired"] != nil {
					w.t.Errorf("a retired user is left on record: %v", secrets["retired"])
				}
				// Machine A cannot come back with its token.
				w.f.failed(w.call("POST", server.JoinPath, joinBody(w.t, id, w.tokA, w.keyA)), 401, "Unauthenticated")
			}},
	}
}

func hasSucceeded(ops []api.Future, kind string) bool {
	for _, op := range ops {
		if op.Kind == kind && op.State == api.OpSucceeded {
			return true
		}
	}
	return false
}

func withoutKind(ops []api.Future, kind string) []api.Future {
	var out []api.Future
	for _, op := range ops {
		if op.Kind != kind {
			out = append(out, op)
		}
	}
	return out
}

func getJSON(t *testing.T, js jetstream.JetStream, bucket, key string) map[string]any {
	t.Helper()
	kv, err := js.KeyValue(context.Background(), bucket)
	if err != nil {
		t.Fatal(err)
	}
	e, err := kv.Get(context.Background(), key)
	if err != nil {
		t.Fatalf("%s %s: %v", bucket, key, err)
	}
	var out map[string]any
	if err := json.Unmarshal(e.Value(), &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// recordServer runs the work once without a crash and returns the server's
// crash points it passed.
func recordServer(t *testing.T, sc serverScenario) []string {
	w := newServerWorld(t, sc.authority)
	id := sc.setup(w)
	var rec crashpoint.Recorder
	w.hook.set(rec.Hook())
	sc.act(w, id)
	sc.done(w, id)
	w.hook.set(nil)
	return rec.Points()
}

// crashServer kills the server at the n-th crash point the work passed
// when it was recorded (points), starts a new one on the same bus, lets the
// client finish as it would, and checks the outcome. The point is counted
// by its name (its k-th pass): points passed by goroutines of their own (an
// operation's end, folded from the agent's report, and the request's last
// write) may come in another order than when the work was recorded.
func crashServer(t *testing.T, sc serverScenario, points []string, n int) {
	point, k := points[n-1], 0
	for _, p := range points[:n] {
		if p == point {
			k++
		}
	}
	w := newServerWorld(t, sc.authority)
	id := sc.setup(w)
	crasher := &crashpoint.Crasher{N: k, At: point, Die: w.f.env.Die}
	w.hook.set(crasher.Hook())
	go sc.act(w, id)
	select {
	case <-crasher.Crashed():
	case <-time.After(time.Minute):
		t.Fatalf("the server never reached crash point %d", n)
	}
	if got := crasher.Point(); got != point {
		t.Fatalf("crashed at %s, not %s", got, point)
	}
	w.hook.set(nil)
	w.f.env.StartAgain(t, nil)
	sc.done(w, id)
}

// runFakeFleet plays the provisioner and the agents for the server's tests:
// a reprovision makes a running machine whose agent reports the generation
// reached with DSS running; commands are answered (the credentials
// commands with credentials, in clear: these servers give machines no
// keys).
// fakeFleet records the ids of the provision requests and commands it was
// sent.
type fakeFleet struct {
	mu   sync.Mutex
	seen []string
}

func (f *fakeFleet) saw(id string) {
	f.mu.Lock()
	f.seen = append(f.seen, id)
	f.mu.Unlock()
}

func runFakeFleet(t *testing.T, bus *bustest.Server) *fakeFleet {
	t.Helper()
	fleet := &fakeFleet{}
	js := bus.JetStream(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	prov, err := js.CreateOrUpdateConsumer(ctx, protocol.StreamProvision, jetstream.ConsumerConfig{
		Durable: "fake-fleet", AckPolicy: jetstream.AckExplicitPolicy, FilterSubject: protocol.SubjectAllProvision})
	if err != nil {
		t.Fatal(err)
	}
	pc, err := prov.Consume(func(m jetstream.Msg) {
		var req protocol.ProvisionRequest
		if protocol.Decode(m.Data(), &req) == nil {
			fleet.saw(req.ID)
		}
		if req.Action == protocol.ProvisionReprovision {
			machineRunning(t, js, req.Instance, req.ID)
			st := protocol.AgentStatus{Instance: req.Instance, AgentVersion: "fake", Phase: protocol.PhaseReady, Generation: req.Generation,
				Target: req.Generation, MachineRequest: req.ID, Time: time.Now().UTC(),
				DSS: protocol.DSSStatus{State: protocol.DSSRunning, Version: req.Spec.DSSVersion}}
			data, _ := protocol.Encode(&st)
			kv, _ := js.KeyValue(ctx, protocol.BucketAgents)
			_, _ = kv.Put(ctx, req.Instance, data)
		}
		_ = m.Ack()
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pc.Stop)
	cmds, err := js.OrderedConsumer(ctx, protocol.StreamCommands, jetstream.OrderedConsumerConfig{FilterSubjects: []string{"fm.cmd.>"}})
	if err != nil {
		t.Fatal(err)
	}
	cc, err := cmds.Consume(func(m jetstream.Msg) {
		var c protocol.Command
		if protocol.Decode(m.Data(), &c) != nil {
			return
		}
		fleet.saw(c.ID)
		e := protocol.Event{ID: c.ID + "-result", Instance: c.Instance, Kind: protocol.EventCommand, Source: "agent", CommandID: c.ID,
			OpID: c.OpID, Step: string(c.Kind), Status: protocol.StatusOK, Time: time.Now().UTC()}
		switch c.Kind {
		case protocol.CommandGetInitialPassword:
			e.Result, _ = json.Marshal(protocol.InitialPasswordResult{UserName: "admin", Password: "fake-password"})
		case protocol.CommandGetAdminAPIKey:
			e.Result, _ = json.Marshal(protocol.AdminAPIKeyResult{AdminAPIKey: "fake-key"})
		}
		data, _ := protocol.Encode(&e)
		_, _ = js.Publish(ctx, protocol.EventSubject(c.Instance, e.Kind), data, jetstream.WithMsgID(e.ID))
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cc.Stop)
	// A replay's desired state (of the machine that runs: its generation
	// is all there is to send) is reached at once; a reprovision's waits
	// for its machine, above.
	desired, err := js.KeyValue(ctx, protocol.BucketDesired)
	if err != nil {
		t.Fatal(err)
	}
	machines, err := js.KeyValue(ctx, protocol.BucketMachines)
	if err != nil {
		t.Fatal(err)
	}
	dw, err := desired.WatchAll(ctx, jetstream.UpdatesOnly(), jetstream.IgnoreDeletes())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = dw.Stop() })
	go func() {
		for e := range dw.Updates() {
			var d protocol.DesiredState
			if e == nil || protocol.Decode(e.Value(), &d) != nil {
				continue
			}
			var m protocol.MachineState
			if me, err := machines.Get(ctx, d.Instance); err != nil || protocol.Decode(me.Value(), &m) != nil ||
				m.Status != protocol.MachineRunning || m.RequestID != d.MachineRequest {
				continue
			}
			st := protocol.AgentStatus{Instance: d.Instance, AgentVersion: "fake", Phase: protocol.PhaseReady, Generation: d.Generation,
				Target: d.Generation, MachineRequest: d.MachineRequest, Time: time.Now().UTC(),
				DSS: protocol.DSSStatus{State: protocol.DSSRunning, Version: d.DSS.Version}}
			data, _ := protocol.Encode(&st)
			kv, _ := js.KeyValue(ctx, protocol.BucketAgents)
			_, _ = kv.Put(ctx, d.Instance, data)
		}
	}()
	return fleet
}
