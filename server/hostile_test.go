package server_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
	"github.com/nats-io/nats.go/jetstream"
)

// These tests play a hostile agent from the server's side: NATS lets an
// agent publish only on its own instance's subjects, and only the event
// kinds an agent sends (internal/natsauth tests that part); what it says
// there must touch nothing but its own instance's records. The e2e suite
// (e2e/hostile_test.go) plays the same with a real agent's credentials.

// publishOn publishes an event on subject, whatever the event says.
func publishOn(t *testing.T, js jetstream.JetStream, subject string, e protocol.Event) {
	t.Helper()
	if e.ID == "" {
		e.ID = protocol.NewID("ev")
	}
	e.Time = time.Now().UTC()
	data, err := protocol.Encode(&e)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(context.Background(), subject, data, jetstream.WithMsgID(e.ID)); err != nil {
		t.Fatal(err)
	}
}

// TestAnAgentsEventsTouchOnlyItsOwnRecords: events published on agent A's
// own subjects that name instance B, B's snapshot or B's operation, or
// that pass for the provisioner's, change nothing.
func TestAnAgentsEventsTouchOnlyItsOwnRecords(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	a := f.createInstance(instanceBody("hostile", vn.ID, tpl.ID, im.ID))
	b := f.createInstance(instanceBody("target", vn.ID, tpl.ID, im.ID))
	runningWithVolume(t, f.env.Bus, a.ID)
	runningWithVolume(t, f.env.Bus, b.ID)
	js := f.env.Bus.JetStream(t)
	takeSnapshot := func(id string) (api.Future, api.Snapshot) {
		t.Helper()
		var sn api.Snapshot
		f.accepted("POST", "/instances/"+id+"/snapshots?reasonForSnapshot=kept", &sn)
		if sn.FutureID == "" || sn.State != api.SnapshotCreating {
			t.Fatalf("snapshot of %s: %+v", id, sn)
		}
		return api.Future{JobID: sn.FutureID}, sn
	}
	aOp, aSnap := takeSnapshot(a.ID)
	bOp, bSnap := takeSnapshot(b.ID)
	// And an operation that holds B, waiting for its agent's answer.
	var bRestart api.Future
	f.ok(f.do("GET", "/instances/"+b.ID+"/actions/restart-dss", ""), &bRestart)
	evil := &protocol.SnapshotRef{ID: bSnap.ID, Store: "local", Ref: "in-evil/stolen.tar.gz", SHA256: "00", SizeBytes: 1}
	own := &protocol.SnapshotRef{ID: aSnap.ID, Store: "local", Ref: "forged.tar.gz", SHA256: "00", SizeBytes: 1}
	aSnapshots := protocol.EventSubject(a.ID, protocol.EventSnapshot)
	for _, c := range []struct {
		name    string
		subject string
		e       protocol.Event
	}{
		{"B's snapshot and operation, on A's subject", aSnapshots, protocol.Event{Instance: a.ID, Kind: protocol.EventSnapshot,
			Source: "provisioner", OpID: bOp.JobID, Step: string(protocol.ProvisionSnapshot), Status: protocol.StatusOK, Snapshot: evil}},
		{"B's snapshot with A's operation", aSnapshots, protocol.Event{Instance: a.ID, Kind: protocol.EventSnapshot,
			Source: "provisioner", OpID: aOp.JobID, Step: string(protocol.ProvisionSnapshot), Status: protocol.StatusOK, Snapshot: evil}},
		{"B's snapshot deleted with A's operation", aSnapshots, protocol.Event{Instance: a.ID, Kind: protocol.EventSnapshot,
			Source: "provisioner", OpID: aOp.JobID, Step: string(protocol.ProvisionDeleteSnapshot), Status: protocol.StatusOK, Snapshot: evil}},
		{"B named on A's subject", aSnapshots, protocol.Event{Instance: b.ID, Kind: protocol.EventSnapshot,
			Source: "provisioner", OpID: bOp.JobID, Step: string(protocol.ProvisionSnapshot), Status: protocol.StatusOK, Snapshot: evil}},
		{"B's operation failed by a command result", protocol.EventSubject(a.ID, protocol.EventCommand), protocol.Event{Instance: b.ID,
			Kind: protocol.EventCommand, Source: "agent", OpID: bOp.JobID, Status: protocol.StatusFailed,
			Error: protocol.Errorf(protocol.CodeInternal, "forged")}},
		// The event is A's own, as the subject says; the operation it
		// names is B's, its command's id guessed right.
		{"B's operation failed by A's own command result", protocol.EventSubject(a.ID, protocol.EventCommand), protocol.Event{Instance: a.ID,
			Kind: protocol.EventCommand, Source: "agent", OpID: bRestart.JobID, CommandID: bRestart.JobID + "-cmd",
			Step: string(protocol.CommandRestartDSS), Status: protocol.StatusFailed, Error: protocol.Errorf(protocol.CodeInternal, "forged")}},
		{"a step of A's own in B's operation", protocol.EventSubject(a.ID, protocol.EventStep), protocol.Event{Instance: a.ID,
			Kind: protocol.EventStep, Source: "agent", OpID: bRestart.JobID, Step: "forged", Status: protocol.StatusOK}},
		// An agent may publish steps; a snapshot's outcome is the
		// provisioner's to say, even about the agent's own instance.
		{"a provisioner's event on an agent's subject", protocol.EventSubject(a.ID, protocol.EventStep), protocol.Event{Instance: a.ID,
			Kind: protocol.EventSnapshot, Source: "provisioner", OpID: aOp.JobID, Step: string(protocol.ProvisionSnapshot),
			Status: protocol.StatusOK, Snapshot: own}},
	} {
		t.Run(c.name, func(t *testing.T) { publishOn(t, js, c.subject, c.e) })
	}
	// A last event the server does fold, so that every forged one before
	// it was folded (or skipped) too: A's own snapshot fails, as the
	// provisioner says on its own subject.
	publishEvent(t, js, protocol.Event{Instance: a.ID, Kind: protocol.EventSnapshot, Source: "provisioner", OpID: aOp.JobID,
		Step: string(protocol.ProvisionSnapshot), Status: protocol.StatusFailed, Error: protocol.Errorf(protocol.CodeInternal, "no space"),
		Snapshot: &protocol.SnapshotRef{ID: aSnap.ID}})
	f.waitFuture(aOp.JobID, api.OpFailed, 10*time.Second)
	if list := f.snapshots(a.ID); len(list) != 1 || list[0].State != api.SnapshotFailed || list[0].StoreRef != "" {
		t.Fatalf("A's own snapshot: %+v", list)
	}
	list := f.snapshots(b.ID)
	if len(list) != 1 || list[0].State != api.SnapshotCreating || list[0].StoreRef != "" {
		t.Fatalf("B's snapshot after A's events: %+v", list)
	}
	for _, op := range []string{bOp.JobID, bRestart.JobID} {
		var fut api.Future
		f.ok(f.do("GET", "/futures/"+op, ""), &fut)
		if fut.State != api.OpRunning {
			t.Fatalf("B's operation after A's events: %+v", fut)
		}
		if raw, _ := json.Marshal(fut); strings.Contains(string(raw), "forged") {
			t.Fatalf("B's operation carries A's step: %s", raw)
		}
	}
}

// TestAHeartbeatCountsOnlyForItsSubject: a heartbeat on A's subject that
// names B does not make B look alive, and one of an instance not on record
// is not kept.
func TestAHeartbeatCountsOnlyForItsSubject(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	a := f.createInstance(instanceBody("beats", vn.ID, tpl.ID, im.ID))
	b := f.createInstance(instanceBody("still", vn.ID, tpl.ID, im.ID))
	runningWithVolume(t, f.env.Bus, a.ID)
	runningWithVolume(t, f.env.Bus, b.ID)
	nc := f.env.Bus.Connect(t)
	beat := func(subject, instance string) {
		t.Helper()
		data, err := protocol.Encode(&protocol.Heartbeat{Instance: instance, Time: time.Now().UTC()})
		if err != nil {
			t.Fatal(err)
		}
		if err := nc.Publish(subject, data); err != nil {
			t.Fatal(err)
		}
	}
	lastSeen := func(id string) any {
		var st map[string]any
		f.ok(f.do("GET", "/instances/"+id+"/status", ""), &st)
		return st["lastSeen"]
	}
	for deadline := time.Now().Add(10 * time.Second); lastSeen(a.ID) == nil; time.Sleep(50 * time.Millisecond) {
		beat(protocol.HeartbeatSubject(a.ID), b.ID) // forged
		beat(protocol.HeartbeatSubject("in-nobody"), "in-nobody")
		beat(protocol.HeartbeatSubject(a.ID), a.ID) // its own
		if time.Now().After(deadline) {
			t.Fatal("A's own heartbeat was never seen")
		}
	}
	if seen := lastSeen(b.ID); seen != nil {
		t.Fatalf("B was seen at %v, by A's heartbeats", seen)
	}
	// Heartbeats of instances not on record, on their own subjects, take
	// no room: the map would otherwise grow with every id an agent makes
	// up (a heartbeat has no reply to wait for; A's own, seen above, came
	// after the first of them on the same connection).
	if server.HeartbeatKept(f.env.Server, "in-nobody") {
		t.Fatal("the heartbeat of an instance not on record is kept")
	}
}

// TestACredentialInClearIsRefusedWhereTheInstanceHasAKey: once a machine
// joined, its agent seals the credentials it sends; one in clear is not
// its machine's and is not kept.
func TestACredentialInClearIsRefusedWhereTheInstanceHasAKey(t *testing.T) {
	f := startWithAuthority(t, time.Hour)
	vn, tpl, _ := f.fleet()
	im := f.addImageWithKit("dss-sealed", "14.0.0")
	in := f.createInstance(instanceBody("sealed", vn.ID, tpl.ID, im.ID))
	req := f.provisionRequest(in.ID)
	var joined protocol.JoinResponse
	f.ok(f.join(in.ID, req.Spec.Join.Token), &joined)
	raw, err := base64.StdEncoding.DecodeString(joined.InstanceKey)
	if err != nil {
		t.Fatal(err)
	}
	box, err := seal.New(raw)
	if err != nil {
		t.Fatal(err)
	}
	js := f.env.Bus.JetStream(t)
	const (
		inClear = iota
		sealed
		sealedForAnotherCommand
	)
	answer := func(kind protocol.CommandKind, result any, how int) {
		t.Helper()
		data, _ := json.Marshal(result)
		e := protocol.Event{Instance: in.ID, Kind: protocol.EventCommand, Source: "agent", CommandID: protocol.NewID("sec"),
			Step: string(kind), Status: protocol.StatusOK}
		switch how {
		case sealed:
			e.SealedResult = box.Seal(string(data), protocol.SealedResultPlace(in.ID, e.CommandID))
		case sealedForAnotherCommand:
			// A sealed result replayed as another command's.
			e.SealedResult = box.Seal(string(data), protocol.SealedResultPlace(in.ID, "sec-other"))
		default:
			e.Result = data
		}
		publishEvent(t, js, e)
	}
	adminKey := func() (int, string) {
		r := f.do("GET", "/instances/"+in.ID+"/admin-api-key", "")
		var v struct {
			AdminAPIKey string `json:"adminAPIKey"`
		}
		_ = json.Unmarshal(r.body, &v)
		return r.status, v.AdminAPIKey
	}
	waitKey := func(want string) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			if _, got := adminKey(); got == want {
				return
			}
			if time.Now().After(deadline) {
				code, got := adminKey()
				t.Fatalf("admin API key %d %q, want %q", code, got, want)
			}
		}
	}
	answer(protocol.CommandGetAdminAPIKey, protocol.AdminAPIKeyResult{AdminAPIKey: "sealed-1"}, sealed)
	waitKey("sealed-1")
	answer(protocol.CommandGetAdminAPIKey, protocol.AdminAPIKeyResult{AdminAPIKey: "forged-in-clear"}, inClear)
	answer(protocol.CommandGetAdminAPIKey, protocol.AdminAPIKeyResult{AdminAPIKey: "replayed"}, sealedForAnotherCommand)
	// Folded in order: once the next sealed answer shows, the ones before
	// it were folded.
	answer(protocol.CommandGetInitialPassword, protocol.InitialPasswordResult{Password: "pw"}, sealed)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if r := f.do("GET", "/instances/"+in.ID+"/actions/get-initial-password", ""); r.status == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the sealed initial password was never kept")
		}
	}
	if _, got := adminKey(); got != "sealed-1" {
		t.Fatalf("admin API key %q after a clear and a replayed answer, want the sealed one", got)
	}
}
