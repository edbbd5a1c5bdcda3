// Package crashtest is the provisioner's crash-point harness. For each
// machine operation (provision, reprovision, upgrade, stop, start,
// deprovision, delete, snapshot, restore, grow-volume, delete-snapshot) it
// first lists the crash points the operation passes on a backend; then, for
// each point in turn, it starts from a fresh bus, prepares the instance, and
// runs a provisioner that dies at that point (no deferred clean-up runs,
// its bus connection drops). It then delivers the same request once more
// (as a republication would), starts a new provisioner, and checks the
// outcome: the operation ends as it should, every delivery is acknowledged,
// and the backend holds exactly what the operation leaves (one machine, one
// data volume, the snapshots recorded with the digests recorded, the volume
// a restore kept aside), and nothing orphaned.
//
// The backends' tests (provisioner/local, provisioner/ec2) import it and
// give it a World. It imports the provisioner, the bus and protocol.
package crashtest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/internal/crashpoint"
	"github.com/fleetmanager/fm/internal/crashpoint/crashtable"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// World is a backend under test and what it holds.
type World interface {
	// Name is the backend's name in the table.
	Name() string
	// Case gives one case its part of the world (moto servers are reset
	// between cases), until t ends.
	Case(t testing.TB) Case
}

// Case is the world of one case.
type Case interface {
	// Backend builds the backend as a new provisioner process would, for
	// the bus at natsURL, passing its crash points to hook.
	Backend(t testing.TB, natsURL string, hook crashpoint.Hook) provisioner.Backend
	// Spec is the machine spec of instance's machines.
	Spec(instance string) *protocol.MachineSpec
	// Check fails t unless the backend holds for instance what want says.
	Check(t testing.TB, js jetstream.JetStream, instance string, want Want)
	// Cleanup releases what the instance still holds when its case ends
	// (processes of the local backend).
	Cleanup(instance string)
}

// Want is what the backend must hold for an instance once an operation
// ended.
type Want struct {
	// Machines is the number of the instance's machines that exist
	// (running or stopped); Running says whether they run.
	Machines int
	Running  bool
	// MadeBy is the provision request that made the machine: the one the
	// backend must hold, not an earlier one adopted by mistake.
	MadeBy string
	// Volumes is the number of its current data volumes, Kept of those a
	// restore kept aside.
	Volumes, Kept int
	// VolumeSizeGB is the data volume's size, if not zero.
	VolumeSizeGB int
	// Snapshots must be kept exactly once each, as recorded (digest, place);
	// Gone must be kept no more.
	Snapshots []protocol.SnapshotRef
	Gone      []protocol.SnapshotRef
}

// SizeGB is the data volume size of the harness's specs; grow-volume grows
// it to GrownGB.
const (
	SizeGB  = 8
	GrownGB = 20
)

// Options tune a run of the table.
type Options struct {
	// Only runs these operations (by name); all when empty.
	Only []string
	// Stride runs one crash point in Stride (1: every one), always the
	// first and the last: the short mode CI uses. Which ones shifts from
	// one operation to the next (by the operation's place in the table),
	// so that over the table both sides of a :before/:after pair run.
	Stride int
	// Parallel is how many cases run at once.
	Parallel int
}

// operation is one machine operation of the table.
type operation struct {
	name string
	// setup prepares the instance: requests run to their end by a
	// provisioner that does not crash. A setup snapshot leaves the
	// snapshot it recorded in the case's snap (for restore and
	// delete-snapshot).
	setup func(c *caseRig) error
	// request is the request under test.
	request func(c *caseRig) protocol.ProvisionRequest
	// want is what must be left.
	want func(c *caseRig) Want
	// status is the machine status the request ends in ("" for those that
	// leave the machine alone).
	status protocol.MachineStatus
}

func operations() []operation {
	provision := func(c *caseRig) error { return c.runToEnd(c.req(protocol.ProvisionReprovision, "prov", 1)) }
	snapshot := func(c *caseRig) error {
		if err := provision(c); err != nil {
			return err
		}
		r := c.req(protocol.ProvisionSnapshot, "snap", 0)
		r.Snapshot = &protocol.SnapshotRef{ID: "snap-" + c.instance[3:]}
		if err := c.runToEnd(r); err != nil {
			return err
		}
		ref, err := c.recordedSnapshot(r.ID)
		c.snap = ref
		if err == nil {
			// What the volume holds after the snapshot: a restore must keep
			// it aside, not lose it.
			err = c.writeAfterSnapshot()
		}
		return err
	}
	running := func(c *caseRig) Want {
		return Want{Machines: 1, Running: true, MadeBy: c.madeBy, Volumes: 1, VolumeSizeGB: SizeGB}
	}
	return []operation{
		{name: "provision", status: protocol.MachineRunning,
			setup:   func(c *caseRig) error { return nil },
			request: func(c *caseRig) protocol.ProvisionRequest { return c.req(protocol.ProvisionReprovision, "op", 1) },
			want:    running},
		{name: "reprovision", status: protocol.MachineRunning, setup: provision,
			request: func(c *caseRig) protocol.ProvisionRequest { return c.req(protocol.ProvisionReprovision, "op", 2) },
			want:    running},
		{name: "upgrade", status: protocol.MachineRunning, setup: provision,
			request: func(c *caseRig) protocol.ProvisionRequest {
				r := c.req(protocol.ProvisionReprovision, "op", 2)
				r.Spec.DSSVersion, r.Spec.ImageID = "14.1.0", "dss-14.1.0"
				r.Snapshot = &protocol.SnapshotRef{ID: "snap-up-" + c.instance[3:]}
				return r
			},
			want: func(c *caseRig) Want {
				w := running(c)
				ref, err := c.recordedSnapshot(c.opReq.ID + "-snapshot")
				if err != nil {
					c.t.Errorf("the snapshot before the upgrade: %v", err)
				}
				w.Snapshots = []protocol.SnapshotRef{ref}
				return w
			}},
		{name: "stop", status: protocol.MachineStopped, setup: provision,
			request: func(c *caseRig) protocol.ProvisionRequest { return c.req(protocol.ProvisionStop, "op", 0) },
			want:    func(c *caseRig) Want { return Want{Machines: 1, MadeBy: c.madeBy, Volumes: 1, VolumeSizeGB: SizeGB} }},
		{name: "start", status: protocol.MachineRunning,
			setup: func(c *caseRig) error {
				if err := provision(c); err != nil {
					return err
				}
				return c.runToEnd(c.req(protocol.ProvisionStop, "stop", 0))
			},
			request: func(c *caseRig) protocol.ProvisionRequest { return c.req(protocol.ProvisionStart, "op", 1) },
			want:    running},
		{name: "deprovision", status: protocol.MachineDeprovisioned, setup: provision,
			request: func(c *caseRig) protocol.ProvisionRequest { return c.req(protocol.ProvisionDeprovision, "op", 0) },
			want:    func(c *caseRig) Want { return Want{Volumes: 1, VolumeSizeGB: SizeGB} }},
		{name: "delete", status: protocol.MachineDeleted, setup: provision,
			request: func(c *caseRig) protocol.ProvisionRequest { return c.req(protocol.ProvisionDelete, "op", 0) },
			want:    func(c *caseRig) Want { return Want{} }},
		{name: "snapshot", setup: provision,
			request: func(c *caseRig) protocol.ProvisionRequest {
				r := c.req(protocol.ProvisionSnapshot, "op", 0)
				r.Snapshot = &protocol.SnapshotRef{ID: "snap-" + c.instance[3:]}
				return r
			},
			want: func(c *caseRig) Want {
				w := running(c)
				ref, err := c.recordedSnapshot(c.opReq.ID)
				if err != nil {
					c.t.Errorf("the snapshot: %v", err)
				}
				w.Snapshots = []protocol.SnapshotRef{ref}
				return w
			}},
		{name: "restore", status: protocol.MachineRunning, setup: snapshot,
			request: func(c *caseRig) protocol.ProvisionRequest {
				r := c.req(protocol.ProvisionReprovision, "op", 2)
				snap := c.snap
				r.FromSnapshot = &snap
				return r
			},
			want: func(c *caseRig) Want {
				w := running(c)
				w.Kept, w.Snapshots = 1, []protocol.SnapshotRef{c.snap}
				return w
			}},
		{name: "grow-volume", setup: provision,
			request: func(c *caseRig) protocol.ProvisionRequest {
				r := c.req(protocol.ProvisionGrowVolume, "op", 0)
				r.VolumeSizeGB = GrownGB
				return r
			},
			want: func(c *caseRig) Want {
				w := running(c)
				w.VolumeSizeGB = GrownGB
				return w
			}},
		{name: "delete-snapshot", setup: snapshot,
			request: func(c *caseRig) protocol.ProvisionRequest {
				r := c.req(protocol.ProvisionDeleteSnapshot, "op", 0)
				snap := c.snap
				r.Snapshot = &snap
				return r
			},
			want: func(c *caseRig) Want {
				w := running(c)
				w.Gone = []protocol.SnapshotRef{c.snap}
				return w
			}},
	}
}

// Run runs the table against w and returns its rows. Each case is a
// subtest named "<operation>/<n>"; "<operation>/record" lists the points.
func Run(t *testing.T, w World, opts Options) []crashtable.Row {
	var rows []crashtable.Row
	t.Run(w.Name(), func(t *testing.T) {
		var cases []crashtable.Case
		for i, op := range operations() {
			if len(opts.Only) > 0 && !slices.Contains(opts.Only, op.name) {
				continue
			}
			var points []string
			if !t.Run(op.name+"/record", func(t *testing.T) {
				if points = record(t, w, op); len(points) == 0 {
					t.Fatal("the operation passes no crash point")
				}
			}) {
				continue
			}
			for _, n := range selectPoints(len(points), opts.Stride, i) {
				cases = append(cases, crashtable.Case{Operation: op.name, N: n, Point: crashtable.Occurrence(points, n),
					Run: func(t *testing.T) { crashCase(t, w, op, n, points[n-1]) }})
			}
		}
		rows = crashtable.Run(t, w.Name(), max(opts.Parallel, 1), cases)
	})
	return rows
}

// selectPoints keeps one point in stride of an operation's points (1..n),
// starting at 1+offset%stride, and always the first and the last. With
// offsets that differ from one operation to the next, the points kept fall
// on both sides of the :before/:after pairs over the table, where a fixed
// start (crashtable.Select) would keep the same side every time.
func selectPoints(n, stride, offset int) []int {
	if stride <= 1 {
		return crashtable.Select(n, 1)
	}
	offset %= stride
	var out []int
	for i := 1; i <= n; i++ {
		if i == 1 || i == n || (i-1)%stride == offset {
			out = append(out, i)
		}
	}
	return out
}

// record runs the operation once without crashing and returns the crash
// points it passed, in order.
func record(t *testing.T, w World, op operation) []string {
	c := newCase(t, w, op, 0)
	if err := op.setup(c); err != nil {
		t.Fatalf("setup: %v", err)
	}
	c.opReq = op.request(c)
	c.noteMachine(c.opReq)
	var rec crashpoint.Recorder
	stop := c.start(rec.Hook(), nil)
	c.publish(c.opReq, c.opReq.ID)
	c.waitDone()
	stop()
	c.check(op)
	return rec.Points()
}

// crashCase kills a provisioner at the n-th crash point of the operation
// (named point when the operation was recorded), delivers the request
// again, lets a new provisioner finish, and checks the outcome.
func crashCase(t *testing.T, w World, op operation, n int, point string) {
	c := newCase(t, w, op, n)
	if err := op.setup(c); err != nil {
		t.Fatalf("setup: %v", err)
	}
	c.opReq = op.request(c)
	c.noteMachine(c.opReq)
	crasher := &crashpoint.Crasher{N: n}
	c.start(crasher.Hook(), crasher)

	c.publish(c.opReq, c.opReq.ID)
	select {
	case <-crasher.Crashed():
	case <-time.After(2 * time.Minute):
		t.Fatalf("the provisioner never reached crash point %d", n)
	}
	if got := crasher.Point(); got != point {
		// The operation took another path than when it was recorded: the
		// table would not say what it tests.
		t.Fatalf("crash point %d is %s, %s when the operation was recorded; the path taken:\n  %s\nthe provisioner's warnings:\n%s",
			n, got, point, strings.Join(crasher.Passed(), "\n  "), c.warnings.String())
	}
	// The same request once more, as a republication after the
	// deduplication window would deliver it.
	c.publish(c.opReq, c.opReq.ID+"-again")
	stop := c.start(nil, nil)
	c.waitDone()
	stop()
	c.check(op)
}

// caseRig is one case: a bus, an instance, the provisioners run on it.
type caseRig struct {
	t        *testing.T
	w        Case
	bus      *bustest.Server
	js       jetstream.JetStream
	instance string
	opReq    protocol.ProvisionRequest
	snap     protocol.SnapshotRef // recorded by a setup snapshot
	// madeBy is the last reprovision request run: the one that made the
	// instance's machine.
	madeBy string
	// warnings is what the case's provisioners warned of (a transient
	// failure retried, say), shown when a case fails.
	warnings lockedBuffer
}

// lockedBuffer is a buffer several provisioners' loggers write to.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func newCase(t *testing.T, w World, op operation, n int) *caseRig {
	srv := bustest.Run(t)
	cw := w.Case(t)
	c := &caseRig{t: t, w: cw, bus: srv, js: srv.JetStream(t),
		instance: fmt.Sprintf("in-%s-%d-%s", shortName(op.name), n, strings.ToLower(protocol.NewID("x")[2:8]))}
	t.Cleanup(func() { cw.Cleanup(c.instance) })
	return c
}

func shortName(op string) string { return strings.ReplaceAll(op, "-", "") }

// req is a request on the instance; gen, if set, is its generation.
func (c *caseRig) req(action protocol.ProvisionAction, label string, gen uint64) protocol.ProvisionRequest {
	r := protocol.ProvisionRequest{ID: label + "-" + c.instance[3:] + "-" + string(action), Instance: c.instance, Action: action,
		OpID: "op-" + c.instance[3:], Generation: gen, Issued: time.Now().UTC(), Deadline: time.Now().Add(10 * time.Minute)}
	if action == protocol.ProvisionReprovision || action == protocol.ProvisionStart {
		r.Spec = c.w.Spec(c.instance)
	}
	return r
}

// holder is the lease holder name every provisioner of a case uses: a
// restarted one takes the lease back at once, as fm dev does.
const holder = "crashtest"

// start runs a provisioner; crasher, if set, kills it (its Die is set
// here). The returned function stops a provisioner that did not crash.
func (c *caseRig) start(hook crashpoint.Hook, crasher *crashpoint.Crasher) func() {
	c.t.Helper()
	nc, err := nats.Connect(c.bus.URL(), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		c.t.Fatal(err)
	}
	p, err := provisioner.New(provisioner.Config{Conn: nc, Backend: c.w.Backend(c.t, c.bus.URL(), hook), Holder: holder,
		AckWait: time.Second, CheckInterval: time.Hour, Crash: hook, Logger: zerolog.New(&c.warnings).Level(zerolog.WarnLevel)})
	if err != nil {
		c.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	if crasher != nil {
		// Its connection goes first, so that nothing the dying process
		// would still do reaches the bus.
		crasher.Die = func() { nc.Close(); cancel() }
		go func() { _ = p.Run(ctx) }()
		// A dead provisioner is never waited for: its crashed goroutine is
		// parked for ever.
		c.t.Cleanup(func() { cancel(); nc.Close() })
		return func() {}
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = p.Run(ctx) }()
	stop := func() {
		cancel()
		<-done
		nc.Close()
	}
	c.t.Cleanup(func() {
		select {
		case <-done:
		default:
			stop()
		}
	})
	return stop
}

func (c *caseRig) publish(r protocol.ProvisionRequest, msgID string) {
	c.t.Helper()
	data, err := protocol.Encode(&r)
	if err != nil {
		c.t.Fatal(err)
	}
	if _, err := c.js.Publish(context.Background(), protocol.ProvisionSubject(r.Instance, r.Action), data, jetstream.WithMsgID(msgID)); err != nil {
		c.t.Fatal(err)
	}
}

// noteMachine remembers a reprovision request as the maker of the
// instance's machine.
func (c *caseRig) noteMachine(r protocol.ProvisionRequest) {
	if r.Action == protocol.ProvisionReprovision {
		c.madeBy = r.ID
	}
}

// runToEnd runs a setup request with a provisioner that does not crash.
func (c *caseRig) runToEnd(r protocol.ProvisionRequest) error {
	c.noteMachine(r)
	stop := c.start(nil, nil)
	defer stop()
	c.publish(r, r.ID)
	if !c.drained(90 * time.Second) {
		return fmt.Errorf("request %s was not handled within 90s", r.ID)
	}
	if e, ok := c.outcome(r.ID); ok && e.Status == protocol.StatusFailed {
		return fmt.Errorf("request %s failed: %s", r.ID, e.Message)
	}
	return nil
}

// drained waits until every request published is acknowledged.
func (c *caseRig) drained(timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		st, err := c.js.Stream(context.Background(), protocol.StreamProvision)
		if err == nil {
			info, err := st.Info(context.Background())
			if err == nil && info.State.Msgs == 0 {
				return true
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return false
}

// waitDone waits until the request under test and its second delivery are
// both handled to their end.
func (c *caseRig) waitDone() {
	c.t.Helper()
	if !c.drained(3 * time.Minute) {
		c.t.Fatalf("the request (delivered twice) was not acknowledged within 3 minutes; machine %+v", c.machine())
	}
}

// check asserts the outcome of the request under test.
func (c *caseRig) check(op operation) {
	c.t.Helper()
	e, ok := c.outcome(c.opReq.ID)
	switch {
	case !ok:
		c.t.Errorf("no outcome reported for %s", c.opReq.ID)
	case e.Status != protocol.StatusOK:
		c.t.Errorf("the operation ended %s: %s", e.Status, e.Message)
	}
	if op.status != "" {
		m := c.machine()
		if m.RequestID != c.opReq.ID || m.Status != op.status || m.Error != nil {
			c.t.Errorf("machine record %+v; want request %s, status %s, no error", m, c.opReq.ID, op.status)
		}
	}
	c.w.Check(c.t, c.js, c.instance, op.want(c))
}

// machine is the instance's record in fm_machines.
func (c *caseRig) machine() protocol.MachineState {
	var st protocol.MachineState
	kv, err := c.js.KeyValue(context.Background(), protocol.BucketMachines)
	if err != nil {
		return st
	}
	e, err := kv.Get(context.Background(), c.instance)
	if err != nil {
		return st
	}
	_ = protocol.Decode(e.Value(), &st)
	return st
}

// events returns the instance's events of a kind, in order.
func (c *caseRig) events(kind protocol.EventKind) []protocol.Event {
	st, err := c.js.Stream(context.Background(), protocol.StreamEvents)
	if err != nil {
		c.t.Fatal(err)
	}
	info, err := st.Info(context.Background())
	if err != nil {
		c.t.Fatal(err)
	}
	var out []protocol.Event
	subject := protocol.EventSubject(c.instance, kind)
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && seq != 0; seq++ {
		m, err := st.GetMsg(context.Background(), seq)
		if err != nil || m.Subject != subject {
			continue
		}
		var e protocol.Event
		if json.Unmarshal(m.Data, &e) == nil {
			out = append(out, e)
		}
	}
	return out
}

// outcome is the first outcome reported for request id: its result event
// (the id the provisioner gives it derives from the request's, so the bus
// keeps the first one and drops repeats, as the server would see it).
func (c *caseRig) outcome(id string) (protocol.Event, bool) {
	for _, kind := range []protocol.EventKind{protocol.EventMachine, protocol.EventSnapshot} {
		for _, e := range c.events(kind) {
			if e.ID == id+"-ok" || e.ID == id+"-failed" {
				return e, true
			}
		}
	}
	return protocol.Event{}, false
}

// recordedSnapshot is the snapshot as the server records it: from the
// first report of its outcome (id is the request's, or "<request>-snapshot"
// for the snapshot a reprovision takes first).
func (c *caseRig) recordedSnapshot(id string) (protocol.SnapshotRef, error) {
	for _, e := range c.events(protocol.EventSnapshot) {
		if e.ID == id+"-ok" && e.Snapshot != nil {
			return *e.Snapshot, nil
		}
		if e.ID == id+"-failed" {
			return protocol.SnapshotRef{}, fmt.Errorf("it failed: %s", e.Message)
		}
	}
	return protocol.SnapshotRef{}, fmt.Errorf("no outcome reported for %s", id)
}

// writeAfterSnapshot changes the data volume after a snapshot, when the
// world can (the local backend's volume is a folder).
func (c *caseRig) writeAfterSnapshot() error {
	if v, ok := c.w.(interface {
		WriteVolume(instance, name, content string) error
	}); ok {
		return v.WriteVolume(c.instance, "after-snapshot.txt", "written after the snapshot")
	}
	return nil
}
