package server_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
	"github.com/fleetmanager/fm/server/servertest"
	"github.com/nats-io/nats.go/jetstream"
)

// These tests are the server's part of the crash-point work: what it does
// in several writes must end the same way when it stops between two, when
// a write fails, and when two requests race.

// publishEvent publishes an event as an agent or the provisioner would.
func publishEvent(t *testing.T, js jetstream.JetStream, e protocol.Event) {
	t.Helper()
	if e.ID == "" {
		e.ID = protocol.NewID("ev")
	}
	if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	data, err := protocol.Encode(&e)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(context.Background(), protocol.EventSubject(e.Instance, e.Kind), data, jetstream.WithMsgID(e.ID)); err != nil {
		t.Fatal(err)
	}
}

// waitRedelivered waits until an event was folded, refused and handed
// back at least once.
func waitRedelivered(t *testing.T, js jetstream.JetStream) {
	t.Helper()
	cons, err := js.Consumer(context.Background(), protocol.StreamEvents, server.EventsConsumer)
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(20 * time.Second); ; {
		info, err := cons.Info(context.Background())
		if err == nil && info.NumRedelivered > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the event was never handed back")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// refuseWrites makes a bucket's writes fail until the returned function is
// called: its stream stops listening on its subjects, so that a write finds
// no stream to take it, as when the bus loses it.
func refuseWrites(t *testing.T, js jetstream.JetStream, bucket string) func() {
	t.Helper()
	ctx := context.Background()
	st, err := js.Stream(ctx, "KV_"+bucket)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	was := info.Config
	deaf := was
	deaf.Subjects = []string{"refused." + bucket + ".>"}
	if _, err := js.UpdateStream(ctx, deaf); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	restore := func() {
		once.Do(func() {
			if _, err := js.UpdateStream(ctx, was); err != nil {
				t.Error(err)
			}
		})
	}
	t.Cleanup(restore)
	return restore
}

func (f *fm) future(id string) api.Future {
	f.t.Helper()
	var op api.Future
	r := f.do("GET", "/futures/"+id+"?peek=True", "")
	if r.status != 200 {
		f.t.Fatalf("future %s: %d %s", id, r.status, r.body)
	}
	f.ok(r, &op)
	return op
}

func (f *fm) waitFuture(id, state string, within time.Duration) api.Future {
	f.t.Helper()
	deadline := time.Now().Add(within)
	for {
		op := f.future(id)
		if op.State == state {
			return op
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("operation %s is %s after %s, want %s: %+v", id, op.State, within, state, op)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestAnEventNotFoldedIsFoldedAgain: the result of a command arrives while
// the server cannot write the operation; the event is handed back and
// folded once the bus takes writes again, instead of being acknowledged
// and lost (the operation would have run to its deadline).
func TestAnEventNotFoldedIsFoldedAgain(t *testing.T) {
	f := start(t, servertest.WithConfig(func(c *server.Config) { c.SweepInterval = time.Hour }))
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("fold", vn.ID, tpl.ID, im.ID))
	runningWithVolume(t, f.env.Bus, in.ID)
	var op api.Future
	f.ok(f.do("GET", "/instances/"+in.ID+"/actions/restart-dss", ""), &op)
	js := f.env.Bus.JetStream(t)
	restore := refuseWrites(t, js, protocol.BucketOps)
	publishEvent(t, js, protocol.Event{Instance: in.ID, Kind: protocol.EventCommand, Source: "agent", CommandID: op.JobID + "-cmd",
		OpID: op.JobID, Step: string(protocol.CommandRestartDSS), Status: protocol.StatusOK, Message: "DSS is running"})
	waitRedelivered(t, js)
	if got := f.future(op.JobID); got.State != api.OpRunning {
		t.Fatalf("the operation changed while its bucket refused writes: %+v", got)
	}
	restore()
	f.waitFuture(op.JobID, api.OpSucceeded, 20*time.Second)
	waitState(t, f, in.ID, "running")
}

// TestEndingAnOperationSurvivesACrash: the server dies between ending an
// operation and moving the instance's lifecycle on; the next server
// finishes the move at once instead of leaving the instance busy with an
// operation that ended (or, in the order of old, an operation running
// that nothing points at, until its deadline).
func TestEndingAnOperationSurvivesACrash(t *testing.T) {
	var env *servertest.Env
	crashed := make(chan struct{})
	var once sync.Once
	f := start(t, servertest.WithConfig(func(c *server.Config) {
		c.SweepInterval = 100 * time.Millisecond
		c.Crash = func(point string) {
			if point != "server/end-op/ended" {
				return
			}
			once.Do(func() {
				env.Die()
				close(crashed)
				select {} // dead
			})
		}
	}))
	env = f.env
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("end", vn.ID, tpl.ID, im.ID))
	runningWithVolume(t, f.env.Bus, in.ID)
	var op api.Future
	f.ok(f.do("GET", "/instances/"+in.ID+"/actions/restart-dss", ""), &op)
	js := f.env.Bus.JetStream(t)
	publishEvent(t, js, protocol.Event{Instance: in.ID, Kind: protocol.EventCommand, Source: "agent", CommandID: op.JobID + "-cmd",
		OpID: op.JobID, Step: string(protocol.CommandRestartDSS), Status: protocol.StatusOK, Message: "DSS is running"})
	select {
	case <-crashed:
	case <-time.After(20 * time.Second):
		t.Fatal("the server never ended the operation")
	}
	f.env.StartAgain(t, func(c *server.Config) { c.Crash = nil })
	f.waitFuture(op.JobID, api.OpSucceeded, 10*time.Second)
	waitState(t, f, in.ID, "running")
	// And the instance takes the next action.
	var next api.Future
	f.ok(f.do("GET", "/instances/"+in.ID+"/actions/restart-dss", ""), &next)
}

// TestTheStatusShowsWhereAnEndedOperationLeavesTheInstance: between
// ending an operation and moving the instance's lifecycle on, a client that
// saw the operation end reads the state the instance goes to, not the one
// it leaves (a CI run read "starting" after a reprovision had succeeded).
func TestTheStatusShowsWhereAnEndedOperationLeavesTheInstance(t *testing.T) {
	paused, resume := make(chan struct{}), make(chan struct{})
	var once sync.Once
	f := start(t, servertest.WithConfig(func(c *server.Config) {
		c.Crash = func(point string) {
			if point == "server/end-op/ended" {
				once.Do(func() { close(paused); <-resume })
			}
		}
	}))
	released := sync.OnceFunc(func() { close(resume) })
	t.Cleanup(released)
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("ended", vn.ID, tpl.ID, im.ID))
	runningWithVolume(t, f.env.Bus, in.ID)
	var fut api.Future
	f.accepted("GET", "/instances/"+in.ID+"/actions/stop", &fut)
	js := f.env.Bus.JetStream(t)
	req, _ := opRequest(t, js, fut.JobID)
	putMachine(t, js, protocol.MachineState{Instance: in.ID, Backend: "fake", Status: protocol.MachineStopped, MachineID: "m-1",
		VolumeID: "vol-1", VolumeSizeGB: 50, RequestID: req.ID})
	select {
	case <-paused:
	case <-time.After(20 * time.Second):
		t.Fatal("the server never ended the stop")
	}
	// The lifecycle still says stopping and points at the operation.
	var st map[string]any
	f.ok(f.do("GET", "/instances/"+in.ID+"/status", ""), &st)
	op, _ := st["operation"].(map[string]any)
	if st["state"] != "stopped" || op == nil || op["state"] != api.OpSucceeded {
		t.Fatalf("status while the lifecycle is being moved on: %v", st)
	}
	released()
	waitState(t, f, in.ID, "stopped")
}

// TestARefusedReprovisionKeepsTheRunningMachinesKey: a reprovision the
// provisioner refuses before it changes anything (the snapshot before an
// upgrade failed) leaves the running machine's instance key the
// instance's: what FM seals for that machine still opens there. The key
// of the machine a reprovision makes becomes the instance's only when that
// machine joins.
func TestARefusedReprovisionKeepsTheRunningMachinesKey(t *testing.T) {
	f := startWithAuthority(t, time.Hour)
	vn, tpl, _ := f.fleet()
	im := f.addImageWithKit("dss-key", "14.0.0")
	in := f.createInstance(instanceBody("key", vn.ID, tpl.ID, im.ID))
	// The first machine joins: its key is the instance's.
	req := f.provisionRequest(in.ID)
	var joined protocol.JoinResponse
	f.ok(f.join(in.ID, req.Spec.Join.Token), &joined)
	runningWithVolume(t, f.env.Bus, in.ID)
	js := f.env.Bus.JetStream(t)
	machineRunning(t, js, in.ID, req.ID)
	// A second reprovision, which the provisioner refuses untouched.
	var op api.Future
	f.ok(f.do("GET", "/instances/"+in.ID+"/actions/reprovision", ""), &op)
	second := op.JobID + "-reprovision"
	refused := protocol.MachineState{Instance: in.ID, Backend: "fake", Status: protocol.MachineRunning, MachineID: "m-1",
		VolumeID: "vol-1", RequestID: second, Error: protocol.Errorf(protocol.CodeUnavailable, "the snapshot store is away")}
	putMachine(t, js, refused)
	if _, err := f.waitFutureErr(op.JobID, 20*time.Second); err == nil {
		t.Fatal("the refused reprovision succeeded")
	}
	// A command to the running machine is sealed with its key.
	var reset api.Future
	f.ok(f.do("POST", "/instances/"+in.ID+"/actions/reset-user-password", `{"userName":"admin","password":"still-mine"}`), &reset)
	st, err := js.Stream(context.Background(), protocol.StreamCommands)
	if err != nil {
		t.Fatal(err)
	}
	m, err := st.GetLastMsgForSubject(context.Background(), protocol.CommandSubject(in.ID, reset.JobID+"-cmd"))
	if err != nil {
		t.Fatal(err)
	}
	var cmd protocol.Command
	if err := protocol.Decode(m.Data, &cmd); err != nil {
		t.Fatal(err)
	}
	raw, _ := base64.StdEncoding.DecodeString(joined.InstanceKey)
	box, err := seal.New(raw)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := box.Open(cmd.SealedParams, protocol.SealedParamsPlace(cmd.Instance, cmd.ID))
	if err != nil {
		t.Fatalf("the running machine cannot open what FM seals for it after a refused reprovision: %v", err)
	}
	var p protocol.ResetUserPasswordParams
	if json.Unmarshal([]byte(plain), &p) != nil || p.Password != "still-mine" {
		t.Fatalf("params %s", plain)
	}
}

// waitFutureErr waits until the operation ends and returns it, with an
// error if it did not succeed.
func (f *fm) waitFutureErr(id string, within time.Duration) (api.Future, error) {
	f.t.Helper()
	deadline := time.Now().Add(within)
	for {
		op := f.future(id)
		switch op.State {
		case api.OpSucceeded:
			return op, nil
		case api.OpFailed, api.OpAborted:
			return op, &apiErr{op.Error}
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("operation %s still %s after %s", id, op.State, within)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

type apiErr struct{ e *api.Error }

func (e *apiErr) Error() string {
	if e.e == nil {
		return "failed"
	}
	return e.e.DetailedMessage
}

func putMachine(t testing.TB, js jetstream.JetStream, m protocol.MachineState) {
	t.Helper()
	kv, err := js.KeyValue(context.Background(), protocol.BucketMachines)
	if err != nil {
		t.Fatal(err)
	}
	data, err := protocol.Encode(&m)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(context.Background(), m.Instance, data); err != nil {
		t.Fatal(err)
	}
}

// machineRunning records the instance's machine as running, made by
// request.
func machineRunning(t testing.TB, js jetstream.JetStream, instance, request string) {
	putMachine(t, js, protocol.MachineState{Instance: instance, Backend: "fake", Status: protocol.MachineRunning, MachineID: "m-1",
		VolumeID: "vol-1", VolumeSizeGB: 50, RequestID: request})
}

// TestADeletionRacingAReprovision: a reprovision that read the instance
// before a deletion erased it, and claims it after, sends nothing (an
// orphaned, billed machine on a cloud) and answers that the instance is
// gone; a deletion that claims the instance first refuses reprovisions.
func TestADeletionRacingAReprovision(t *testing.T) {
	paused, resume := make(chan struct{}), make(chan struct{})
	var once sync.Once
	f := start(t, servertest.WithConfig(func(c *server.Config) {
		c.LocalBackend = true
		c.Crash = func(point string) {
			if point == "server/act/op-recorded" {
				once.Do(func() {
					close(paused)
					<-resume
				})
			}
		}
	}))
	vn, tpl, _ := f.fleet()
	kit := f.addImageWithKit("dss-race", "14.0.0")
	in := f.createInstance(instanceBody("race", vn.ID, tpl.ID, kit.ID))
	answered := make(chan response, 1)
	go func() { answered <- f.do("GET", "/instances/"+in.ID+"/actions/reprovision", "") }()
	<-paused // the reprovision looked at the instance, and is about to claim it
	var del api.Future
	f.ok(f.do("GET", "/instances/"+in.ID+"/actions/delete", ""), &del)
	if del.State != api.OpSucceeded {
		t.Fatalf("deletion: %+v", del)
	}
	close(resume)
	r := <-answered
	if r.status != 404 {
		t.Fatalf("the reprovision of a deleted instance answered %d %s", r.status, r.body)
	}
	st, err := f.env.Bus.JetStream(t).Stream(context.Background(), protocol.StreamProvision)
	if err != nil {
		t.Fatal(err)
	}
	if info, _ := st.Info(context.Background()); info.State.Msgs != 0 {
		t.Fatalf("%d provision requests were sent for a deleted instance", info.State.Msgs)
	}
	f.failed(f.do("GET", "/instances/"+in.ID, ""), 404, "NotFound")

	// The other way round: a deletion of an instance a reprovision claimed
	// is refused.
	in2 := f.createInstance(instanceBody("race2", vn.ID, tpl.ID, kit.ID))
	var op api.Future
	f.ok(f.do("GET", "/instances/"+in2.ID+"/actions/reprovision", ""), &op)
	f.failed(f.do("GET", "/instances/"+in2.ID+"/actions/delete", ""), 409, "FailedPrecondition")
}

// TestADeletionRacingAReprovisionThatDies: the reprovision claimed a
// deleted instance and its server died there, before it looked again: the
// sweep ends the operation, drops the instance's records and sends nothing
// (no machine for an instance that is gone). A claim can also lose to the
// deletion's last purges (the sweep finishing the same deletion from a copy
// a moment behind): then the reprovision is refused with 404 and its
// operation forgotten, as nobody saw it; either way nothing goes out.
func TestADeletionRacingAReprovisionThatDies(t *testing.T) {
	paused, resume, dead := make(chan struct{}), make(chan struct{}), make(chan struct{})
	var pause, die sync.Once
	f := start(t, servertest.WithConfig(func(c *server.Config) {
		c.LocalBackend, c.SweepInterval, c.RepublishAfter = true, 100*time.Millisecond, 300*time.Millisecond
		c.Crash = func(point string) {
			switch point {
			case "server/act/op-recorded":
				pause.Do(func() {
					close(paused)
					<-resume
				})
			case "server/act/instance-claimed":
				// The server dies here: this call goes no further.
				die.Do(func() { <-dead })
			}
		}
	}))
	t.Cleanup(func() { close(dead) })
	vn, tpl, _ := f.fleet()
	kit := f.addImageWithKit("dss-race", "14.0.0")
	in := f.createInstance(instanceBody("race", vn.ID, tpl.ID, kit.ID))
	refused := make(chan response, 1)
	go func() {
		// Answered only when the claim was lost; a call that died is never.
		if r, err := f.tryFrom("", "GET", "/instances/"+in.ID+"/actions/reprovision", "", f.env.Key.ID, f.env.Key.Secret); err == nil {
			refused <- r
		}
	}()
	<-paused
	var del api.Future
	f.ok(f.do("GET", "/instances/"+in.ID+"/actions/delete", ""), &del)
	if del.State != api.OpSucceeded {
		t.Fatalf("deletion: %+v", del)
	}
	close(resume)
	js := f.env.Bus.JetStream(t)
	lifecycle, err := js.KeyValue(context.Background(), protocol.BucketLifecycle)
	if err != nil {
		t.Fatal(err)
	}
	var (
		ended   api.Future
		running []api.Future
		answer  *response
	)
	waitFor(t, "the reprovision of the deleted instance ended or was refused, its records gone", func() bool {
		var ops []api.Future
		f.ok(f.do("GET", "/futures?targetId="+in.ID, ""), &ops)
		running = running[:0]
		for _, op := range ops {
			switch {
			case op.Kind == "reprovision" && op.State != api.OpRunning:
				ended = op
			case op.State == api.OpRunning:
				running = append(running, op)
			}
		}
		select {
		case r := <-refused:
			answer = &r
		default:
		}
		_, err := lifecycle.Get(context.Background(), in.ID)
		return (ended.JobID != "" || answer != nil) && len(running) == 0 && err != nil
	})
	switch {
	case ended.JobID != "":
		// Ended as the instance's deletion says, or, when the sweep found it
		// unclaimed first (the deletion took a while), as never started.
		if ended.State != api.OpFailed || ended.Error == nil ||
			ended.Error.ErrorType != string(protocol.CodeNotFound) && ended.Error.Message != "Operation never started" {
			t.Fatalf("the reprovision of a deleted instance: %+v", ended)
		}
	case answer.status != http.StatusNotFound:
		t.Fatalf("the reprovision that lost its claim to a deletion: %d %s", answer.status, answer.body)
	}
	st, err := js.Stream(context.Background(), protocol.StreamProvision)
	if err != nil {
		t.Fatal(err)
	}
	if info, _ := st.Info(context.Background()); info.State.Msgs != 0 {
		t.Fatalf("%d provision requests were sent for a deleted instance", info.State.Msgs)
	}
}

// TestADeletionThatDiesFindsAMachineMadeMeanwhile: a deletion of an
// instance without a machine died after its claim, and a machine appeared
// since (made from a stale look): finishing the deletion would leave that
// machine running unseen, so the deletion fails and the instance stays.
func TestADeletionThatDiesFindsAMachineMadeMeanwhile(t *testing.T) {
	claimed, dead := make(chan struct{}), make(chan struct{})
	var die sync.Once
	f := start(t, servertest.WithConfig(func(c *server.Config) {
		c.LocalBackend, c.SweepInterval, c.RepublishAfter = true, 100*time.Millisecond, 300*time.Millisecond
		c.Crash = func(point string) {
			if point == "server/delete/instance-claimed" {
				die.Do(func() {
					close(claimed)
					<-dead
				})
			}
		}
	}))
	t.Cleanup(func() { close(dead) })
	vn, tpl, _ := f.fleet()
	kit := f.addImageWithKit("dss-race", "14.0.0")
	in := f.createInstance(instanceBody("race", vn.ID, tpl.ID, kit.ID))
	go f.send("GET", "/instances/"+in.ID+"/actions/delete")
	<-claimed
	machineRunning(t, f.env.Bus.JetStream(t), in.ID, "op-stale-reprovision")
	var ended api.Future
	waitFor(t, "the deletion ended", func() bool {
		var ops []api.Future
		f.ok(f.do("GET", "/futures?targetId="+in.ID, ""), &ops)
		for _, op := range ops {
			if op.Kind == "delete-instance" && op.State != api.OpRunning {
				ended = op
			}
		}
		return ended.JobID != ""
	})
	if ended.State != api.OpFailed || ended.Error == nil || ended.Error.ErrorType != string(protocol.CodeFailedPrecondition) {
		t.Fatalf("the deletion of an instance with a machine: %+v", ended)
	}
	f.ok(f.do("GET", "/instances/"+in.ID, ""), nil)
}

// TestAClaimAfterTheSweepEndedItStartsAgain: a call that stalled between
// recording its operation and claiming its target (the bus electing a
// leader) finds its operation ended by the sweep as never started. The
// stall was the bus's, not the caller's: the call gives the target back,
// sends nothing for the ended operation, and starts again with a new one.
func TestAClaimAfterTheSweepEndedItStartsAgain(t *testing.T) {
	for _, tc := range []struct {
		name, point, method string
		begin               func(f *fm) (target, path string)
	}{
		// An instance's actions are GETs, as the Dataiku client sends them.
		{"instance", "server/act/op-recorded", "GET", func(f *fm) (string, string) {
			vn, tpl, _ := f.fleet()
			kit := f.addImageWithKit("dss-stall", "14.0.0")
			in := f.createInstance(instanceBody("stall", vn.ID, tpl.ID, kit.ID))
			return in.ID, "/instances/" + in.ID + "/actions/reprovision"
		}},
		{"load balancer", "server/lb/op-recorded", "POST", func(f *fm) (string, string) {
			vn, tpl, im := f.lbFleet()
			a := f.createInstance(instanceBody("a", vn.ID, tpl.ID, im.ID))
			machineRunning(f.t, f.env.Bus.JetStream(f.t), a.ID, "req-a")
			var lb api.LoadBalancer
			f.ok(f.do("POST", "/load-balancers", lbBody("front", vn.ID, "a.example.com", a.ID)), &lb)
			return lb.ID, "/load-balancers/" + lb.ID + "/actions/provision"
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			paused, resume := make(chan struct{}), make(chan struct{})
			var once sync.Once
			f := start(t, servertest.WithConfig(func(c *server.Config) {
				c.LocalBackend, c.SweepInterval, c.RepublishAfter = true, 100*time.Millisecond, 300*time.Millisecond
				c.Crash = func(point string) {
					if point == tc.point {
						once.Do(func() {
							close(paused)
							<-resume
						})
					}
				}
			}))
			target, path := tc.begin(f)
			answered := make(chan response, 1)
			go func() { answered <- f.do(tc.method, path, "") }()
			select {
			case <-paused:
			case r := <-answered:
				t.Fatalf("the call answered %d %s before it recorded an operation", r.status, r.body)
			}
			var ended api.Future
			waitFor(t, "the stalled operation ended as never started", func() bool {
				var ops []api.Future
				f.ok(f.do("GET", "/futures?targetId="+target, ""), &ops)
				for _, op := range ops {
					if op.State != api.OpRunning {
						ended = op
					}
				}
				return ended.JobID != ""
			})
			if ended.Error == nil || ended.Error.Message != "Operation never started" {
				t.Fatalf("the stalled operation: %+v", ended)
			}
			close(resume)
			r := <-answered
			if r.status != http.StatusOK {
				t.Fatalf("the call whose operation was ended under it answered %d %s", r.status, r.body)
			}
			var op api.Future
			if err := json.Unmarshal(r.body, &op); err != nil {
				t.Fatal(err)
			}
			if op.JobID == "" || op.JobID == ended.JobID {
				t.Fatalf("the call answered %+v; the ended operation was %s", op, ended.JobID)
			}
			st, err := f.env.Bus.JetStream(t).Stream(context.Background(), protocol.StreamProvision)
			if err != nil {
				t.Fatal(err)
			}
			var info *jetstream.StreamInfo
			waitFor(t, "the new operation's request sent", func() bool {
				info, err = st.Info(context.Background())
				return err == nil && info.State.Msgs >= 1
			})
			sent := 0
			for seq := info.State.FirstSeq; seq <= info.State.LastSeq; seq++ {
				m, err := st.GetMsg(context.Background(), seq)
				if err != nil {
					continue // a gap
				}
				var req protocol.ProvisionRequest
				if err := json.Unmarshal(m.Data, &req); err != nil {
					t.Fatal(err)
				}
				if req.OpID != op.JobID {
					t.Fatalf("a request went out for operation %s, not the new one %s", req.OpID, op.JobID)
				}
				sent++
			}
			if sent != 1 {
				t.Fatalf("%d requests of the new operation went out", sent)
			}

			// A sweep that read the target before this claim, and ends the
			// operation only now, finds it claimed and leaves it running.
			server.EndNeverStarted(f.env.Server, op.JobID)
			var now api.Future
			f.ok(f.do("GET", "/futures/"+op.JobID, ""), &now)
			if now.State != api.OpRunning {
				t.Fatalf("a claimed operation ended by a late sweep: %+v", now)
			}
		})
	}
}

// TestADeletionIsDoneOnceTheInstanceIsGone: between a deletion's end and
// the erasing of its instance (the server stopped there, or the erase not
// yet seen by this replica's copy), the deletion's future is told as under
// way: a client that sees it done and lists the instances does not find
// the instance there.
func TestADeletionIsDoneOnceTheInstanceIsGone(t *testing.T) {
	paused, resume := make(chan struct{}), make(chan struct{})
	var armed atomic.Bool
	var once sync.Once
	f := start(t, servertest.WithConfig(func(c *server.Config) {
		c.SweepInterval = time.Hour // the sweep would settle the deletion during the pause
		c.Crash = func(point string) {
			if point == "server/end-op/ended" && armed.Load() {
				once.Do(func() {
					close(paused)
					<-resume
				})
			}
		}
	}))
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("gone", vn.ID, tpl.ID, im.ID))
	armed.Store(true)
	done := make(chan response, 1)
	go func() { done <- f.do("GET", "/instances/"+in.ID+"/actions/delete", "") }()
	<-paused // the deletion ended, its instance not erased yet
	var ops []api.Future
	f.ok(f.do("GET", "/futures?targetId="+in.ID, ""), &ops)
	if len(ops) != 1 {
		t.Fatalf("operations %+v", ops)
	}
	var op api.Future
	f.ok(f.do("GET", "/futures/"+ops[0].JobID, ""), &op)
	if op.HasResult || op.State != api.OpRunning {
		t.Fatalf("the deletion's future before its instance is gone: %+v", op)
	}
	f.ok(f.do("GET", "/instances/"+in.ID, ""), nil) // still listed: the state the future reflects
	close(resume)
	r := <-done
	var answered api.Future
	if r.status != 200 || json.Unmarshal(r.body, &answered) != nil || !answered.HasResult || answered.State != api.OpSucceeded {
		t.Fatalf("delete: %d %s", r.status, r.body)
	}
	var listed []api.Instance
	f.ok(f.do("GET", "/instances", ""), &listed)
	for _, l := range listed {
		if l.ID == in.ID {
			t.Fatal("the instance is listed after its deletion answered done")
		}
	}
	waitFor(t, "the deletion done once the instance is gone", func() bool {
		var op api.Future
		f.ok(f.do("GET", "/futures/"+ops[0].JobID, ""), &op)
		return op.HasResult && op.State == api.OpSucceeded
	})
	f.failed(f.do("GET", "/instances/"+in.ID, ""), 404, "NotFound")
}
