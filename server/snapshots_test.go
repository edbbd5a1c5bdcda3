package server_test

import (
	"strings"
	"testing"

	"github.com/fleetmanager/fm/api"
)

// TestSnapshotBadInput: what cannot be done is refused with a clear error
// and changes nothing.
func TestSnapshotBadInput(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("snapbad", vn.ID, tpl.ID, im.ID))
	base := "/instances/" + in.ID + "/snapshots"

	// Never provisioned: no data volume to snapshot.
	e := f.failed(f.do("POST", base+"?reasonForSnapshot=x", ""), 409, "FailedPrecondition")
	if !strings.Contains(e.DetailedMessage, "no data volume") {
		t.Fatal(e.DetailedMessage)
	}
	f.failed(f.do("POST", "/instances/in-nope/snapshots", ""), 404, "NotFound")
	f.failed(f.do("GET", base+"/snap-nope", ""), 404, "NotFound")
	f.failed(f.do("DELETE", base+"/snap-nope", ""), 404, "NotFound")
	f.failed(f.do("POST", base+"/snap-nope/reprovision", ""), 404, "NotFound")

	// A snapshot being taken (no provisioner here) can be neither restored
	// nor deleted.
	runningWithVolume(t, f.env.Bus, in.ID)
	var sn api.Snapshot
	f.ok(f.do("POST", base+"?reasonForSnapshot=pending", ""), &sn)
	if sn.State != api.SnapshotCreating || sn.FutureID == "" || sn.Reason != "pending" || sn.InstanceID != in.ID {
		t.Fatalf("%+v", sn)
	}
	before := f.snapshotOf(base)
	e = f.failed(f.do("POST", base+"/"+sn.ID+"/reprovision", ""), 409, "FailedPrecondition")
	if !strings.Contains(e.DetailedMessage, "not AVAILABLE") {
		t.Fatal(e.DetailedMessage)
	}
	f.failed(f.do("DELETE", base+"/"+sn.ID, ""), 409, "FailedPrecondition")
	f.failed(f.do("POST", base+"/"+sn.ID+"/reprovision?allowDowngrade=maybe", ""), 400, "InvalidArgument")
	// Another instance's path does not reach it.
	other := f.createInstance(instanceBody("snapbad2", vn.ID, tpl.ID, im.ID))
	f.failed(f.do("GET", "/instances/"+other.ID+"/snapshots/"+sn.ID, ""), 404, "NotFound")
	if after := f.snapshotOf(base); after != before {
		t.Fatalf("refused requests changed the snapshots:\n%s\n%s", after, before)
	}
}
