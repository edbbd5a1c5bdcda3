package server

import (
	"context"
	"crypto/sha256"
	"fmt"
	"math"
	"slices"
	"sync"
	"time"
)

// Failed attempts allowed per key of a limiter (a client address, an API
// key id) within a sliding window; once that many failed, further attempts
// are refused unchecked until the oldest of them leaves the window.
const (
	maxFailures   = 10
	failureWindow = time.Minute
)

// attemptLimiter bounds the failed attempts at a credential per key (a
// client address, an API key id) in a sliding window. The server keeps
// three, so that one kind of failure never blocks another kind of caller
// (agents behind one NAT all join from one address):
//
//   - API authentications by client address: ten failures from an address
//     block its API requests, whatever key they carry;
//   - API authentications by key id: after ten failures naming a key id,
//     from anywhere, a wrong secret for it is answered 429 from everywhere;
//     its right secret still passes (key ids are no secret: whoever knows
//     one must not lock its holder out), so this marks a key under attack
//     rather than bounding the guesses, which the address limit and the
//     secrets' length do; other keys are not affected;
//   - joins by client address: ten refused joins block joins from it, never
//     its API requests (and API failures never block its joins).
//
// An attempt reserves its place before its credential is checked and settles
// it after, all under one lock: an attempt still being checked counts as a
// failure until it is known not to be one. So however many attempts arrive
// at once, no more are checked than the limit allows; the others wait for a
// place (checks are quick) or are refused once the failures fill the limit.
// Attempts refused unchecked (429) do not count.
type attemptLimiter struct {
	max    int
	window time.Duration
	// name is the limiter's among the server's, on the wire between
	// replicas (limiterAPIByAddr, …).
	name string
	// share, if set, tells the other replicas of a failure (never under mu).
	share func(limiter, key string, at time.Time)

	mu   sync.Mutex
	keys map[string]*attempts
	// swept is when bound last looked at every key.
	swept time.Time
}

// attempts is one key's recent failures and the attempts being checked.
type attempts struct {
	failures []time.Time // oldest first
	pending  int
	// wake lets one waiter look again when an attempt settles: a place may
	// be free. One, not all: a thousand machines joining through one NAT
	// address would otherwise all wake at every settled join. A waiter that
	// finds the key refused passes the wake on, so that every waiter learns.
	wake    chan struct{}
	waiters int
}

func newAttemptLimiter(name string) *attemptLimiter {
	return &attemptLimiter{max: maxFailures, window: failureWindow, name: name, keys: map[string]*attempts{}}
}

// errLimited is the refusal of an attempt: the key failed too often.
type errLimited struct{ retryAfter time.Duration }

func (e *errLimited) Error() string {
	return fmt.Sprintf("too many failed attempts; retry in %s", e.retryAfter)
}

// reservation is an attempt's place in a limiter's count; settle it once.
type reservation struct {
	l   *attemptLimiter
	key string
}

// reserve takes a place for an attempt under key, waiting while the places
// left are taken by attempts being checked. It fails with *errLimited if the
// key failed too often, or with ctx's error.
func (l *attemptLimiter) reserve(ctx context.Context, key string) (*reservation, error) {
	for {
		l.mu.Lock()
		a := l.entry(key, time.Now())
		switch {
		case len(a.failures) >= l.max:
			retry := time.Until(a.failures[len(a.failures)-l.max].Add(l.window))
			a.wakeOne()
			l.mu.Unlock()
			return nil, &errLimited{retryAfter: max(retry, time.Second)}
		case len(a.failures)+a.pending < l.max:
			a.pending++
			l.mu.Unlock()
			return &reservation{l: l, key: key}, nil
		}
		a.waiters++
		l.mu.Unlock()
		var err error
		select {
		case <-ctx.Done():
			err = ctx.Err()
		case <-a.wake:
		}
		l.mu.Lock()
		a.waiters--
		l.mu.Unlock()
		if err != nil {
			return nil, err
		}
	}
}

// wakeOne lets one waiter look again (or the next one to wait, if none
// does yet); l.mu is held.
func (a *attempts) wakeOne() {
	select {
	case a.wake <- struct{}{}:
	default: // as many wakes are pending as places can free
	}
}

// settle ends the attempt: a failure is counted (and told to the other
// replicas), a success leaves no trace. A nil reservation is ignored.
func (r *reservation) settle(failed bool) {
	if r == nil {
		return
	}
	l := r.l
	now := time.Now()
	l.mu.Lock()
	a := l.entry(r.key, now)
	a.pending--
	if failed {
		a.failures = append(a.failures, now)
	}
	a.wakeOne()
	if a.pending == 0 && a.waiters == 0 && len(a.failures) == 0 {
		delete(l.keys, r.key)
	}
	l.bound(now)
	l.mu.Unlock()
	if failed && l.share != nil {
		l.share(l.name, r.key, now)
	}
}

// learn counts a failure another replica saw at its time at, so that a
// guesser spreading attempts over the replicas behind a load balancer meets
// one count. A time ahead of this clock counts as now (a failure must not
// last longer than the window here); one already out of the window is
// ignored.
func (l *attemptLimiter) learn(key string, at time.Time) {
	now := time.Now()
	if at.After(now) {
		at = now
	}
	if !at.After(now.Add(-l.window)) {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	a := l.entry(key, now)
	i, _ := slices.BinarySearchFunc(a.failures, at, time.Time.Compare)
	a.failures = slices.Insert(a.failures, i, at)
	l.bound(now)
}

// bound forgets the keys whose failures are old once there are many, to
// bound the memory, looking at every key at most once a second (many keys
// with recent failures would otherwise make every attempt look at them
// all); l.mu is held.
func (l *attemptLimiter) bound(now time.Time) {
	if len(l.keys) <= 10000 || now.Sub(l.swept) < time.Second {
		return
	}
	l.swept = now
	for k, o := range l.keys {
		if o.pending == 0 && o.waiters == 0 && len(l.prune(o, now)) == 0 {
			delete(l.keys, k)
		}
	}
}

// entry returns key's attempts, pruned of failures out of the window;
// l.mu is held.
func (l *attemptLimiter) entry(key string, now time.Time) *attempts {
	a := l.keys[key]
	if a == nil {
		a = &attempts{wake: make(chan struct{}, l.max)}
		l.keys[key] = a
	}
	l.prune(a, now)
	return a
}

func (l *attemptLimiter) prune(a *attempts, now time.Time) []time.Time {
	cutoff := now.Add(-l.window)
	i := 0
	for i < len(a.failures) && !a.failures[i].After(cutoff) {
		i++
	}
	a.failures = a.failures[i:]
	return a.failures
}

// keyIDSlot is what the key-id limiter counts a typed key id under: a digest,
// so that whatever was typed (perhaps a secret, perhaps megabytes) is
// neither kept nor sized by the caller.
func keyIDSlot(id string) string {
	sum := sha256.Sum256([]byte(id))
	return string(sum[:16])
}

// retryAfterSeconds is a Retry-After value: whole seconds, rounded up.
func retryAfterSeconds(d time.Duration) int {
	return int(math.Ceil(d.Seconds()))
}
