package server

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

type doc struct {
	N int `json:"n"`
}

func testBucket(t *testing.T) jetstream.KeyValue {
	t.Helper()
	kv, err := bustest.Run(t).JetStream(t).CreateKeyValue(context.Background(), jetstream.KeyValueConfig{Bucket: "test_table"})
	if err != nil {
		t.Fatal(err)
	}
	return kv
}

// TestGetOrFetchReadsWhatTheCopyLacks: a value another replica wrote (or
// one a lagging copy has not seen) is read from the bucket; a key in
// neither is errNotFound.
func TestGetOrFetchReadsWhatTheCopyLacks(t *testing.T) {
	ctx := context.Background()
	kv := testBucket(t)
	tab := newTable[doc](kv, "doc", zerolog.Nop()) // never run: its copy stays empty
	if _, err := kv.Put(ctx, "a", []byte(`{"n":7}`)); err != nil {
		t.Fatal(err)
	}
	if _, _, ok := tab.get("a"); ok {
		t.Fatal("the copy of a table never run holds a value")
	}
	v, rev, err := tab.getOrFetch(ctx, "a")
	if err != nil || v.N != 7 || rev == 0 {
		t.Fatalf("getOrFetch: %+v rev %d, %v", v, rev, err)
	}
	if _, _, err := tab.getOrFetch(ctx, "missing"); !errors.Is(err, errNotFound) {
		t.Fatalf("a key in neither: %v, want errNotFound", err)
	}
}

// TestRewatchStartsTheWatcherAgain: a watcher asked to start again loads
// the bucket anew, deletions made meanwhile included, and follows it after.
func TestRewatchStartsTheWatcherAgain(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	kv := testBucket(t)
	var logged lockedLog
	tab := newTable[doc](kv, "doc", zerolog.New(&logged))
	go tab.run(ctx)
	if err := tab.waitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	rev, err := kv.Put(ctx, "a", []byte(`{"n":1}`))
	if err != nil {
		t.Fatal(err)
	}
	tab.waitRev(ctx, rev)
	restarts := func() int { return strings.Count(logged.String(), "bucket watcher restarted") }
	for i := range 3 {
		tab.rewatch()
		for deadline := time.Now().Add(5 * time.Second); restarts() != i+1; time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("round %d: the watcher did not start again", i)
			}
		}
		rev, err = kv.Put(ctx, "b", []byte(`{"n":2}`))
		if err != nil {
			t.Fatal(err)
		}
		tab.waitRev(ctx, rev)
		if v, _, ok := tab.get("b"); !ok || v.N != 2 {
			t.Fatalf("round %d: the copy after a rewatch lacks b: %+v", i, v)
		}
		if _, _, ok := tab.get("a"); !ok {
			t.Fatal("a was lost in the rewatch")
		}
		if err := kv.Delete(ctx, "b"); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, _, ok := tab.get("b"); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a deleted key stays in the copy")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type lockedLog struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// lossyKV is a bucket whose next write is taken but not answered (lose):
// the bus stored it, and the answer was lost, as when a node goes or a
// stream changes leader; or not taken at all (refuse).
type lossyKV struct {
	jetstream.KeyValue
	lose, refuse int
}

func (l *lossyKV) fail() (bool, error) {
	switch {
	case l.refuse > 0:
		l.refuse--
		return true, jetstream.ErrNoStreamResponse
	case l.lose > 0:
		l.lose--
		return false, jetstream.ErrNoStreamResponse
	}
	return false, nil
}

func (l *lossyKV) Create(ctx context.Context, key string, value []byte, opts ...jetstream.KVCreateOpt) (uint64, error) {
	if skip, err := l.fail(); skip {
		return 0, err
	} else if err != nil {
		_, _ = l.KeyValue.Create(ctx, key, value, opts...)
		return 0, err
	}
	return l.KeyValue.Create(ctx, key, value, opts...)
}

func (l *lossyKV) Update(ctx context.Context, key string, value []byte, rev uint64) (uint64, error) {
	if skip, err := l.fail(); skip {
		return 0, err
	} else if err != nil {
		_, _ = l.KeyValue.Update(ctx, key, value, rev)
		return 0, err
	}
	return l.KeyValue.Update(ctx, key, value, rev)
}

func (l *lossyKV) Delete(ctx context.Context, key string, opts ...jetstream.KVDeleteOpt) error {
	if skip, err := l.fail(); skip {
		return err
	} else if err != nil {
		_ = l.KeyValue.Delete(ctx, key, opts...)
		return err
	}
	return l.KeyValue.Delete(ctx, key, opts...)
}

// TestWritesTheBusDidNotAnswer: a write the bus did not answer is tried
// again; one it had taken is recognised as the table's own (not a
// conflict), one it had not is made; a value another writer put in between
// is still a conflict.
func TestWritesTheBusDidNotAnswer(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for _, c := range []struct {
		name         string
		lose, refuse int
	}{{"taken, answer lost", 1, 0}, {"not taken", 0, 1}, {"not taken, then taken and lost", 1, 1}} {
		t.Run(c.name, func(t *testing.T) {
			real := testBucket(t)
			kv := &lossyKV{KeyValue: real}
			tab := newTable[doc](kv, "doc", zerolog.Nop())
			go tab.run(ctx)
			if err := tab.waitSynced(ctx); err != nil {
				t.Fatal(err)
			}
			kv.lose, kv.refuse = c.lose, c.refuse
			rev, err := tab.create(ctx, "a", doc{N: 1})
			if err != nil || rev == 0 {
				t.Fatalf("create: rev %d, %v", rev, err)
			}
			kv.lose, kv.refuse = c.lose, c.refuse
			rev2, err := tab.update(ctx, "a", doc{N: 2}, rev)
			if err != nil || rev2 <= rev {
				t.Fatalf("update: rev %d, %v", rev2, err)
			}
			if e, err := real.Get(ctx, "a"); err != nil || string(e.Value()) != `{"n":2}` || e.Revision() != rev2 {
				t.Fatalf("stored: %v", err)
			}
			kv.lose, kv.refuse = c.lose, c.refuse
			if err := tab.remove(ctx, "a", rev2); err != nil {
				t.Fatalf("remove: %v", err)
			}
			if _, err := real.Get(ctx, "a"); !errors.Is(err, jetstream.ErrKeyNotFound) {
				t.Fatalf("after remove: %v", err)
			}
		})
	}
	t.Run("another writer's value", func(t *testing.T) {
		real := testBucket(t)
		kv := &lossyKV{KeyValue: real}
		tab := newTable[doc](kv, "doc", zerolog.Nop())
		rev, err := real.Put(ctx, "a", []byte(`{"n":1}`))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := real.Put(ctx, "a", []byte(`{"n":5}`)); err != nil {
			t.Fatal(err)
		}
		kv.refuse = 1 // the try again finds another's value
		if _, err := tab.update(ctx, "a", doc{N: 2}, rev); !errors.Is(err, errConflict) {
			t.Fatalf("update over another writer's value: %v, want errConflict", err)
		}
		kv.refuse = 1
		if _, err := tab.create(ctx, "a", doc{N: 2}); !errors.Is(err, errExists) {
			t.Fatalf("create over another writer's value: %v, want errExists", err)
		}
	})
}
