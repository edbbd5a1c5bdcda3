package agent

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
)

// TestOnlyItsOwnKeyReachesTheDesiredState: what lands on the instance's
// desired-state subject and is not its key of fm_desired (JetStream's
// answer to another agent that named this subject as its reply: that
// agent's own desired state, a publish acknowledgement) is dropped without
// a rejection event and without moving the revision.
func TestOnlyItsOwnKeyReachesTheDesiredState(t *testing.T) {
	srv := bustest.Run(t)
	nc := srv.Connect(t)
	var rejected atomic.Int32
	w := newDesiredWatch("in-x", nc, zerolog.Nop(), func(error, uint64) { rejected.Add(1) })
	sub, err := w.subscribe()
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	state := func(instance string, gen uint64) []byte {
		b, _ := protocol.Encode(&protocol.DesiredState{Instance: instance, Generation: gen, NodeType: "design",
			DSS: protocol.DSSTarget{Version: "14.0.0", Port: 10000, Kit: protocol.KitSource{Object: "k"}}})
		return b
	}
	send := func(subject string, seq string, data []byte) {
		t.Helper()
		m := nats.NewMsg(protocol.DesiredSubject("in-x"))
		if subject != "" {
			m.Header.Set("Nats-Subject", subject)
		}
		m.Header.Set("Nats-Sequence", seq)
		m.Data = data
		if err := nc.PublishMsg(m); err != nil {
			t.Fatal(err)
		}
	}
	send(protocol.KVSubject(protocol.BucketDesired, "in-y"), "900", state("in-y", 9)) // another agent's desired state
	send("", "901", []byte(`{"stream":"FM_EVENTS","seq":1}`))                         // a publish acknowledgement
	send(protocol.KVSubject(protocol.BucketDesired, "in-x"), "5", state("in-x", 1))   // its own
	for deadline := time.Now().Add(10 * time.Second); w.latest() == nil; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("its own desired state never arrived")
		}
	}
	if d := w.latest(); d.Instance != "in-x" || d.Generation != 1 || rejected.Load() != 0 {
		t.Fatalf("desired state %+v, %d rejections", d, rejected.Load())
	}
	w.mu.Lock()
	rev := w.rev
	w.mu.Unlock()
	if rev != 5 {
		t.Fatalf("revision %d after what was not its key, want 5", rev)
	}
}

// TestWhenLoadedWaitsForTheFirstRead: before the key was first read,
// whenLoaded waits (until its context ends, then says what there is);
// once read, even with no desired state (404), it answers at once.
func TestWhenLoadedWaitsForTheFirstRead(t *testing.T) {
	srv := bustest.Run(t)
	w := newDesiredWatch("in-x", srv.Connect(t), zerolog.Nop(), func(error, uint64) {})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	began := time.Now()
	if d := w.whenLoaded(ctx); d != nil || time.Since(began) < 100*time.Millisecond {
		t.Fatalf("before any read: %+v after %s", d, time.Since(began))
	}
	// No key for the instance: the direct get answers 404.
	if err := bus.DefaultTopology().Declare(context.Background(), srv.JetStream(t)); err != nil {
		t.Fatal(err)
	}
	if err := w.fetch(context.Background()); err != nil {
		t.Fatal(err)
	}
	// Answered because it was read, not because the wait ended.
	wait, cancelWait := context.WithTimeout(context.Background(), time.Minute)
	defer cancelWait()
	if d := w.whenLoaded(wait); d != nil || wait.Err() != nil {
		t.Fatalf("after a read of no key: %+v (%v)", d, wait.Err())
	}
}
