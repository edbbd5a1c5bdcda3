package server_test

import (
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
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
