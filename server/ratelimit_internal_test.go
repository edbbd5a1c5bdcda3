package server

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestAttemptLimiter: attempts being checked hold their places, so that no
// more than the limit are checked at once; failures fill the limit for the
// window; successes leave no trace.
func TestAttemptLimiter(t *testing.T) {
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	ctx := context.Background()
	fill := func(t *testing.T, l *attemptLimiter, key string) []*reservation {
		var rs []*reservation
		for i := 0; i < l.max; i++ {
			r, err := l.reserve(ctx, key)
			if err != nil {
				t.Fatalf("attempt %d: %v", i, err)
			}
			rs = append(rs, r)
		}
		return rs
	}
	cases := []struct {
		name string
		run  func(t *testing.T, l *attemptLimiter)
	}{
		{"attempts being checked hold their places", func(t *testing.T, l *attemptLimiter) {
			rs := fill(t, l, "a")
			// One more waits for a place (here: until its context ends).
			if _, err := l.reserve(cancelled, "a"); !errors.Is(err, context.Canceled) {
				t.Fatalf("an attempt beyond the limit got %v, want to wait", err)
			}
			// Another key is not affected.
			r, err := l.reserve(cancelled, "b")
			if err != nil {
				t.Fatal(err)
			}
			r.settle(true)
			// A success frees a place; a waiting attempt takes it.
			got := make(chan error, 1)
			go func() {
				r, err := l.reserve(ctx, "a")
				if err == nil {
					r.settle(false)
				}
				got <- err
			}()
			rs[0].settle(false)
			if err := <-got; err != nil {
				t.Fatal(err)
			}
			for _, r := range rs[1:] {
				r.settle(false)
			}
		}},
		{"failures fill the limit for the window", func(t *testing.T, l *attemptLimiter) {
			rs := fill(t, l, "a")
			for _, r := range rs {
				r.settle(true)
			}
			_, err := l.reserve(ctx, "a")
			var lim *errLimited
			if !errors.As(err, &lim) || lim.retryAfter <= l.window-10*time.Second || lim.retryAfter > l.window {
				t.Fatalf("after %d failures: %v", l.max, err)
			}
		}},
		{"waiting attempts are refused once failures fill the limit", func(t *testing.T, l *attemptLimiter) {
			rs := fill(t, l, "a")
			got := make(chan error, 1)
			go func() {
				_, err := l.reserve(ctx, "a")
				got <- err
			}()
			for _, r := range rs {
				r.settle(true)
			}
			var lim *errLimited
			if err := <-got; !errors.As(err, &lim) {
				t.Fatalf("a waiting attempt got %v", err)
			}
		}},
		{"many waiters all get a place, none left behind", func(t *testing.T, l *attemptLimiter) {
			rs := fill(t, l, "a")
			const waiters = 200
			got := make(chan error, waiters)
			for range waiters {
				go func() {
					r, err := l.reserve(ctx, "a")
					if err == nil {
						r.settle(false)
					}
					got <- err
				}()
			}
			for _, r := range rs {
				r.settle(false)
			}
			for range waiters {
				select {
				case err := <-got:
					if err != nil {
						t.Fatal(err)
					}
				case <-time.After(10 * time.Second):
					t.Fatal("a waiting attempt never got a place")
				}
			}
			if len(l.keys) != 0 {
				t.Fatalf("kept %v", l.keys)
			}
		}},
		{"every waiter learns of the refusal", func(t *testing.T, l *attemptLimiter) {
			rs := fill(t, l, "a")
			const waiters = 50
			got := make(chan error, waiters)
			for range waiters {
				go func() {
					_, err := l.reserve(ctx, "a")
					got <- err
				}()
			}
			for _, r := range rs {
				r.settle(true)
			}
			for range waiters {
				var lim *errLimited
				select {
				case err := <-got:
					if !errors.As(err, &lim) {
						t.Fatalf("a waiting attempt got %v", err)
					}
				case <-time.After(10 * time.Second):
					t.Fatal("a waiting attempt was never told")
				}
			}
		}},
		{"failures are told, and failures told are counted", func(t *testing.T, l *attemptLimiter) {
			var told []string
			l.share = func(limiter, key string, at time.Time) { told = append(told, limiter+"/"+key) }
			r, err := l.reserve(ctx, "a")
			if err != nil {
				t.Fatal(err)
			}
			r.settle(true)
			r, _ = l.reserve(ctx, "a")
			r.settle(false) // a success is not told
			if len(told) != 1 || told[0] != "test/a" {
				t.Fatalf("told %v, want the one failure", told)
			}
			now := time.Now()
			l.learn("b", now.Add(-2*l.window)) // out of the window: ignored
			if _, kept := l.keys["b"]; kept {
				t.Fatal("a failure out of the window was kept")
			}
			l.learn("a", now.Add(time.Hour))   // a clock ahead: counted as now
			l.learn("a", now.Add(-l.window/2)) // older than the local failure: kept in order
			for i := 3; i < l.max; i++ {
				l.learn("a", now)
			}
			_, err = l.reserve(ctx, "a")
			var limited *errLimited
			if !errors.As(err, &limited) {
				t.Fatalf("after %d failures, %d of them learnt: %v, want a refusal", l.max, l.max-1, err)
			}
			// The oldest failure leaves the window first: the one learnt
			// half a window ago.
			if limited.retryAfter > l.window/2+time.Second || limited.retryAfter < l.window/2-time.Second {
				t.Fatalf("retry after %s, want about half the window", limited.retryAfter)
			}
			if len(told) != 1 {
				t.Fatalf("failures learnt were told again: %v", told)
			}
		}},
		{"successes leave no trace", func(t *testing.T, l *attemptLimiter) {
			for i := 0; i < 3*l.max; i++ {
				r, err := l.reserve(ctx, "a")
				if err != nil {
					t.Fatal(err)
				}
				r.settle(false)
			}
			if len(l.keys) != 0 {
				t.Fatalf("kept %v", l.keys)
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { c.run(t, newAttemptLimiter("test")) })
	}
}
