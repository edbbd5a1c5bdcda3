package server_test

import (
	"context"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

// TestFleetView: GET /fleet sums up the fleet (by state, node type and DSS
// version; agents silent, DSS down, volumes above 80%) and gives each
// instance's state, with /instances' filters and page; a viewer may read
// it, and a bad filter is refused.
func TestFleetView(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	idle := f.createInstance(instanceBody("idle", vn.ID, tpl.ID, im.ID))
	full := f.createInstance(instanceBody("full", vn.ID, tpl.ID, im.ID))
	down := f.createInstance(instanceBody("down", vn.ID, tpl.ID, im.ID))
	js := f.env.Bus.JetStream(t)
	agents, err := js.KeyValue(context.Background(), protocol.BucketAgents)
	if err != nil {
		t.Fatal(err)
	}
	report := func(id string, dss protocol.DSSState, used uint64) {
		t.Helper()
		runningWithVolume(t, f.env.Bus, id)
		st := protocol.AgentStatus{Instance: id, Time: time.Now().UTC(), Phase: protocol.PhaseReady,
			DSS:     protocol.DSSStatus{State: dss, Version: "14.0.0", NodeType: "design", Port: 10000},
			Machine: protocol.MachineFacts{DataVolumeBytes: 100 << 30, DataVolumeUsedBytes: used << 30}}
		data, _ := protocol.Encode(&st)
		if _, err := agents.Put(context.Background(), id, data); err != nil {
			t.Fatal(err)
		}
	}
	report(full.ID, protocol.DSSRunning, 90)
	report(down.ID, protocol.DSSStopped, 10)

	var view api.Fleet
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		f.ok(f.do("GET", "/fleet", ""), &view)
		if view.Summary.DSSDown == 1 && view.Summary.VolumesAbove80Percent == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the fleet view never showed both reports: %+v", view.Summary)
		}
	}
	sum := view.Summary
	if sum.Instances != 3 || sum.ByState["running"] != 2 || sum.ByState["created"] != 1 || sum.ByDSSVersion["14.0.0"] != 2 ||
		sum.ByNodeType["design"] != 3 || sum.AgentsNotResponding != 0 || sum.OperationsRunning != 0 {
		t.Fatalf("summary %+v", sum)
	}
	rows := map[string]api.FleetRow{}
	for _, r := range view.Instances {
		rows[r.ID] = r
	}
	if r := rows[full.ID]; r.State != "running" || r.DSSVersion != "14.0.0" || r.DSSState != "running" || !r.AgentResponding ||
		r.VolumeUsedRatio == nil || *r.VolumeUsedRatio != 0.9 || r.LastSeen == nil {
		t.Fatalf("row of a running instance: %+v", r)
	}
	if r := rows[idle.ID]; r.State != "created" || r.DSSVersion != "" || r.VolumeUsedRatio != nil {
		t.Fatalf("row of an instance never provisioned: %+v", r)
	}

	// Filters and page, as /instances takes them: the summary counts what
	// the filters keep, the rows are the page.
	var page api.Fleet
	f.ok(f.do("GET", "/fleet?state=running&limit=1", ""), &page)
	if page.Summary.Instances != 2 || len(page.Instances) != 1 || page.Instances[0].State != "running" {
		t.Fatalf("running, a page of one: %+v", page)
	}
	var summary api.Fleet
	f.ok(f.do("GET", "/fleet?rows=false&label=IDL", ""), &summary)
	if summary.Summary.Instances != 1 || summary.Instances != nil {
		t.Fatalf("the summary of the label idl alone: %+v", summary)
	}
	k := f.newKey("viewer")
	f.ok(f.doAs("GET", "/fleet", "", k.ID, k.Secret), &summary)
	f.failed(f.do("GET", "/fleet?state=asleep", ""), 400, "InvalidArgument")
	f.failed(f.do("GET", "/fleet?rows=maybe", ""), 400, "InvalidArgument")
	f.failed(f.doAs("GET", "/fleet", "", "", ""), 401, "Unauthenticated")
}
