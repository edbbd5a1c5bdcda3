package bus

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Lease is a key of fm_leases that one holder keeps alive by rewriting it,
// with a revision check, well within the bucket's TTL. Whoever holds it does
// the work it guards (the provisioner, the snapshot scheduler); when the
// holder dies the entry expires and another process takes it.
type Lease struct {
	KV     jetstream.KeyValue
	Key    string
	Holder string
	// TTL must match the bucket's (Topology.LeaseTTL).
	TTL time.Duration
	rev uint64
}

// Acquire blocks until the lease is held or ctx ends.
func (l *Lease) Acquire(ctx context.Context) error {
	for {
		rev, err := l.KV.Create(ctx, l.Key, []byte(l.Holder))
		if err == nil {
			l.rev = rev
			return nil
		}
		if !errors.Is(err, jetstream.ErrKeyExists) {
			if ctx.Err() != nil {
				return ctx.Err()
			}
		} else if e, gerr := l.KV.Get(ctx, l.Key); gerr == nil && string(e.Value()) == l.Holder {
			// Ours, from before a restart of this same holder.
			l.rev = e.Revision()
			return nil
		}
		// Look again soon: a holder that stops releases the lease, and a
		// standby should not leave the work undone for long.
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(min(l.TTL/3, time.Second)):
		}
	}
}

// Keep renews the lease until ctx ends or the lease is lost, which it
// reports by returning.
func (l *Lease) Keep(ctx context.Context) error {
	tick := time.NewTicker(l.TTL / 3)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
		rctx, cancel := context.WithTimeout(ctx, l.TTL/3)
		rev, err := l.KV.Update(rctx, l.Key, []byte(l.Holder), l.rev)
		cancel()
		if err != nil {
			if errors.Is(err, jetstream.ErrKeyRevisionMismatch) || errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyExists) {
				return errors.New("lease lost to another holder")
			}
			continue // the bus is away; keep trying while the lease may still be ours
		}
		l.rev = rev
	}
}

// Release gives the lease up at once, so that another holder need not wait
// for it to expire.
func (l *Lease) Release() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if l.KV.Delete(ctx, l.Key, jetstream.LastRevision(l.rev)) == nil {
		return
	}
	// A renewal cut short by the end of Keep may have been written without
	// its revision coming back: delete the lease if it is still ours.
	if e, err := l.KV.Get(ctx, l.Key); err == nil && string(e.Value()) == l.Holder {
		_ = l.KV.Delete(ctx, l.Key, jetstream.LastRevision(e.Revision()))
	}
}
