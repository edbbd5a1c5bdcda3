package bus_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/nats-io/nats.go/jetstream"
)

// partitionedKV is a bucket whose writes fail once cut, as they do for a
// holder that lost the bus. It notes when the bus wrote the last renewal
// that got through.
type partitionedKV struct {
	jetstream.KeyValue
	cut     atomic.Bool
	written atomic.Int64 // the bus's time of the last renewal, in ns
}

func (p *partitionedKV) Update(ctx context.Context, key string, value []byte, rev uint64) (uint64, error) {
	if p.cut.Load() {
		return 0, errors.New("nats: timeout")
	}
	rev, err := p.KeyValue.Update(ctx, key, value, rev)
	if err == nil {
		if e, gerr := p.KeyValue.Get(ctx, key); gerr == nil && e.Revision() == rev {
			p.written.Store(e.Created().UnixNano())
		}
	}
	return rev, err
}

// TestALeaseThatCannotBeRenewedIsGivenUp: a holder whose renewals fail stops
// holding the lease on its own clock, before the bus expires the entry and
// could give the lease to another holder; the bus then does expire it, and
// another holder takes it. One that was deposed learns it at its next
// renewal. The bucket's TTL is the lease's, as in FM's topology, so that
// the order of the two expiries is what is tested.
func TestALeaseThatCannotBeRenewedIsGivenUp(t *testing.T) {
	js := bustest.Run(t).JetStream(t)
	ctx := context.Background()
	const ttl = 3 * time.Second
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "test_leases", TTL: ttl, History: 1})
	if err != nil {
		t.Fatal(err)
	}
	p := &partitionedKV{KeyValue: kv}
	l := &bus.Lease{KV: p, Key: "test-lease", Holder: "a", TTL: ttl}
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	type stopped struct {
		err error
		at  time.Time
	}
	kept := make(chan stopped, 1)
	acquired := l.Proven()
	go func() { err := l.Keep(ctx); kept <- stopped{err, time.Now()} }()
	// Renewed at least once, then cut off.
	for deadline := time.Now().Add(ttl); p.written.Load() == 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the lease was never renewed")
		}
	}
	p.cut.Store(true)
	var s stopped
	select {
	case s = <-kept:
	case <-time.After(3 * ttl):
		t.Fatal("a holder that cannot renew keeps acting past the TTL")
	}
	if !errors.Is(s.err, bus.ErrLeaseLost) {
		t.Fatalf("Keep: %v", s.err)
	}
	if l.Held() {
		t.Fatal("Held says yes after Keep gave the lease up")
	}
	if !l.Proven().After(acquired) {
		t.Fatal("the renewal was not counted")
	}
	// The bus expires the entry TTL after it wrote the last renewal: the
	// holder stopped before, by its own clock.
	expires := time.Unix(0, p.written.Load()).Add(ttl)
	if !s.at.Before(expires) {
		t.Fatalf("the holder stopped at %s, after the bus expired its lease at %s", s.at.Format(time.StampMilli), expires.Format(time.StampMilli))
	}
	// The bus does expire it, and then another holder takes it.
	for deadline := time.Now().Add(4 * ttl); ; time.Sleep(50 * time.Millisecond) {
		if _, err := kv.Get(ctx, "test-lease"); errors.Is(err, jetstream.ErrKeyNotFound) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the entry of a lease not renewed is still there %s after its last renewal", time.Since(expires.Add(-ttl)))
		}
	}
	if time.Now().Before(expires) {
		t.Fatalf("the bus expired the entry before its TTL (%s left)", time.Until(expires))
	}
	next := &bus.Lease{KV: kv, Key: "test-lease", Holder: "b", TTL: ttl}
	actx, cancel := context.WithTimeout(ctx, ttl)
	defer cancel()
	if err := next.Acquire(actx); err != nil {
		t.Fatalf("another holder could not take the expired lease: %v", err)
	}

	// Deposed: another holder took the key over.
	l2 := &bus.Lease{KV: kv, Key: "test-lease-2", Holder: "b", TTL: ttl}
	if err := l2.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	deposed := make(chan error, 1)
	go func() { deposed <- l2.Keep(ctx) }()
	if _, err := kv.Put(ctx, "test-lease-2", []byte("c")); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-deposed:
		if !errors.Is(err, bus.ErrLeaseLost) {
			t.Fatalf("Keep: %v", err)
		}
		// Its clock alone would say it is still held.
		if l2.Held() {
			t.Fatal("Held says yes after the lease was lost to another holder")
		}
	case <-time.After(3 * ttl):
		t.Fatal("a deposed holder did not notice")
	}
}

// TestHeldNeedsNoKeeper: a holder whose keeper has not run (a process
// stopped and resumed, whose goroutines run in any order) learns from Held
// alone, by its clock, that it can no longer prove the lease, and not
// before Keep would have given it up.
func TestHeldNeedsNoKeeper(t *testing.T) {
	js := bustest.Run(t).JetStream(t)
	ctx := context.Background()
	const ttl = 2 * time.Second
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "test_leases", TTL: ttl, History: 1})
	if err != nil {
		t.Fatal(err)
	}
	l := &bus.Lease{KV: kv, Key: "test-lease", Holder: "a", TTL: ttl}
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	if !l.Held() {
		t.Fatal("a lease just acquired is not held")
	}
	released := &bus.Lease{KV: kv, Key: "test-lease-released", Holder: "a", TTL: ttl}
	if err := released.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	released.Release()
	if released.Held() {
		t.Fatal("Held says yes after Release")
	}
	giveUp := l.Proven().Add(ttl - ttl/10)
	for deadline := time.Now().Add(2 * ttl); l.Held(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("a lease never renewed is still held after two TTLs")
		}
	}
	if time.Now().Before(giveUp) {
		t.Fatalf("Held said no %s before the lease could be lost", time.Until(giveUp))
	}
}
