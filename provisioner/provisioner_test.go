package provisioner

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// recorder is a backend that records the requests it is given and does what
// the test tells it to.
type recorder struct {
	mu    sync.Mutex
	calls []string // "<action> <request id>"
	fail  map[string]error
	// flaky fails a request this many times with Unavailable (the cloud
	// away for a while) before doing it.
	flaky   map[string]int
	block   chan struct{} // when set, Reprovision waits for it
	alive   bool
	entered chan string
}

func newRecorder() *recorder {
	return &recorder{fail: map[string]error{}, flaky: map[string]int{}, alive: true, entered: make(chan string, 100)}
}

func (r *recorder) Name() string { return "recorder" }

func (r *recorder) record(ctx context.Context, req Request) error {
	r.mu.Lock()
	r.calls = append(r.calls, string(req.Action)+" "+req.ID)
	err := r.fail[req.ID]
	if r.flaky[req.ID] > 0 {
		r.flaky[req.ID]--
		err = protocol.Errorf(protocol.CodeUnavailable, "the cloud is away for now")
	}
	block := r.block
	r.mu.Unlock()
	r.entered <- req.ID
	if block != nil {
		select {
		case <-block:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	req.Progress("step", "did "+string(req.Action))
	return err
}

func (r *recorder) result(ctx context.Context, req Request, cur protocol.MachineState, st protocol.MachineStatus) (protocol.MachineState, error) {
	if err := r.record(ctx, req); err != nil {
		return protocol.MachineState{}, err
	}
	cur.Status, cur.MachineID, cur.VolumeID = st, "m-"+req.Instance, "vol-"+req.Instance
	return cur, nil
}

func (r *recorder) Snapshot(ctx context.Context, req Request, cur protocol.MachineState, snap protocol.SnapshotRef) (protocol.SnapshotRef, error) {
	r.mu.Lock()
	r.calls = append(r.calls, "snapshot "+snap.ID+" of "+cur.VolumeID)
	err := r.fail["snapshot "+snap.ID]
	r.mu.Unlock()
	snap.Store, snap.Ref = "recorder", "ref-"+snap.ID
	return snap, err
}

func (r *recorder) GrowVolume(ctx context.Context, req Request, cur protocol.MachineState, sizeGB int) (protocol.MachineState, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, fmt.Sprintf("grow-volume %s to %d", cur.VolumeID, sizeGB))
	cur.VolumeSizeGB = sizeGB
	return cur, nil
}

func (r *recorder) DeleteSnapshot(ctx context.Context, req Request, snap protocol.SnapshotRef) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, "delete-snapshot "+snap.ID)
	return nil
}

func (r *recorder) Reprovision(ctx context.Context, req Request, cur protocol.MachineState) (protocol.MachineState, error) {
	return r.result(ctx, req, cur, protocol.MachineRunning)
}
func (r *recorder) Deprovision(ctx context.Context, req Request, cur protocol.MachineState) (protocol.MachineState, error) {
	return r.result(ctx, req, cur, protocol.MachineDeprovisioned)
}
func (r *recorder) Start(ctx context.Context, req Request, cur protocol.MachineState) (protocol.MachineState, error) {
	return r.result(ctx, req, cur, protocol.MachineRunning)
}
func (r *recorder) Stop(ctx context.Context, req Request, cur protocol.MachineState) (protocol.MachineState, error) {
	return r.result(ctx, req, cur, protocol.MachineStopped)
}
func (r *recorder) Delete(ctx context.Context, req Request, cur protocol.MachineState) (protocol.MachineState, error) {
	return r.result(ctx, req, cur, protocol.MachineDeleted)
}
func (r *recorder) Alive(ctx context.Context, machines []protocol.MachineState) (map[string]bool, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string]bool{}
	for _, m := range machines {
		out[m.Instance] = r.alive
	}
	return out, nil
}

func (r *recorder) callList() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.calls...)
}

type rig struct {
	t   *testing.T
	bus *bustest.Server
	js  jetstream.JetStream
}

func newRig(t *testing.T) *rig {
	srv := bustest.Run(t)
	return &rig{t: t, bus: srv, js: srv.JetStream(t)}
}

// run starts a provisioner; the returned function stops it and waits.
func (r *rig) run(b Backend, holder string) func() {
	r.t.Helper()
	_, stop := r.runLogged(b, holder, zerolog.Nop())
	return stop
}

// runLogged is run with a logger, returning the provisioner too.
func (r *rig) runLogged(b Backend, holder string, log zerolog.Logger) (*Provisioner, func()) {
	r.t.Helper()
	p, err := New(Config{Conn: r.bus.Connect(r.t), Backend: b, Holder: holder, LeaseTTL: 15 * time.Second,
		CheckInterval: 100 * time.Millisecond, Logger: log})
	if err != nil {
		r.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = p.Run(ctx) }()
	stop := func() { cancel(); <-done }
	r.t.Cleanup(stop)
	return p, stop
}

func (r *rig) request(instance string, action protocol.ProvisionAction, id string) {
	r.t.Helper()
	r.requestMsgID(instance, action, id, id)
}

func (r *rig) requestMsgID(instance string, action protocol.ProvisionAction, id, msgID string) {
	r.t.Helper()
	r.publish(protocol.ProvisionRequest{ID: id, Instance: instance, Action: action, Issued: time.Now().UTC(), Generation: 1,
		Spec: &protocol.MachineSpec{Label: "x", DataVolume: protocol.VolumeSpec{SizeGB: 1}}}, msgID)
}

func (r *rig) publish(req protocol.ProvisionRequest, msgID string) {
	r.t.Helper()
	instance, action := req.Instance, req.Action
	if req.LoadBalancer != nil {
		instance = req.LoadBalancer.ID // the subject names the load balancer
	}
	data, err := protocol.Encode(&req)
	if err != nil {
		r.t.Fatal(err)
	}
	if _, err := r.js.Publish(context.Background(), protocol.ProvisionSubject(instance, action), data, jetstream.WithMsgID(msgID)); err != nil {
		r.t.Fatal(err)
	}
}

func (r *rig) machine(instance string) protocol.MachineState {
	r.t.Helper()
	kv, _ := r.js.KeyValue(context.Background(), protocol.BucketMachines)
	e, err := kv.Get(context.Background(), instance)
	if err != nil {
		return protocol.MachineState{}
	}
	var st protocol.MachineState
	if err := protocol.Decode(e.Value(), &st); err != nil {
		r.t.Fatal(err)
	}
	return st
}

func (r *rig) waitMachine(instance string, cond func(protocol.MachineState) bool) protocol.MachineState {
	r.t.Helper()
	// Long enough for a lease left behind to expire (15 s) on a loaded
	// machine; a passing test returns as soon as the state is reached.
	deadline := time.Now().Add(45 * time.Second)
	for time.Now().Before(deadline) {
		if st := r.machine(instance); cond(st) {
			return st
		}
		time.Sleep(20 * time.Millisecond)
	}
	r.t.Fatalf("machine of %s never reached the expected state; last: %+v", instance, r.machine(instance))
	return protocol.MachineState{}
}

// waitDrained waits until every request published so far is answered:
// the provisioner's consumer has none left to deliver or awaiting its
// acknowledgement, and the work queue is empty.
func (r *rig) waitDrained() {
	r.t.Helper()
	ctx := context.Background()
	var last string
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		cons, err := r.js.Consumer(ctx, protocol.StreamProvision, ConsumerName)
		if err != nil {
			last = err.Error()
			continue
		}
		info, err := cons.Info(ctx)
		if err != nil {
			last = err.Error()
			continue
		}
		st, err := r.js.Stream(ctx, protocol.StreamProvision)
		if err != nil {
			last = err.Error()
			continue
		}
		sinfo, err := st.Info(ctx)
		if err != nil {
			last = err.Error()
			continue
		}
		if info.NumPending == 0 && info.NumAckPending == 0 && sinfo.State.Msgs == 0 {
			return
		}
		last = fmt.Sprintf("%d pending, %d awaiting acknowledgement, %d in the stream", info.NumPending, info.NumAckPending, sinfo.State.Msgs)
	}
	r.t.Fatalf("the provision requests were not all answered: %s", last)
}

func TestRequestsRunOnceAndInOrder(t *testing.T) {
	r := newRig(t)
	rec := newRecorder()
	r.run(rec, "p1")
	r.request("in-a", protocol.ProvisionReprovision, "op-1-reprovision")
	r.request("in-a", protocol.ProvisionReprovision, "op-1-reprovision") // a duplicate publish
	r.request("in-a", protocol.ProvisionStop, "op-2-stop")
	r.request("in-a", protocol.ProvisionStart, "op-3-start")
	r.request("in-b", protocol.ProvisionReprovision, "op-4-reprovision")
	st := r.waitMachine("in-a", func(s protocol.MachineState) bool { return s.RequestID == "op-3-start" && !transitional(s.Status) })
	if st.Status != protocol.MachineRunning || st.Generation != 1 || st.Backend != "recorder" {
		t.Fatalf("%+v", st)
	}
	r.waitMachine("in-b", func(s protocol.MachineState) bool { return s.Status == protocol.MachineRunning })
	var a []string
	for _, c := range rec.callList() {
		if c != "reprovision op-4-reprovision" {
			a = append(a, c)
		}
	}
	want := []string{"reprovision op-1-reprovision", "stop op-2-stop", "start op-3-start"}
	if fmt.Sprint(a) != fmt.Sprint(want) {
		t.Fatalf("calls for in-a: %v, want %v", a, want)
	}
}

func TestARequestInterruptedByACrashIsResumed(t *testing.T) {
	r := newRig(t)
	rec := newRecorder()
	rec.block = make(chan struct{})
	stop := r.run(rec, "p1")
	r.request("in-a", protocol.ProvisionReprovision, "op-1-reprovision")
	<-rec.entered
	// The provisioner dies in the middle of the machine operation.
	stop()
	if st := r.machine("in-a"); st.Status != protocol.MachineProvisioning || st.RequestID != "op-1-reprovision" {
		t.Fatalf("before the crash: %+v", st)
	}
	// A new one gets the unacknowledged request again and finishes it.
	rec2 := newRecorder()
	r.run(rec2, "p2")
	r.waitMachine("in-a", func(s protocol.MachineState) bool { return s.Status == protocol.MachineRunning })
	if calls := rec2.callList(); len(calls) != 1 || calls[0] != "reprovision op-1-reprovision" {
		t.Fatalf("the resumed provisioner made %v", calls)
	}
	// Republished under another message id (as the server's sweeper does
	// once the duplicate window has passed), a finished request is only
	// acknowledged.
	r.requestMsgID("in-a", protocol.ProvisionReprovision, "op-1-reprovision", "republished")
	r.waitDrained()
	if calls := rec2.callList(); len(calls) != 1 {
		t.Fatalf("a request already handled ran again: %v", calls)
	}
}

func TestFailuresAreRecordedAndReported(t *testing.T) {
	r := newRig(t)
	rec := newRecorder()
	rec.fail["op-1-reprovision"] = protocol.Errorf(protocol.CodeInvalidArgument, "AMI ami-nope does not exist")
	r.run(rec, "p1")
	r.request("in-a", protocol.ProvisionReprovision, "op-1-reprovision")
	st := r.waitMachine("in-a", func(s protocol.MachineState) bool { return s.Status == protocol.MachineFailed })
	if st.Error == nil || st.Error.Code != protocol.CodeInvalidArgument || st.Error.Message != "AMI ami-nope does not exist" {
		t.Fatalf("%+v", st.Error)
	}
	ev := waitEvent(t, r, "in-a", func(e protocol.Event) bool {
		return e.Kind == protocol.EventMachine && e.Status == protocol.StatusFailed
	})
	if ev.Error == nil || ev.Source != "provisioner" {
		t.Fatalf("%+v", ev)
	}
	// A malformed request is rejected without touching the backend.
	if _, err := r.js.Publish(context.Background(), protocol.ProvisionSubject("in-b", protocol.ProvisionReprovision), []byte(`{"v":1}`)); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, r, "in-b", func(e protocol.Event) bool { return e.Kind == protocol.EventRejected })
	for _, c := range rec.callList() {
		if c != "reprovision op-1-reprovision" {
			t.Fatalf("unexpected backend call %s", c)
		}
	}
}

func TestOnlyTheLeaseHolderWorks(t *testing.T) {
	r := newRig(t)
	a, b := newRecorder(), newRecorder()
	stopA := r.run(a, "holder-a")
	r.request("in-1", protocol.ProvisionReprovision, "op-1-reprovision")
	r.waitMachine("in-1", func(s protocol.MachineState) bool { return s.Status == protocol.MachineRunning })
	r.run(b, "holder-b")
	r.request("in-2", protocol.ProvisionReprovision, "op-2-reprovision")
	r.waitMachine("in-2", func(s protocol.MachineState) bool { return s.Status == protocol.MachineRunning })
	if len(b.callList()) != 0 {
		t.Fatal("a provisioner without the lease did work")
	}
	// The holder stops (and releases the lease): the other takes over.
	stopA()
	r.request("in-3", protocol.ProvisionReprovision, "op-3-reprovision")
	r.waitMachine("in-3", func(s protocol.MachineState) bool { return s.Status == protocol.MachineRunning })
	if calls := b.callList(); len(calls) != 1 || calls[0] != "reprovision op-3-reprovision" {
		t.Fatalf("after the takeover: %v", calls)
	}
}

// TestAProvisionerThatCannotProveItsLeaseActsOnNothing: a provisioner
// whose lease can no longer be proven on its clock (a process resumed after
// being stopped longer than the lease, before its lease keeper has run)
// hands a request back without carrying it out, even though its work has
// not been stopped yet; once it can prove the lease again, it does.
func TestAProvisionerThatCannotProveItsLeaseActsOnNothing(t *testing.T) {
	r := newRig(t)
	rec := newRecorder()
	var handedBack atomic.Int32
	p, _ := r.runLogged(rec, "holder-a", zerolog.New(io.Discard).Hook(zerolog.HookFunc(func(_ *zerolog.Event, _ zerolog.Level, msg string) {
		if strings.HasSuffix(msg, "request handed back") {
			handedBack.Add(1)
		}
	})))
	r.request("in-1", protocol.ProvisionReprovision, "op-1-reprovision")
	r.waitMachine("in-1", func(s protocol.MachineState) bool { return s.Status == protocol.MachineRunning })
	// The lease the workers ask about is one never proven: as if the
	// process had just been resumed long after its last renewal. The lease
	// keeper, on the real one, leaves the work running.
	held := p.lease.Load()
	p.lease.Store(&bus.Lease{TTL: 15 * time.Second})
	r.request("in-2", protocol.ProvisionReprovision, "op-2-reprovision")
	for deadline := time.Now().Add(30 * time.Second); handedBack.Load() < 2; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the request was not handed back twice")
		}
	}
	if calls := rec.callList(); len(calls) != 1 || r.machine("in-2").RequestID != "" {
		t.Fatalf("a provisioner that cannot prove its lease acted: calls %v, machine %+v", calls, r.machine("in-2"))
	}
	p.lease.Store(held)
	r.waitMachine("in-2", func(s protocol.MachineState) bool { return s.Status == protocol.MachineRunning })
}

// TestEachActAsksForTheLease: past the check when a request is taken, a
// provisioner asks again right before it changes a machine (a machine
// operation: after its pending state is written; a snapshot), and before it
// records a machine lost; without the lease it does none of them, and hands
// the request back.
func TestEachActAsksForTheLease(t *testing.T) {
	r := newRig(t)
	rec := newRecorder()
	p, stop := r.runLogged(rec, "holder-a", zerolog.Nop())
	r.request("in-1", protocol.ProvisionReprovision, "op-1-reprovision")
	r.waitMachine("in-1", func(s protocol.MachineState) bool { return s.Status == protocol.MachineRunning })
	stop() // the requests below are handed to p by the test itself
	ctx := context.Background()
	cons, err := r.js.Consumer(ctx, protocol.StreamProvision, ConsumerName)
	if err != nil {
		t.Fatal(err)
	}
	next := func() jetstream.Msg {
		t.Helper()
		batch, err := cons.Fetch(1, jetstream.FetchMaxWait(10*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		for m := range batch.Messages() {
			return m
		}
		t.Fatalf("no request delivered: %v", batch.Error())
		return nil
	}
	// The lease can be proven at the first question only.
	asked := 0
	p.held = func() bool { asked++; return asked == 1 }

	r.request("in-2", protocol.ProvisionReprovision, "op-2-reprovision")
	p.handle(ctx, next())
	if st := r.machine("in-2"); st.RequestID != "op-2-reprovision" || !transitional(st.Status) {
		t.Fatalf("the pending state, before the machine is changed: %+v", st)
	}
	r.publish(protocol.ProvisionRequest{ID: "op-3-snapshot", Instance: "in-1", Action: protocol.ProvisionSnapshot, OpID: "op-3",
		Snapshot: &protocol.SnapshotRef{ID: "snap-1"}}, "op-3-snapshot")
	asked = 0
	m := next()
	if !strings.HasSuffix(m.Subject(), ".snapshot") {
		// The reprovision handed back comes again first (after a second).
		p.held = func() bool { return false }
		p.handle(ctx, m)
		asked, p.held = 0, func() bool { asked++; return asked == 1 }
		m = next()
	}
	p.handle(ctx, m)
	running := r.machine("in-1")
	p.markLost(ctx, running)
	if calls := rec.callList(); len(calls) != 1 {
		t.Fatalf("without the lease, the provisioner called the backend: %v", calls)
	}
	if st := r.machine("in-1"); st.Status != protocol.MachineRunning {
		t.Fatalf("without the lease, the machine was recorded %s", st.Status)
	}
	// With the lease, the requests handed back are carried out.
	p.held = func() bool { return true }
	for range 2 {
		p.handle(ctx, next())
	}
	if st := r.machine("in-2"); st.Status != protocol.MachineRunning {
		t.Fatalf("the reprovision handed back, with the lease: %+v", st)
	}
	if calls := rec.callList(); len(calls) != 3 {
		t.Fatalf("with the lease: %v", calls)
	}
	p.markLost(ctx, running)
	if st := r.machine("in-1"); st.Status != protocol.MachineLost {
		t.Fatalf("with the lease, the machine was recorded %s", st.Status)
	}
}

func TestLostMachinesAreRecorded(t *testing.T) {
	r := newRig(t)
	rec := newRecorder()
	r.run(rec, "p1")
	r.request("in-a", protocol.ProvisionReprovision, "op-1-reprovision")
	r.waitMachine("in-a", func(s protocol.MachineState) bool { return s.Status == protocol.MachineRunning })
	rec.mu.Lock()
	rec.alive = false
	rec.mu.Unlock()
	st := r.waitMachine("in-a", func(s protocol.MachineState) bool { return s.Status == protocol.MachineLost })
	if st.Error == nil || st.Error.Code != protocol.CodeUnavailable {
		t.Fatalf("%+v", st)
	}
	waitEvent(t, r, "in-a", func(e protocol.Event) bool { return e.Kind == protocol.EventAlert && e.Step == "machine-lost" })
}

func waitEvent(t *testing.T, r *rig, instance string, match func(protocol.Event) bool) protocol.Event {
	t.Helper()
	cons, err := r.js.OrderedConsumer(context.Background(), protocol.StreamEvents, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{"fm.evt." + instance + ".*"}})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		msg, err := cons.Next(jetstream.FetchMaxWait(time.Second))
		if errors.Is(err, jetstream.ErrMsgIteratorClosed) {
			break
		}
		if err != nil {
			continue
		}
		var e protocol.Event
		if protocol.Decode(msg.Data(), &e) == nil && match(e) {
			return e
		}
	}
	t.Fatalf("no matching event for %s", instance)
	return protocol.Event{}
}

func TestSnapshotsLeaveTheMachineAlone(t *testing.T) {
	r := newRig(t)
	rec := newRecorder()
	r.run(rec, "p1")
	r.request("in-a", protocol.ProvisionReprovision, "op-1-reprovision")
	before := r.waitMachine("in-a", func(s protocol.MachineState) bool { return s.Status == protocol.MachineRunning })
	r.publish(protocol.ProvisionRequest{ID: "op-2-snapshot", Instance: "in-a", Action: protocol.ProvisionSnapshot, OpID: "op-2",
		Snapshot: &protocol.SnapshotRef{ID: "snap-1"}}, "op-2-snapshot")
	ev := waitEvent(t, r, "in-a", func(e protocol.Event) bool {
		return e.Kind == protocol.EventSnapshot && e.Status == protocol.StatusOK
	})
	if ev.OpID != "op-2" || ev.Snapshot == nil || ev.Snapshot.ID != "snap-1" || ev.Snapshot.Ref != "ref-snap-1" {
		t.Fatalf("snapshot event: %+v", ev)
	}
	r.publish(protocol.ProvisionRequest{ID: "op-3-delete-snapshot", Instance: "in-a", Action: protocol.ProvisionDeleteSnapshot, OpID: "op-3",
		Snapshot: ev.Snapshot}, "op-3-delete-snapshot")
	waitEvent(t, r, "in-a", func(e protocol.Event) bool {
		return e.Kind == protocol.EventSnapshot && e.Step == "delete-snapshot" && e.Status == protocol.StatusOK
	})
	if after := r.machine("in-a"); after.RequestID != before.RequestID || after.Status != protocol.MachineRunning {
		t.Fatalf("a snapshot changed the machine record: %+v", after)
	}
	want := []string{"reprovision op-1-reprovision", "snapshot snap-1 of vol-in-a", "delete-snapshot snap-1"}
	if got := rec.callList(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("calls %v, want %v", got, want)
	}
}

func TestAFailedSnapshotBeforeAnUpgradeLeavesTheMachineAsItWas(t *testing.T) {
	r := newRig(t)
	rec := newRecorder()
	rec.fail["snapshot snap-up"] = protocol.Errorf(protocol.CodeDataLoss, "the snapshot store lost the archive")
	r.run(rec, "p1")
	r.request("in-a", protocol.ProvisionReprovision, "op-1-reprovision")
	r.waitMachine("in-a", func(s protocol.MachineState) bool { return s.Status == protocol.MachineRunning })
	r.publish(protocol.ProvisionRequest{ID: "op-2-reprovision", Instance: "in-a", Action: protocol.ProvisionReprovision, OpID: "op-2",
		Generation: 2, Spec: &protocol.MachineSpec{Label: "x"}, Snapshot: &protocol.SnapshotRef{ID: "snap-up"}}, "op-2-reprovision")
	st := r.waitMachine("in-a", func(s protocol.MachineState) bool {
		return s.RequestID == "op-2-reprovision" && !transitional(s.Status)
	})
	if st.Status != protocol.MachineRunning || st.Generation != 1 || st.Error == nil || st.Error.Code != protocol.CodeDataLoss ||
		!strings.Contains(st.Error.Message, "left as it was") {
		t.Fatalf("machine after the refused upgrade: %+v %+v", st, st.Error)
	}
	waitEvent(t, r, "in-a", func(e protocol.Event) bool {
		return e.Kind == protocol.EventSnapshot && e.Status == protocol.StatusFailed && e.Snapshot.ID == "snap-up"
	})
	want := []string{"reprovision op-1-reprovision", "snapshot snap-up of vol-in-a"}
	if got := rec.callList(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("calls %v, want %v", got, want)
	}
}

func TestGrowingTheVolumeChangesOnlyItsSize(t *testing.T) {
	r := newRig(t)
	rec := newRecorder()
	r.run(rec, "p1")
	r.request("in-a", protocol.ProvisionReprovision, "op-1-reprovision")
	before := r.waitMachine("in-a", func(s protocol.MachineState) bool { return s.Status == protocol.MachineRunning })
	grow := protocol.ProvisionRequest{ID: "op-2-grow-volume", Instance: "in-a", Action: protocol.ProvisionGrowVolume, OpID: "op-2", VolumeSizeGB: 75}
	r.publish(grow, grow.ID)
	after := r.waitMachine("in-a", func(s protocol.MachineState) bool { return s.VolumeSizeGB == 75 })
	if after.RequestID != before.RequestID || after.Status != protocol.MachineRunning {
		t.Fatalf("growing changed more than the size: %+v", after)
	}
	waitEvent(t, r, "in-a", func(e protocol.Event) bool {
		return e.Kind == protocol.EventMachine && e.Step == "grow-volume" && e.Status == protocol.StatusOK && e.OpID == "op-2"
	})
	// Asked again (a redelivery after the record was written): nothing to do.
	grow.ID = "op-2-grow-volume-again"
	r.publish(grow, grow.ID)
	waitEvent(t, r, "in-a", func(e protocol.Event) bool { return e.ID == "op-2-grow-volume-again-ok" })
	want := []string{"reprovision op-1-reprovision", "grow-volume vol-in-a to 75"}
	if got := rec.callList(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("calls %v, want %v", got, want)
	}
}

// TestRequestsInFlightWhenAProvisionerStops: a provisioner that stops hands
// back every request the bus delivered to it and it did not finish, so that
// the next one runs them at once rather than after the ack wait (30 s).
func TestRequestsInFlightWhenAProvisionerStops(t *testing.T) {
	r := newRig(t)
	const n = 300
	rec := newRecorder()
	rec.entered, rec.block = make(chan string, 2*n), make(chan struct{}) // never done: every request is in flight
	stop := r.run(rec, "p1")
	for i := range n {
		inst := fmt.Sprintf("in-%03d", i)
		data, err := protocol.Encode(&protocol.ProvisionRequest{ID: fmt.Sprintf("op-%d-reprovision", i), Instance: inst,
			Action: protocol.ProvisionReprovision, Issued: time.Now().UTC(), Generation: 1,
			Spec: &protocol.MachineSpec{Label: "x", DataVolume: protocol.VolumeSpec{SizeGB: 1}}})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := r.js.PublishAsync(protocol.ProvisionSubject(inst, protocol.ProvisionReprovision), data); err != nil {
			t.Fatal(err)
		}
	}
	<-r.js.PublishAsyncComplete()
	stop()
	rec2 := newRecorder()
	rec2.entered = make(chan string, 2*n)
	started := time.Now()
	r.run(rec2, "p2")
	for i := range n {
		inst := fmt.Sprintf("in-%03d", i)
		for r.machine(inst).Status != protocol.MachineRunning {
			if time.Since(started) > 20*time.Second {
				t.Fatalf("%s not running 20 s after the next provisioner started (the first was given %d of %d): %+v",
					inst, len(rec.callList()), n, r.machine(inst))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	t.Logf("the first provisioner was given %d of %d requests; the next one ran them all within %s",
		len(rec.callList()), n, time.Since(started))
}

// TestAStopWithAFullQueue: a provisioner whose worker for an instance is busy
// and whose queue for it is full still stops, handing every request back to
// the next provisioner, which runs each. (Their order is not kept across the
// hand-back; the server sends an instance one lifecycle request at a time.)
func TestAStopWithAFullQueue(t *testing.T) {
	r := newRig(t)
	const n = 80 // more than a worker's queue (64) and the one it runs
	rec := newRecorder()
	rec.entered, rec.block = make(chan string, 2*n), make(chan struct{}) // the first request never ends
	stop := r.run(rec, "p1")
	for i := range n {
		r.request("in-a", protocol.ProvisionReprovision, fmt.Sprintf("op-%03d-reprovision", i))
	}
	<-rec.entered
	cons, err := r.js.Consumer(context.Background(), protocol.StreamProvision, ConsumerName)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		// Delivered beyond the queue and the running one: dispatch waits.
		info, err := cons.Info(context.Background())
		if err == nil && info.Delivered.Consumer > 64+1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the provisioner never had a full queue: %+v %v", info, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	stopped := make(chan struct{})
	go func() { stop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(20 * time.Second):
		t.Fatal("the provisioner did not stop with a request waiting for its full queue")
	}
	rec2 := newRecorder()
	rec2.entered = make(chan string, 2*n)
	r.run(rec2, "p2")
	// Every request handed back is answered: run, or, issued before one
	// already run, answered as superseded. None runs after a later one.
	r.waitDrained()
	calls := rec2.callList()
	if len(calls) == 0 {
		t.Fatal("the next provisioner ran none of the requests handed back")
	}
	for i := 1; i < len(calls); i++ {
		if calls[i] <= calls[i-1] {
			t.Fatalf("%s ran after %s, which was issued later: %v", calls[i], calls[i-1], calls)
		}
	}
}

// TestTransientFailuresAreRetriedUntilTheDeadline: a backend failing in a
// way that passes (the cloud unavailable) does not fail the operation; it
// is tried again until the request's deadline, and only then reported.
func TestTransientFailuresAreRetriedUntilTheDeadline(t *testing.T) {
	r := newRig(t)
	rec := newRecorder()
	rec.flaky["op-1-reprovision"] = 2
	rec.flaky["op-2-reprovision"] = 1000
	r.run(rec, "p1")
	req := protocol.ProvisionRequest{ID: "op-1-reprovision", Instance: "in-a", Action: protocol.ProvisionReprovision, OpID: "op-1",
		Generation: 1, Issued: time.Now().UTC(), Deadline: time.Now().Add(time.Minute), Spec: &protocol.MachineSpec{Label: "x"}}
	r.publish(req, req.ID)
	st := r.waitMachine("in-a", func(s protocol.MachineState) bool { return s.RequestID == req.ID && !transitional(s.Status) })
	if st.Status != protocol.MachineRunning || st.Error != nil {
		t.Fatalf("after two transient failures: %+v", st)
	}
	if got := strings.Count(fmt.Sprint(rec.callList()), "reprovision op-1-reprovision"); got != 3 {
		t.Fatalf("%d attempts, want 3: %v", got, rec.callList())
	}
	waitEvent(t, r, "in-a", func(e protocol.Event) bool { return e.Status == protocol.StatusRetrying && e.OpID == "op-1" })
	// Past its deadline, the failure is the operation's.
	req = protocol.ProvisionRequest{ID: "op-2-reprovision", Instance: "in-a", Action: protocol.ProvisionReprovision, OpID: "op-2",
		Generation: 2, Issued: time.Now().UTC(), Deadline: time.Now().Add(3 * time.Second), Spec: &protocol.MachineSpec{Label: "x"}}
	r.publish(req, req.ID)
	st = r.waitMachine("in-a", func(s protocol.MachineState) bool { return s.RequestID == req.ID && !transitional(s.Status) })
	if st.Status != protocol.MachineFailed || st.Error == nil || st.Error.Code != protocol.CodeDeadlineExceeded ||
		!strings.Contains(st.Error.Message, "the cloud is away") {
		t.Fatalf("past the deadline: %+v", st)
	}
}

// TestADispatchRacingAnIdleWorker: a request handed to an instance's worker
// just as the worker is about to leave for want of work is still taken at
// once, not stranded until the ack wait.
func TestADispatchRacingAnIdleWorker(t *testing.T) {
	r := newRig(t)
	rec := newRecorder()
	var queued atomic.Int32
	hook := func(point string) {
		if point == "provisioner/dispatch/queued" && queued.Add(1) == 2 {
			// The second request of the instance waits here, between its
			// worker's look-up and the hand-over, longer than the worker
			// stays idle.
			time.Sleep(300 * time.Millisecond)
		}
	}
	p, err := New(Config{Conn: r.bus.Connect(t), Backend: rec, Holder: "p1", Crash: hook, Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	p.workerIdle = 50 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = p.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	r.request("in-a", protocol.ProvisionReprovision, "op-1-reprovision")
	r.waitMachine("in-a", func(s protocol.MachineState) bool { return s.RequestID == "op-1-reprovision" })
	// The first worker leaves for want of work; the second request gets a
	// new one, which it reaches only after that worker was idle for longer
	// than a worker stays.
	for deadline := time.Now().Add(10 * time.Second); ; {
		p.mu.Lock()
		left := len(p.workers) == 0
		p.mu.Unlock()
		if left {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the idle worker never left")
		}
		time.Sleep(10 * time.Millisecond)
	}
	start := time.Now()
	r.request("in-a", protocol.ProvisionStop, "op-2-stop")
	r.waitMachine("in-a", func(s protocol.MachineState) bool {
		return s.RequestID == "op-2-stop" && s.Status == protocol.MachineStopped
	})
	if took := time.Since(start); took > 10*time.Second {
		t.Fatalf("the request waited %s: it was stranded until the ack wait", took)
	}
}

// TestAStaleOrLateRequestIsNotCarriedOut: a request past its deadline (the
// server failed the operation and may have sent another since) and a
// reprovision superseded by a later generation are answered as failed and
// not carried out: carried out late, they would make a machine nobody
// wants.
func TestAStaleOrLateRequestIsNotCarriedOut(t *testing.T) {
	r := newRig(t)
	rec := newRecorder()
	r.run(rec, "p1")
	spec := &protocol.MachineSpec{Label: "x"}
	r.publish(protocol.ProvisionRequest{ID: "op-2-reprovision", Instance: "in-a", Action: protocol.ProvisionReprovision, OpID: "op-2",
		Generation: 2, Issued: time.Now().UTC(), Deadline: time.Now().Add(time.Minute), Spec: spec}, "op-2-reprovision")
	r.waitMachine("in-a", func(s protocol.MachineState) bool {
		return s.RequestID == "op-2-reprovision" && s.Status == protocol.MachineRunning
	})
	r.publish(protocol.ProvisionRequest{ID: "op-1-reprovision", Instance: "in-a", Action: protocol.ProvisionReprovision, OpID: "op-1",
		Generation: 1, Issued: time.Now().UTC(), Deadline: time.Now().Add(time.Minute), Spec: spec}, "op-1-reprovision")
	waitEvent(t, r, "in-a", func(e protocol.Event) bool {
		return e.ID == "op-1-reprovision-failed" && e.Error != nil && e.Error.Code == protocol.CodeAborted
	})
	r.publish(protocol.ProvisionRequest{ID: "op-3-stop", Instance: "in-a", Action: protocol.ProvisionStop, OpID: "op-3",
		Issued: time.Now().Add(-2 * time.Hour).UTC(), Deadline: time.Now().Add(-time.Hour)}, "op-3-stop")
	waitEvent(t, r, "in-a", func(e protocol.Event) bool {
		return e.ID == "op-3-stop-failed" && e.Error != nil && e.Error.Code == protocol.CodeDeadlineExceeded
	})
	if st := r.machine("in-a"); st.RequestID != "op-2-reprovision" || st.Status != protocol.MachineRunning {
		t.Fatalf("a refused request changed the machine: %+v", st)
	}
	if calls := fmt.Sprint(rec.callList()); calls != "[reprovision op-2-reprovision]" {
		t.Fatalf("calls %s", calls)
	}
}

// TestARefusedReprovisionAfterACrashKeepsTheMachinesStatus: a reprovision
// cut short by a crash after its pending record was written, then refused
// before it changed anything (the snapshot before the upgrade cannot be
// taken), leaves the machine in the status it had before the request, not
// in the transitional one of the record.
func TestARefusedReprovisionAfterACrashKeepsTheMachinesStatus(t *testing.T) {
	r := newRig(t)
	rec := newRecorder()
	rec.fail["snapshot snap-up"] = protocol.Errorf(protocol.CodeDataLoss, "the volume cannot be read")
	stop := r.run(rec, "p1")
	r.request("in-a", protocol.ProvisionReprovision, "op-1-reprovision")
	running := r.waitMachine("in-a", func(s protocol.MachineState) bool { return s.Status == protocol.MachineRunning })
	stop()
	// As a provisioner killed after writing its pending record leaves it.
	pending := running
	pending.Status, pending.Before, pending.RequestID, pending.Action = protocol.MachineProvisioning, protocol.MachineRunning, "op-2-reprovision", protocol.ProvisionReprovision
	kv, _ := r.js.KeyValue(context.Background(), protocol.BucketMachines)
	data, _ := protocol.Encode(&pending)
	if _, err := kv.Put(context.Background(), "in-a", data); err != nil {
		t.Fatal(err)
	}
	r.run(rec, "p1")
	r.publish(protocol.ProvisionRequest{ID: "op-2-reprovision", Instance: "in-a", Action: protocol.ProvisionReprovision, OpID: "op-2",
		Generation: 2, Issued: time.Now().UTC(), Deadline: time.Now().Add(time.Minute), Spec: &protocol.MachineSpec{Label: "x"},
		Snapshot: &protocol.SnapshotRef{ID: "snap-up"}}, "op-2-reprovision")
	st := r.waitMachine("in-a", func(s protocol.MachineState) bool {
		return s.RequestID == "op-2-reprovision" && !transitional(s.Status)
	})
	if st.Status != protocol.MachineRunning || st.Error == nil || st.Error.Code != protocol.CodeDataLoss || st.Before != "" {
		t.Fatalf("after the refusal: %+v %+v", st, st.Error)
	}
}

// TestALateCopyOfAnOlderRequestIsNotRunAgain: a request handled, whose
// acknowledgement was lost, comes back after a later request was handled
// (a redelivery after the ack wait, or a republication): it is answered as
// superseded, its own operation only, and changes nothing. Carried out, it
// would undo what came after it (a stopped machine started again, the new
// machine deprovisioned, a deleted instance given a machine).
func TestALateCopyOfAnOlderRequestIsNotRunAgain(t *testing.T) {
	tests := []struct {
		first, then protocol.ProvisionAction
		status      protocol.MachineStatus // after then
	}{
		{protocol.ProvisionReprovision, protocol.ProvisionStop, protocol.MachineStopped},
		{protocol.ProvisionDeprovision, protocol.ProvisionReprovision, protocol.MachineRunning},
		{protocol.ProvisionReprovision, protocol.ProvisionDelete, protocol.MachineDeleted},
	}
	for _, tc := range tests {
		t.Run(string(tc.first)+"-after-"+string(tc.then), func(t *testing.T) {
			r := newRig(t)
			rec := newRecorder()
			r.run(rec, "p1")
			req := func(op string, order uint64, action protocol.ProvisionAction) protocol.ProvisionRequest {
				return protocol.ProvisionRequest{ID: op + "-" + string(action), Instance: "in-a", Action: action, OpID: op, Order: order,
					Generation: 1, Issued: time.Now().UTC(), Deadline: time.Now().Add(time.Minute),
					Spec: &protocol.MachineSpec{Label: "x", DataVolume: protocol.VolumeSpec{SizeGB: 1}}}
			}
			first := req("op-1", 3, tc.first)
			r.publish(first, first.ID)
			r.waitMachine("in-a", func(s protocol.MachineState) bool { return s.RequestID == first.ID && !transitional(s.Status) })
			then := req("op-2", 7, tc.then)
			r.publish(then, then.ID)
			want := r.waitMachine("in-a", func(s protocol.MachineState) bool { return s.RequestID == then.ID && !transitional(s.Status) })
			if want.Status != tc.status || want.Order != then.Order {
				t.Fatalf("after %s: %+v", then.ID, want)
			}
			// The first request again, as it was issued.
			r.publish(first, first.ID+"-again")
			r.waitDrained()
			if calls, wantCalls := rec.callList(), []string{string(tc.first) + " " + first.ID, string(tc.then) + " " + then.ID}; fmt.Sprint(calls) != fmt.Sprint(wantCalls) {
				t.Fatalf("calls %v, want %v", calls, wantCalls)
			}
			if st := r.machine("in-a"); st.RequestID != then.ID || st.Status != tc.status || st.Error != nil {
				t.Fatalf("the late copy changed the machine record: %+v", st)
			}
			ev := waitEvent(t, r, "in-a", func(e protocol.Event) bool { return e.ID == first.ID+"-failed" })
			if ev.OpID != "op-1" || ev.Error == nil || ev.Error.Code != protocol.CodeAborted {
				t.Fatalf("the late copy was answered %+v", ev)
			}
		})
	}
}

// TestABesideRequestHandledIsNotDoneAgain: a snapshot request handled,
// whose acknowledgement was lost, comes back after its snapshot was
// deleted: it is acknowledged, not taken again (an archive nobody refers
// to). The same for a volume growth.
func TestABesideRequestHandledIsNotDoneAgain(t *testing.T) {
	r := newRig(t)
	rec := newRecorder()
	r.run(rec, "p1")
	r.request("in-a", protocol.ProvisionReprovision, "op-1-reprovision")
	r.waitMachine("in-a", func(s protocol.MachineState) bool { return s.Status == protocol.MachineRunning })
	snap := protocol.ProvisionRequest{ID: "op-2-snapshot", Instance: "in-a", Action: protocol.ProvisionSnapshot, OpID: "op-2",
		Issued: time.Now().UTC(), Snapshot: &protocol.SnapshotRef{ID: "snap-1"}}
	r.publish(snap, snap.ID)
	ev := waitEvent(t, r, "in-a", func(e protocol.Event) bool { return e.ID == "op-2-snapshot-ok" })
	del := protocol.ProvisionRequest{ID: "op-3-delete-snapshot", Instance: "in-a", Action: protocol.ProvisionDeleteSnapshot, OpID: "op-3",
		Issued: time.Now().UTC(), Snapshot: ev.Snapshot}
	r.publish(del, del.ID)
	grow := protocol.ProvisionRequest{ID: "op-4-grow-volume", Instance: "in-a", Action: protocol.ProvisionGrowVolume, OpID: "op-4",
		Issued: time.Now().UTC(), VolumeSizeGB: 75}
	r.publish(grow, grow.ID)
	r.waitDrained()
	// Delivered again after the deduplication window.
	r.publish(snap, snap.ID+"-again")
	r.publish(grow, grow.ID+"-again")
	r.waitDrained()
	want := []string{"reprovision op-1-reprovision", "snapshot snap-1 of vol-in-a", "delete-snapshot snap-1", "grow-volume vol-in-a to 75"}
	if got := rec.callList(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("calls %v, want %v", got, want)
	}
	if st := r.machine("in-a"); st.RequestID != "op-1-reprovision" || st.Status != protocol.MachineRunning || st.VolumeSizeGB != 75 {
		t.Fatalf("machine record %+v", st)
	}
	// The list of requests handled stays short, and a machine operation
	// keeps it.
	for i := range keptHandled + 5 {
		r.publish(protocol.ProvisionRequest{ID: fmt.Sprintf("op-g%d-grow-volume", i), Instance: "in-a", Action: protocol.ProvisionGrowVolume,
			Issued: time.Now().UTC(), VolumeSizeGB: 75}, fmt.Sprintf("g%d", i))
	}
	r.waitDrained()
	r.request("in-a", protocol.ProvisionStop, "op-5-stop")
	st := r.waitMachine("in-a", func(s protocol.MachineState) bool { return s.Status == protocol.MachineStopped })
	if ids := handledIDs(st.Details); len(ids) != keptHandled || ids[len(ids)-1] != fmt.Sprintf("op-g%d-grow-volume", keptHandled+4) {
		t.Fatalf("handled requests %v", ids)
	}
}

// TestWhatIsTransient: the bus away, slow or electing a leader is retried
// until the deadline; a refusal is not.
func TestWhatIsTransient(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{nats.ErrTimeout, true},
		{fmt.Errorf("publish: %w", nats.ErrNoResponders), true},
		{jetstream.ErrNoStreamResponse, true},
		{nats.ErrDisconnected, true},
		{nats.ErrConnectionReconnecting, true},
		{context.DeadlineExceeded, true},
		{protocol.Errorf(protocol.CodeUnavailable, "EC2 throttled"), true},
		{protocol.Errorf(protocol.CodeFailedPrecondition, "the machine terminated"), false},
		{errors.New("invalid volume size"), false},
	} {
		t.Run(fmt.Sprint(c.err), func(t *testing.T) {
			if got := isTransient(c.err); got != c.want {
				t.Fatalf("isTransient(%v) = %v, want %v", c.err, got, c.want)
			}
		})
	}
}

// TestOngoingReportsInOrderAndSendsTheLast: reports of how far a step got
// are published in the order made, never holding the caller up, and the
// last is always published, whatever was dropped in between.
func TestOngoingReportsInOrderAndSendsTheLast(t *testing.T) {
	r := newRig(t)
	p, _ := r.runLogged(&recorder{}, "p1", zerolog.Nop())
	req := protocol.ProvisionRequest{ID: "op-1-snapshot", OpID: "op-1", Instance: "in-ongoing", Action: protocol.ProvisionSnapshot}
	report := p.ongoing(context.Background(), req)
	for i := 1; i <= 200; i++ {
		report("upload", fmt.Sprintf("%d of 200", i))
	}
	ctx := context.Background()
	var msgs []string
	var times []time.Time
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		cons, err := r.js.OrderedConsumer(ctx, protocol.StreamEvents, jetstream.OrderedConsumerConfig{
			FilterSubjects: []string{protocol.EventSubject("in-ongoing", protocol.EventMachine)}})
		if err != nil {
			t.Fatal(err)
		}
		msgs, times = nil, nil
		batch, err := cons.FetchNoWait(500)
		if err != nil {
			t.Fatal(err)
		}
		for m := range batch.Messages() {
			var e protocol.Event
			if err := protocol.Decode(m.Data(), &e); err != nil {
				t.Fatal(err)
			}
			msgs, times = append(msgs, e.Message), append(times, e.Time)
		}
		if len(msgs) > 0 && msgs[len(msgs)-1] == "200 of 200" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the last report was never published: %v", msgs)
		}
	}
	for i := 1; i < len(times); i++ {
		if times[i].Before(times[i-1]) {
			t.Fatalf("reports out of order: %v", msgs)
		}
	}
}

// TestANewerLayoutIsRefused: a provisioner on a bus a newer FM laid out
// (a downgrade of the provisioner alone) stops at once, saying so, having
// taken no lease and carried out nothing.
func TestANewerLayoutIsRefused(t *testing.T) {
	r := newRig(t)
	st, err := r.js.Stream(context.Background(), protocol.StreamProvision)
	if err != nil {
		t.Fatal(err)
	}
	cfg := st.CachedInfo().Config
	cfg.Metadata = map[string]string{bus.LayoutKey: strconv.Itoa(bus.LayoutVersion + 1)}
	if _, err := r.js.UpdateStream(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	b := newRecorder()
	p, err := New(Config{Conn: r.bus.Connect(t), Backend: b, Holder: "old", LeaseTTL: 15 * time.Second, Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	r.request("in-1", protocol.ProvisionReprovision, "op-1-reprovision")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err = p.Run(ctx)
	if !errors.Is(err, bus.ErrNewerLayout) || ctx.Err() != nil {
		t.Fatalf("Run on a newer layout: %v (ctx %v)", err, ctx.Err())
	}
	if calls := b.callList(); len(calls) != 0 {
		t.Fatalf("it carried out %v", calls)
	}
	leases, _ := r.js.KeyValue(context.Background(), protocol.BucketLeases)
	if _, err := leases.Get(context.Background(), protocol.LeaseProvisioner); err == nil {
		t.Fatal("it took the lease")
	}
}
