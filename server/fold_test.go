package server_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
	"github.com/fleetmanager/fm/server/servertest"
)

// TestEventsInFlightWhenAServerStops: a server that stops hands the events
// it pulled but did not fold back to the bus at once, so that the next server
// folds them without waiting for the consumer's ack wait, and none is lost.
func TestEventsInFlightWhenAServerStops(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("inflight", vn.ID, tpl.ID, im.ID))
	runningWithVolume(t, f.env.Bus, in.ID)
	const n = 200
	snaps := make([]api.Snapshot, n)
	for i := range snaps {
		// The first waits for the server's copy of the machine record
		// just written (until then: "no data volume yet").
		f.accepted("POST", "/instances/"+in.ID+"/snapshots?reasonForSnapshot=burst", &snaps[i])
	}

	ctx := context.Background()
	js := f.env.Bus.JetStream(t)
	for _, sn := range snaps {
		e := protocol.Event{ID: "ev-" + sn.ID, Instance: in.ID, Kind: protocol.EventSnapshot, Time: time.Now().UTC(),
			Source: "provisioner", OpID: sn.FutureID, Step: string(protocol.ProvisionSnapshot), Status: protocol.StatusOK,
			Snapshot: &protocol.SnapshotRef{ID: sn.ID, Store: "fake", Ref: "fake/" + sn.ID, SHA256: "00"}}
		data, err := protocol.Encode(&e)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := js.PublishAsync(protocol.EventSubject(in.ID, e.Kind), data); err != nil {
			t.Fatal(err)
		}
	}
	<-js.PublishAsyncComplete()
	f.env.Stop()

	available := func() int {
		kv, err := js.KeyValue(ctx, protocol.BucketSnapshots)
		if err != nil {
			t.Fatal(err)
		}
		count := 0
		for _, sn := range snaps {
			if entry, err := kv.Get(ctx, sn.ID); err == nil && strings.Contains(string(entry.Value()), `"AVAILABLE"`) {
				count++
			}
		}
		return count
	}
	folded := available()
	if folded == n {
		t.Fatal("every event was folded before the stop: nothing was in flight, publish more")
	}
	// Well within the consumer's ack wait (30 s), which is how long an event
	// pulled by a stopped server and not handed back waits.
	restarted := time.Now()
	f.env.RestartServer(t)
	for available() != n {
		if time.Since(restarted) > 20*time.Second {
			t.Fatalf("%d of %d events folded 20 s after the next server started (%d before the stop)", available(), n, folded)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("%d of %d events folded before the stop, the rest %s after the next server started", folded, n, time.Since(restarted))
}

// TestTheHeartbeatOfADeletedInstanceGoes: the last heartbeat kept per
// instance goes with the instance (the sweep drops it), so the map does not
// grow with every machine the fleet ever had.
func TestTheHeartbeatOfADeletedInstanceGoes(t *testing.T) {
	f := start(t, servertest.WithConfig(func(c *server.Config) { c.SweepInterval = 100 * time.Millisecond }))
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("gone", vn.ID, tpl.ID, im.ID))
	nc := f.env.Bus.Connect(t)
	data, err := protocol.Encode(&protocol.Heartbeat{Instance: in.ID, Time: time.Now().UTC()})
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); !server.HeartbeatKept(f.env.Server, in.ID); time.Sleep(50 * time.Millisecond) {
		if err := nc.Publish(protocol.HeartbeatSubject(in.ID), data); err != nil {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatal("the instance's heartbeat was never kept")
		}
	}
	var del api.Future
	f.ok(f.do("GET", "/instances/"+in.ID+"/actions/delete", ""), &del)
	for deadline := time.Now().Add(10 * time.Second); server.HeartbeatKept(f.env.Server, in.ID); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the deleted instance's heartbeat is still kept")
		}
	}
}
