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
		t.Run(c.name, func(t *testing.T) { c.run(t, newAttemptLimiter()) })
	}
}
