package server_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
	"github.com/fleetmanager/fm/server/servertest"
)

// These tests run a server with no provisioner: what it decides alone.

func TestActionsRefusedInTheWrongState(t *testing.T) {
	f := start(t, servertest.WithConfig(func(c *server.Config) { c.LocalBackend = true }))
	vn, tpl, _ := f.fleet()
	kit := f.addImageWithKit("dss-14.0.0-k", "14.0.0")
	in := f.createInstance(instanceBody("i", vn.ID, tpl.ID, kit.ID))
	before := f.snapshotOf("/instances/" + in.ID + "/status")
	for _, action := range []string{"start", "stop", "deprovision", "restart-dss", "replay-setup-actions"} {
		e := f.failed(f.do("GET", "/instances/"+in.ID+"/actions/"+action, ""), 409, "FailedPrecondition")
		if !strings.Contains(e.DetailedMessage, "while it is created") {
			t.Errorf("%s: %s", action, e.DetailedMessage)
		}
	}
	f.failed(f.do("POST", "/instances/"+in.ID+"/actions/reset-user-password", `{"userName":"admin","password":"x"}`), 409, "FailedPrecondition")
	f.failed(f.do("POST", "/instances/"+in.ID+"/actions/reset-user-password", `{"userName":"admin"}`), 400, "InvalidArgument")
	f.failed(f.do("GET", "/instances/"+in.ID+"/actions/get-initial-password", ""), 409, "FailedPrecondition")
	f.failed(f.do("GET", "/instances/"+in.ID+"/admin-api-key", ""), 409, "FailedPrecondition")
	for _, p := range []string{"/instances/in-nope/actions/reprovision", "/instances/in-nope/status", "/instances/in-nope/admin-api-key"} {
		f.failed(f.do("GET", p, ""), 404, "NotFound")
	}
	if after := f.snapshotOf("/instances/" + in.ID + "/status"); after != before {
		t.Fatalf("refused actions changed the instance:\n%s\n%s", before, after)
	}
	var ops []api.Future
	f.ok(f.do("GET", "/futures?targetId="+in.ID, ""), &ops)
	if len(ops) != 0 {
		t.Fatalf("refused actions left operations: %+v", ops)
	}
	// The status of a never provisioned instance has every field consumers read.
	var st map[string]any
	f.ok(f.do("GET", "/instances/"+in.ID+"/status", ""), &st)
	for _, k := range []string{"publicURL", "hasPhysicalInstance", "cloudMachineIsUp", "publicIP", "privateIP", "publicDNS", "privateDNS"} {
		if _, ok := st[k]; !ok {
			t.Errorf("status lacks %s", k)
		}
	}
	if st["state"] != "created" || st["hasPhysicalInstance"] != false || st["publicURL"] != "" {
		t.Fatalf("status %v", st)
	}
}

func TestReprovisionNeedsAUsableImage(t *testing.T) {
	f := start(t, servertest.WithConfig(func(c *server.Config) { c.LocalBackend = true }))
	vn, tpl, amiOnly := f.fleet()
	in := f.createInstance(instanceBody("i", vn.ID, tpl.ID, amiOnly.ID))
	e := f.failed(f.do("GET", "/instances/"+in.ID+"/actions/reprovision", ""), 409, "FailedPrecondition")
	if !strings.Contains(e.DetailedMessage, "has no kit") {
		t.Fatal(e.DetailedMessage)
	}
}

func TestOneOperationAtATimeAndDeadlines(t *testing.T) {
	f := start(t, servertest.WithConfig(func(c *server.Config) {
		c.LocalBackend, c.OperationTimeout, c.SweepInterval = true, 2*time.Second, 100*time.Millisecond
	}))
	vn, tpl, _ := f.fleet()
	kit := f.addImageWithKit("dss-14.0.0-k", "14.0.0")
	in := f.createInstance(instanceBody("i", vn.ID, tpl.ID, kit.ID))
	var op api.Future
	f.ok(f.do("GET", "/instances/"+in.ID+"/actions/reprovision", ""), &op)
	if op.JobID == "" || op.HasResult || op.State != "running" {
		t.Fatalf("%+v", op)
	}
	e := f.failed(f.do("GET", "/instances/"+in.ID+"/actions/reprovision", ""), 409, "FailedPrecondition")
	if !strings.Contains(e.DetailedMessage, op.JobID) {
		t.Fatalf("the refusal does not name the operation under way: %s", e.DetailedMessage)
	}
	f.failed(f.do("GET", "/instances/"+in.ID+"/actions/delete?force=True", ""), 409, "FailedPrecondition")
	// Nobody provisions: the operation fails at its deadline, as an HTTP
	// error to the client, and the instance can be acted on again.
	deadline := time.Now().Add(15 * time.Second)
	for {
		r := f.do("GET", "/futures/"+op.JobID+"?peek=False", "")
		if r.status == 504 {
			f.failed(r, 504, "DeadlineExceeded")
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the operation never timed out: %d %s", r.status, r.body)
		}
		time.Sleep(100 * time.Millisecond)
	}
	waitState(t, f, in.ID, "failed")
	var again api.Future
	f.ok(f.do("GET", "/instances/"+in.ID+"/actions/reprovision", ""), &again)
	// An aborted operation answers as an error too, and frees the instance.
	f.ok(f.do("DELETE", "/futures/"+again.JobID, ""), nil)
	f.failed(f.do("GET", "/futures/"+again.JobID+"?peek=False", ""), 409, "Aborted")
	waitState(t, f, in.ID, "failed")
}

func waitState(t *testing.T, f *fm, id, state string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var st map[string]any
		f.ok(f.do("GET", "/instances/"+id+"/status", ""), &st)
		if st["state"] == state && st["operation"] == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("instance never %s: %v", state, st)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestAnOperationIsOrderedAfterEveryEarlierOne: a new operation's requests
// are ordered after every earlier operation's and every request the
// instance's machine has seen, also when the machine record's order is far
// above the lifecycle's revision, as after FM's records were restored from
// a backup (fm admin restore numbers the buckets' revisions again from 1,
// while the machine record keeps the order it had): ordered by the
// lifecycle's revision alone, every request after a restore was refused by
// the provisioner as superseded. The second operation is made while the
// first's request was never handled, so only the lifecycle's own count
// orders it after the first.
func TestAnOperationIsOrderedAfterEveryEarlierOne(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("order", vn.ID, tpl.ID, im.ID))
	runningWithVolume(t, f.env.Bus, in.ID)
	ctx := context.Background()
	js := f.env.Bus.JetStream(t)
	machines, err := js.KeyValue(ctx, protocol.BucketMachines)
	if err != nil {
		t.Fatal(err)
	}
	const seen = 1000 // the order of the last request the machine handled before the backup
	m := protocol.MachineState{Instance: in.ID, Backend: "fake", Status: protocol.MachineRunning, MachineID: "m-1", VolumeID: "vol-1",
		VolumeSizeGB: 50, RequestID: "op-0-reprovision", Order: seen}
	data, _ := protocol.Encode(&m)
	if _, err := machines.Put(ctx, in.ID, data); err != nil {
		t.Fatal(err)
	}
	order := func(jobID string) uint64 {
		t.Helper()
		req, _ := opRequest(t, js, jobID)
		return req.Order
	}
	var fut api.Future
	// The server's copy of the machine records follows the bus: until it
	// has the one written above, a stop is refused (no running machine) or
	// ordered without it, and is ended and asked again.
	for deadline := time.Now().Add(10 * time.Second); ; {
		r := f.do("GET", "/instances/"+in.ID+"/actions/stop", "")
		if r.status == 200 {
			if err := json.Unmarshal(r.body, &fut); err != nil {
				t.Fatal(err)
			}
			if order(fut.JobID) > seen {
				break
			}
			f.ok(f.do("DELETE", "/futures/"+fut.JobID, ""), nil)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no stop ordered after the machine's %d in 10 s: %d %s", seen, r.status, r.body)
		}
		time.Sleep(50 * time.Millisecond)
	}
	first := order(fut.JobID)
	if first <= seen {
		t.Fatalf("the stop's order is %d, not after the machine's %d", first, seen)
	}
	f.ok(f.do("DELETE", "/futures/"+fut.JobID, ""), nil)
	f.accepted("GET", "/instances/"+in.ID+"/actions/start", &fut)
	if next := order(fut.JobID); next <= first {
		t.Fatalf("the next operation's order %d is not after %d", next, first)
	}
}
