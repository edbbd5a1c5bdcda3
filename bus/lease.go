package bus

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// ErrLeaseLost is returned by Keep when the lease is no longer this
// holder's, or can no longer be proven to be: whoever held it must stop the
// work it guards at once.
var ErrLeaseLost = errors.New("lease lost")

// Lease is a key of fm_leases that one holder keeps alive by rewriting it,
// with a revision check, well within the bucket's TTL. Whoever holds it does
// the work it guards (the provisioner, the snapshot scheduler); when the
// holder dies the entry expires and another process takes it.
//
// A holder that cannot renew (the bus is away from it, or it is
// partitioned) gives the lease up on its own clock before the bus can give
// it to another: it counts the TTL from when it sent its last successful
// renewal, which is before the bus wrote it. A holder frozen and resumed
// (SIGSTOP, a suspended machine) may run a little before Keep notices: it
// asks Held before it acts. Writes made under the lease are revision-checked
// on the records they change, so that a holder deposed meanwhile has them
// refused where its successor wrote them first.
type Lease struct {
	KV     jetstream.KeyValue
	Key    string
	Holder string
	// TTL must match the bucket's (Topology.LeaseTTL).
	TTL time.Duration

	mu sync.Mutex
	// rev is the entry's revision this holder last wrote.
	rev uint64
	// proven is when the last write that proved the lease was sent.
	proven time.Time
	// lost is set once the lease is known to be another holder's, or given
	// up.
	lost bool
}

// prove records when a write that proved the lease was sent.
func (l *Lease) prove(rev uint64, sent time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.rev, l.proven, l.lost = rev, sent, false
}

// lose records that the lease is no longer this holder's.
func (l *Lease) lose() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lost = true
}

// revision is the entry's revision this holder last wrote.
func (l *Lease) revision() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.rev
}

// expires is when the holder must consider the lease lost unless it proved
// it again: the TTL from the last proof, less a margin for the drift between
// this clock and the bus's over one TTL.
func (l *Lease) expires() time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.proven.Add(l.TTL - l.TTL/10)
}

// Held says whether the lease can still be proven, on this process's clock,
// at the moment it is asked. A holder asks it right before it acts: a
// process resumed after being stopped (SIGSTOP, a frozen VM) runs its
// goroutines in any order, and one about to act must not wait for Keep's
// timer to learn that the lease may have passed to another holder.
//
// Both clocks are asked: the monotonic one (which a change of the time of day
// does not move) and the wall clock (which, unlike the monotonic one on
// Linux, counts the time the machine was suspended).
func (l *Lease) Held() bool {
	l.mu.Lock()
	lost := l.lost
	l.mu.Unlock()
	now, expires := time.Now(), l.expires()
	return !lost && now.Before(expires) && now.Round(0).Before(expires.Round(0))
}

// Acquire blocks until the lease is held or ctx ends.
func (l *Lease) Acquire(ctx context.Context) error {
	for {
		sent := time.Now()
		rev, err := l.KV.Create(ctx, l.Key, []byte(l.Holder))
		if err == nil {
			l.prove(rev, sent)
			return nil
		}
		if !errors.Is(err, jetstream.ErrKeyExists) {
			if ctx.Err() != nil {
				return ctx.Err()
			}
		} else if e, gerr := l.KV.Get(ctx, l.Key); gerr == nil && string(e.Value()) == l.Holder {
			// Ours, from before a restart of this same holder: renewed at
			// once, so that its age is known.
			sent = time.Now()
			if rev, err := l.KV.Update(ctx, l.Key, []byte(l.Holder), e.Revision()); err == nil {
				l.prove(rev, sent)
				return nil
			}
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

// Keep renews the lease until ctx ends (it then returns ctx's error) or the
// lease is lost, which it reports with an error wrapping ErrLeaseLost: taken
// by another holder, or not renewed for so long that it may have expired.
func (l *Lease) Keep(ctx context.Context) error {
	every := l.TTL / 3
	timer := time.NewTimer(every)
	defer timer.Stop()
	for {
		expires := l.expires()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Until(expires)):
			l.lose()
			return fmt.Errorf("%w: not renewed since %s (the bus is out of reach)", ErrLeaseLost, l.Proven().Format(time.RFC3339))
		case <-timer.C:
		}
		sent := time.Now()
		rctx, cancel := context.WithDeadline(ctx, expires)
		rev, err := l.KV.Update(rctx, l.Key, []byte(l.Holder), l.revision())
		cancel()
		if err == nil {
			l.prove(rev, sent)
			timer.Reset(every)
			continue
		}
		if errors.Is(err, jetstream.ErrKeyRevisionMismatch) || errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyExists) {
			l.lose()
			return fmt.Errorf("%w to another holder", ErrLeaseLost)
		}
		// The bus is away: try again soon, while the lease may still be
		// ours.
		timer.Reset(min(every, time.Second))
	}
}

// Release gives the lease up at once, so that another holder need not wait
// for it to expire.
func (l *Lease) Release() {
	l.lose()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if l.KV.Delete(ctx, l.Key, jetstream.LastRevision(l.revision())) == nil {
		return
	}
	// A renewal cut short by the end of Keep may have been written without
	// its revision coming back: delete the lease if it is still ours.
	if e, err := l.KV.Get(ctx, l.Key); err == nil && string(e.Value()) == l.Holder {
		_ = l.KV.Delete(ctx, l.Key, jetstream.LastRevision(e.Revision()))
	}
}

// Proven is when the holder last proved the lease (sent the write that
// renewed it).
func (l *Lease) Proven() time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.proven
}

// Run takes the lease (waiting for it until ctx ends), then runs fn with a
// context cancelled as soon as the lease is lost or can no longer be
// proven. That context does not end with ctx: fn watches ctx itself, so
// that it can hand back its work before it returns. When fn returns, the
// lease is given up. Run returns fn's error, or the loss of the lease
// (ErrLeaseLost) if that came first.
func (l *Lease) Run(ctx context.Context, fn func(held context.Context) error) error {
	if err := l.Acquire(ctx); err != nil {
		return err
	}
	held, stop := context.WithCancel(context.WithoutCancel(ctx))
	kept := make(chan error, 1)
	go func() {
		err := l.Keep(held)
		stop() // a lease lost stops the work at once
		kept <- err
	}()
	err := fn(held)
	stop()
	keepErr := <-kept
	l.Release()
	if err == nil && errors.Is(keepErr, ErrLeaseLost) {
		err = keepErr
	}
	return err
}
