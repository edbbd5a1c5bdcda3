package provisioner

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// lease is a KV entry that one holder keeps alive by rewriting it, with a
// revision check, well within the bucket's TTL. Whoever holds it is the
// active provisioner; when the holder dies the entry expires and another
// process takes it.
type lease struct {
	kv     jetstream.KeyValue
	key    string
	holder string
	ttl    time.Duration
	rev    uint64
}

// acquire blocks until the lease is held or ctx ends.
func (l *lease) acquire(ctx context.Context) error {
	for {
		rev, err := l.kv.Create(ctx, l.key, []byte(l.holder))
		if err == nil {
			l.rev = rev
			return nil
		}
		if !errors.Is(err, jetstream.ErrKeyExists) {
			if ctx.Err() != nil {
				return ctx.Err()
			}
		} else if e, gerr := l.kv.Get(ctx, l.key); gerr == nil && string(e.Value()) == l.holder {
			// Ours, from before a restart of this same holder.
			l.rev = e.Revision()
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(l.ttl / 3):
		}
	}
}

// keep renews the lease until ctx ends or the lease is lost, which it
// reports by returning.
func (l *lease) keep(ctx context.Context) error {
	tick := time.NewTicker(l.ttl / 3)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
		rctx, cancel := context.WithTimeout(ctx, l.ttl/3)
		rev, err := l.kv.Update(rctx, l.key, []byte(l.holder), l.rev)
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

// release gives the lease up at once, so that another holder need not wait
// for it to expire.
func (l *lease) release() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = l.kv.Delete(ctx, l.key, jetstream.LastRevision(l.rev))
}
