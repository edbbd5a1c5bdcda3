package server_test

import (
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
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

// TestUpgradeTakesASnapshotFirst: a reprovision that changes DSS's version
// records the snapshot it takes first, asks the provisioner to take it before
// anything else, and has the snapshot's time on top of its own deadline.
func TestUpgradeTakesASnapshotFirst(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	newer := f.addImageWithKit("dss-14.1.0-test", "14.1.0")
	in := f.createInstance(instanceBody("up", vn.ID, tpl.ID, im.ID))
	runningWithVolume(t, f.env.Bus, in.ID)
	m := map[string]any{}
	f.ok(f.do("GET", "/instances/"+in.ID, ""), &m)
	m["imageId"] = newer.ID
	f.ok(f.do("PUT", "/instances/"+in.ID, mustJSON(t, m)), nil)

	var fut api.Future
	f.ok(f.do("GET", "/instances/"+in.ID+"/actions/reprovision", ""), &fut)
	list := f.snapshots(in.ID)
	if len(list) != 1 || list[0].Reason != "before changing DSS from 14.0.0 to 14.1.0" || list[0].Automated ||
		list[0].FutureID != fut.JobID || list[0].DSSVersion != "14.0.0" || list[0].State != api.SnapshotCreating {
		t.Fatalf("the pre-upgrade snapshot: %+v", list)
	}
	req, deadline := opRequest(t, f.env.Bus.JetStream(t), fut.JobID)
	if req.Action != protocol.ProvisionReprovision || req.Snapshot == nil || req.Snapshot.ID != list[0].ID {
		t.Fatalf("the provision request does not take the snapshot first: %+v", req)
	}
	if left := time.Until(deadline); left < 3*time.Hour {
		t.Fatalf("the upgrade's deadline leaves %s, not the snapshot's time on top of its own", left)
	}
}
