package bus_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// partitionedKV is a bucket whose writes fail once cut, as they do for a
// holder that lost the bus.
type partitionedKV struct {
	jetstream.KeyValue
	cut atomic.Bool
}

func (p *partitionedKV) Update(ctx context.Context, key string, value []byte, rev uint64) (uint64, error) {
	if p.cut.Load() {
		return 0, errors.New("nats: timeout")
	}
	return p.KeyValue.Update(ctx, key, value, rev)
}

// TestALeaseThatCannotBeRenewedIsGivenUp: a holder whose renewals fail stops
// holding the lease on its own clock, before the bus could give it to
// another holder, and one that was deposed learns it at its next renewal.
func TestALeaseThatCannotBeRenewedIsGivenUp(t *testing.T) {
	js := bustest.Run(t).JetStream(t)
	ctx := context.Background()
	kv, err := js.KeyValue(ctx, protocol.BucketLeases)
	if err != nil {
		t.Fatal(err)
	}
	const ttl = 3 * time.Second
	p := &partitionedKV{KeyValue: kv}
	l := &bus.Lease{KV: p, Key: "test-lease", Holder: "a", TTL: ttl}
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	kept := make(chan error, 1)
	acquired := l.Proven()
	go func() { kept <- l.Keep(ctx) }()
	// Renewed at least once (the entry's revision moves on), then cut off.
	first, _ := kv.Get(ctx, "test-lease")
	for deadline := time.Now().Add(ttl); ; {
		if e, err := kv.Get(ctx, "test-lease"); err == nil && e.Revision() > first.Revision() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the lease was never renewed")
		}
		time.Sleep(20 * time.Millisecond)
	}
	p.cut.Store(true)
	select {
	case err := <-kept:
		if !errors.Is(err, bus.ErrLeaseLost) {
			t.Fatalf("Keep: %v", err)
		}
		// Counted from the last renewal sent, the holder stopped before
		// the bus could expire the entry and hand the lease on.
		last := l.Proven()
		if !last.After(acquired) {
			t.Fatal("the renewal was not counted")
		}
		if took := time.Since(last); took >= ttl {
			t.Fatalf("the lease was given up %s after its last renewal; the TTL is %s", took, ttl)
		}
		e, err := kv.Get(ctx, "test-lease")
		if err != nil || string(e.Value()) != "a" {
			t.Fatalf("the entry is gone before the holder stopped: %v", err)
		}
	case <-time.After(3 * ttl):
		t.Fatal("a holder that cannot renew keeps acting past the TTL")
	}

	// Deposed: another holder took the key over.
	l2 := &bus.Lease{KV: kv, Key: "test-lease-2", Holder: "b", TTL: ttl}
	if err := l2.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	go func() { kept <- l2.Keep(ctx) }()
	if _, err := kv.Put(ctx, "test-lease-2", []byte("c")); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-kept:
		if !errors.Is(err, bus.ErrLeaseLost) {
			t.Fatalf("Keep: %v", err)
		}
	case <-time.After(3 * ttl):
		t.Fatal("a deposed holder did not notice")
	}
}
