package server

import (
	"context"
	"errors"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

type doc struct {
	N int `json:"n"`
}

func testBucket(t *testing.T) jetstream.KeyValue {
	t.Helper()
	kv, _ := testBus(t)
	return kv
}

// following keeps tab's copy current until ctx ends, and waits until it
// holds the bucket.
func following[T any](ctx context.Context, t *testing.T, tab *table[T]) {
	t.Helper()
	go tab.run(ctx)
	if err := tab.waitSynced(ctx); err != nil {
		t.Fatal(err)
	}
}

func testBus(t *testing.T) (jetstream.KeyValue, jetstream.JetStream) {
	t.Helper()
	js := bustest.Run(t).JetStream(t)
	kv, err := js.CreateKeyValue(context.Background(), jetstream.KeyValueConfig{Bucket: "test_table"})
	if err != nil {
		t.Fatal(err)
	}
	return kv, js
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
	following(ctx, t, tab)
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

// lossyBus takes the next writes but loses their answers (lose), as when
// a node goes or a stream changes leader, or does not take them (refuse).
type lossyBus struct {
	jetstream.JetStream
	lose, refuse int
}

func (l *lossyBus) PublishMsg(ctx context.Context, m *nats.Msg, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	switch {
	case l.refuse > 0:
		l.refuse--
		return nil, jetstream.ErrNoStreamResponse
	case l.lose > 0:
		l.lose--
		_, _ = l.JetStream.PublishMsg(ctx, m, opts...)
		return nil, jetstream.ErrNoStreamResponse
	}
	return l.JetStream.PublishMsg(ctx, m, opts...)
}

// TestWritesTheBusDidNotAnswer: a write the bus did not answer is tried
// again; one it had taken is answered as the duplicate it is (not a
// conflict), even if another writer wrote the key in between; one it had
// not is made; a value another writer put before is still a conflict.
func TestWritesTheBusDidNotAnswer(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for _, c := range []struct {
		name         string
		lose, refuse int
	}{{"taken, answer lost", 1, 0}, {"not taken", 0, 1}, {"not taken, then taken and lost", 1, 1}} {
		t.Run(c.name, func(t *testing.T) {
			real, js := testBus(t)
			b := &lossyBus{JetStream: js}
			tab := newTable[doc](real, "doc", zerolog.Nop())
			if err := tab.useBus(ctx, b); err != nil {
				t.Fatal(err)
			}
			following(ctx, t, tab)
			b.lose, b.refuse = c.lose, c.refuse
			rev, err := tab.create(ctx, "a", doc{N: 1})
			if err != nil || rev == 0 {
				t.Fatalf("create: rev %d, %v", rev, err)
			}
			b.lose, b.refuse = c.lose, c.refuse
			rev2, err := tab.update(ctx, "a", doc{N: 2}, rev)
			if err != nil || rev2 <= rev {
				t.Fatalf("update: rev %d, %v", rev2, err)
			}
			if e, err := real.Get(ctx, "a"); err != nil || string(e.Value()) != `{"n":2}` || e.Revision() != rev2 {
				t.Fatalf("stored: %v", err)
			}
			b.lose, b.refuse = c.lose, c.refuse
			if err := tab.remove(ctx, "a", rev2); err != nil {
				t.Fatalf("remove: %v", err)
			}
			if _, err := real.Get(ctx, "a"); !errors.Is(err, jetstream.ErrKeyNotFound) {
				t.Fatalf("after remove: %v", err)
			}
			b.lose, b.refuse = c.lose, c.refuse
			if _, err := tab.create(ctx, "a", doc{N: 3}); err != nil {
				t.Fatalf("create over a deleted key: %v", err)
			}
		})
	}
	t.Run("taken, answer lost, another writer between", func(t *testing.T) {
		real, js := testBus(t)
		tab := newTable[doc](real, "doc", zerolog.Nop())
		following(ctx, t, tab)
		rev, err := real.Put(ctx, "a", []byte(`{"n":1}`))
		if err != nil {
			t.Fatal(err)
		}
		// The write is taken, its answer lost; another writer writes
		// before the try again.
		if err := tab.useBus(ctx, &intruder{JetStream: js, kv: real}); err != nil {
			t.Fatal(err)
		}
		rev2, err := tab.update(ctx, "a", doc{N: 2}, rev)
		if err != nil || rev2 != rev+1 {
			t.Fatalf("update: rev %d, %v; want %d, nil (the write that was taken)", rev2, err, rev+1)
		}
	})
	t.Run("another writer's value", func(t *testing.T) {
		real, js := testBus(t)
		b := &lossyBus{JetStream: js}
		tab := newTable[doc](real, "doc", zerolog.Nop())
		if err := tab.useBus(ctx, b); err != nil {
			t.Fatal(err)
		}
		rev, err := real.Put(ctx, "a", []byte(`{"n":1}`))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := real.Put(ctx, "a", []byte(`{"n":5}`)); err != nil {
			t.Fatal(err)
		}
		b.refuse = 1
		if _, err := tab.update(ctx, "a", doc{N: 2}, rev); !errors.Is(err, errConflict) {
			t.Fatalf("update over another writer's value: %v, want errConflict", err)
		}
		b.refuse = 1
		if _, err := tab.create(ctx, "a", doc{N: 2}); !errors.Is(err, errExists) {
			t.Fatalf("create over another writer's value: %v, want errExists", err)
		}
		// The bus's answers to the tries again (tookEarlier's) wrote nothing.
		if e, err := real.Get(ctx, "a"); err != nil || string(e.Value()) != `{"n":5}` || e.Revision() != rev+1 {
			t.Fatalf("the other writer's value was touched: %v", err)
		}
	})
}

// intruder takes the first write, loses its answer, and writes the key
// itself before the try again.
type intruder struct {
	jetstream.JetStream
	kv   jetstream.KeyValue
	done bool
}

func (i *intruder) PublishMsg(ctx context.Context, m *nats.Msg, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	if i.done {
		return i.JetStream.PublishMsg(ctx, m, opts...)
	}
	i.done = true
	if _, err := i.JetStream.PublishMsg(ctx, m, opts...); err != nil {
		return nil, err
	}
	if _, err := i.kv.Put(ctx, "a", []byte(`{"n":9}`)); err != nil {
		return nil, err
	}
	return nil, jetstream.ErrNoStreamResponse
}

// TestChangedKeys: a reloaded copy reports the keys whose revision moved,
// that came, or that went, and no other.
func TestChangedKeys(t *testing.T) {
	before := map[string]row[doc]{"same": {rev: 1}, "moved": {rev: 2}, "gone": {rev: 3}}
	after := map[string]row[doc]{"same": {rev: 1}, "moved": {rev: 5}, "new": {rev: 6}}
	got := changedKeys(before, after)
	slices.Sort(got)
	if want := []string{"gone", "moved", "new"}; !slices.Equal(got, want) {
		t.Fatalf("changed keys %v, want %v", got, want)
	}
}

// probeWatch fails the test if a write asks whether an earlier try was
// taken (tookEarlier's publish), and otherwise refuses its first publish
// unanswered, then passes publishes through.
type probeWatch struct {
	jetstream.JetStream
	t       *testing.T
	refused bool
}

func (p *probeWatch) PublishMsg(ctx context.Context, m *nats.Msg, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	if !p.refused {
		p.refused = true
		return nil, jetstream.ErrNoStreamResponse
	}
	ack, err := p.JetStream.PublishMsg(ctx, m, opts...)
	if m.Header.Get(jetstream.ExpectedLastMsgIDHeader) != "" {
		p.t.Errorf("a replicated bucket was asked whether an earlier try was taken")
	}
	return ack, err
}

// TestAReplicatedBucketIsNotProbed: on a replicated bucket a try again
// refused by the revision check is a conflict, without tookEarlier's
// publish (a replicated stream checks duplicates first itself, and its
// replicas would stop on the probe's refusal).
func TestAReplicatedBucketIsNotProbed(t *testing.T) {
	ctx := context.Background()
	real, js := testBus(t)
	tab := newTable[doc](real, "doc", zerolog.Nop())
	if err := tab.useBus(ctx, &probeWatch{JetStream: js, t: t}); err != nil {
		t.Fatal(err)
	}
	tab.replicated = true // as useBus finds an R3 bucket on a cluster
	rev, err := real.Put(ctx, "a", []byte(`{"n":1}`))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := real.Put(ctx, "a", []byte(`{"n":5}`)); err != nil {
		t.Fatal(err)
	}
	if _, err := tab.update(ctx, "a", doc{N: 2}, rev); !errors.Is(err, errConflict) {
		t.Fatalf("update over another writer's value: %v, want errConflict", err)
	}
}

// ackLosingKV takes the next Create and loses its answer.
type ackLosingKV struct {
	jetstream.KeyValue
	lose int
}

func (k *ackLosingKV) Create(ctx context.Context, key string, value []byte, opts ...jetstream.KVCreateOpt) (uint64, error) {
	rev, err := k.KeyValue.Create(ctx, key, value, opts...)
	if err == nil && k.lose > 0 {
		k.lose--
		return 0, jetstream.ErrNoStreamResponse
	}
	return rev, err
}

// TestALabelClaimWhoseAnswerWasLost: a claim the bus took, its answer
// lost, is tried again and found to be the claimer's own; another's claim
// is still refused.
func TestALabelClaimWhoseAnswerWasLost(t *testing.T) {
	ctx := context.Background()
	kv := &ackLosingKV{KeyValue: testBucket(t), lose: 1}
	l := &labelClaims{kv: kv, log: zerolog.Nop(), inFlight: time.Minute}
	bears := func(context.Context, string) (bool, error) { return true, nil }
	if err := l.claim(ctx, "instance", "prod", "in-a", bears); err != nil {
		t.Fatalf("claim whose answer was lost: %v", err)
	}
	if err := l.claim(ctx, "instance", "Prod ", "in-b", bears); !errors.Is(err, errLabelTaken) {
		t.Fatalf("another's claim of the same label: %v, want errLabelTaken", err)
	}
}

// TestFetchAsksTheLeader: fetch reads a key from the bucket's stream leader
// (not a direct get, which a replica behind may answer): the last value and
// its revision, and not found for a key never written, deleted or purged.
func TestFetchAsksTheLeader(t *testing.T) {
	ctx := context.Background()
	real, js := testBus(t)
	tab := newTable[doc](real, "doc", zerolog.Nop())
	if err := tab.useBus(ctx, js); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"kept", "deleted", "purged"} {
		if _, err := real.Put(ctx, k, []byte(`{"n":1}`)); err != nil {
			t.Fatal(err)
		}
	}
	rev, err := real.Put(ctx, "kept", []byte(`{"n":2}`))
	if err != nil {
		t.Fatal(err)
	}
	if err := real.Delete(ctx, "deleted"); err != nil {
		t.Fatal(err)
	}
	if err := real.Purge(ctx, "purged"); err != nil {
		t.Fatal(err)
	}
	if v, got, err := tab.fetch(ctx, "kept"); err != nil || got != rev || v.N != 2 {
		t.Fatalf("kept: %+v rev %d (want %d), %v", v, got, rev, err)
	}
	for _, k := range []string{"never", "deleted", "purged"} {
		if _, _, err := tab.fetch(ctx, k); !errors.Is(err, errNotFound) {
			t.Errorf("%s: %v, want not found", k, err)
		}
	}
}

func TestResumeCopy(t *testing.T) {
	r := func(rev uint64) row[doc] { return row[doc]{rev: rev} }
	for _, tc := range []struct {
		name    string
		copied  map[string]row[doc]
		floor   uint64
		snap    map[string]row[doc]
		deleted map[string]uint64
		snapRev uint64
		first   uint64            // the stream's first revision, 0 if unknown
		want    map[string]uint64 // key -> revision
		unsure  []string
	}{
		{name: "a snapshot older than the copy changes nothing",
			copied: map[string]row[doc]{"a": r(5), "b": r(9)}, floor: 9,
			snap: map[string]row[doc]{"a": r(3)}, deleted: map[string]uint64{"c": 4}, snapRev: 4,
			want: map[string]uint64{"a": 5, "b": 9}, unsure: []string{"b"}},
		{name: "what the copy missed is taken",
			copied: map[string]row[doc]{"a": r(5), "b": r(9), "c": r(2)}, floor: 9,
			snap: map[string]row[doc]{"a": r(11), "b": r(9), "d": r(12)}, deleted: map[string]uint64{"c": 10}, snapRev: 12,
			want: map[string]uint64{"a": 11, "b": 9, "d": 12}},
		{name: "a key gone without a marker before the snapshot goes",
			copied: map[string]row[doc]{"a": r(5), "b": r(9)}, floor: 9,
			snap: map[string]row[doc]{"b": r(9), "c": r(10)}, snapRev: 10,
			want: map[string]uint64{"b": 9, "c": 10}},
		{name: "a key newer than a lagging snapshot stays, unsure",
			copied: map[string]row[doc]{"a": r(5), "b": r(9)}, floor: 9,
			snap: map[string]row[doc]{"a": r(5)}, snapRev: 6,
			want: map[string]uint64{"a": 5, "b": 9}, unsure: []string{"b"}},
		{name: "a marker the copy has seen is not applied twice",
			copied: map[string]row[doc]{"a": r(8)}, floor: 9,
			snap: map[string]row[doc]{}, deleted: map[string]uint64{"a": 4}, snapRev: 4,
			want: map[string]uint64{"a": 8}},
		{name: "an emptied bucket (every key expired) empties the copy",
			copied: map[string]row[doc]{"a": r(5), "b": r(9)}, floor: 9,
			snap: map[string]row[doc]{}, snapRev: 0, first: 10,
			want: map[string]uint64{}},
		{name: "a key below the stream's first revision in a lagging snapshot is asked of the leader",
			copied: map[string]row[doc]{"k": r(5)}, floor: 9,
			snap: map[string]row[doc]{"k": r(5)}, snapRev: 5, first: 10,
			want: map[string]uint64{"k": 5}, unsure: []string{"k"}},
		{name: "keys below the stream's first revision are gone, newer ones unsure",
			copied: map[string]row[doc]{"a": r(5), "b": r(9), "c": r(12)}, floor: 12,
			snap: map[string]row[doc]{"b": r(9)}, snapRev: 9, first: 7,
			want: map[string]uint64{"b": 9, "c": 12}, unsure: []string{"c"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.deleted == nil {
				tc.deleted = map[string]uint64{}
			}
			got, unsure := resumeCopy(tc.copied, tc.floor, tc.snap, tc.deleted, tc.snapRev, tc.first)
			revs := map[string]uint64{}
			for k, v := range got {
				revs[k] = v.rev
			}
			if !maps.Equal(revs, tc.want) {
				t.Fatalf("resumed copy %v, want %v", revs, tc.want)
			}
			if !slices.Equal(unsure, tc.unsure) {
				t.Fatalf("unsure %v, want %v", unsure, tc.unsure)
			}
		})
	}
}

// loadsOf is how many initial snapshots tab has applied.
func loadsOf[T any](tab *table[T]) int {
	tab.mu.RLock()
	defer tab.mu.RUnlock()
	return tab.loads
}

// rewatchAndWait starts tab's watcher again and waits until it has applied
// its new initial snapshot.
func rewatchAndWait[T any](t *testing.T, tab *table[T]) {
	t.Helper()
	before := loadsOf(tab)
	tab.rewatch()
	for deadline := time.Now().Add(10 * time.Second); loadsOf(tab) == before; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the watcher did not load the bucket again")
		}
	}
}

// TestACopyNeverGoesBack: a watcher started again on a bus node that is
// still catching up (here: a bucket holding the first writes only) leaves
// the copy as it was, and takes only what is newer as the node catches up.
func TestACopyNeverGoesBack(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	kv, js := testBus(t)
	behind, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "test_table_behind"})
	if err != nil {
		t.Fatal(err)
	}
	// The same writes in the same order give the same revisions.
	writes := []struct{ key, val string }{{"a", `{"n":1}`}, {"b", `{"n":1}`}, {"a", `{"n":2}`}, {"", "b"}, {"c", `{"n":1}`}}
	write := func(to jetstream.KeyValue, i int) uint64 {
		t.Helper()
		w := writes[i]
		if w.key == "" {
			if err := to.Delete(ctx, w.val); err != nil {
				t.Fatal(err)
			}
			st, err := to.Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			return st.(*jetstream.KeyValueBucketStatus).StreamInfo().State.LastSeq
		}
		rev, err := to.Put(ctx, w.key, []byte(w.val))
		if err != nil {
			t.Fatal(err)
		}
		return rev
	}
	var logged lockedLog
	tab := newTable[doc](kv, "doc", zerolog.New(&logged))
	following(ctx, t, tab)
	var last uint64
	for i := range writes {
		last = write(kv, i)
	}
	write(behind, 0)
	tab.waitRev(ctx, last)
	want := map[string]int{"a": 2, "c": 1}
	check := func(when string) {
		t.Helper()
		got := map[string]int{}
		for _, k := range []string{"a", "b", "c", "d"} {
			if v, _, ok := tab.get(k); ok {
				got[k] = v.N
			}
		}
		if !maps.Equal(got, want) {
			t.Fatalf("%s: the copy holds %v, want %v", when, got, want)
		}
	}
	check("before")

	// The watcher reads kv after rewatch (ordered by the channel); the
	// leader's view stays the current bucket's (streamInfo, readLeader on
	// the table's bus would be the leader's): here, kv is only a node
	// behind for the watcher.
	tab.kv = behindWatch{KeyValue: kv, watched: behind}
	rewatchAndWait(t, tab)
	// The copy must not go back, neither to the node's snapshot nor to
	// what it applies as it catches up (b again): polled for a while, to
	// give a wrong copy the time to show.
	stays := func(when string) {
		t.Helper()
		for range 20 {
			check(when)
			time.Sleep(10 * time.Millisecond)
		}
	}
	stays("after a watcher started on a node behind")
	write(behind, 1)
	stays("while the node catches up")
	// The node catches up, then takes a new write.
	for i := 2; i < len(writes); i++ {
		write(behind, i)
	}
	rev, err := behind.Put(ctx, "d", []byte(`{"n":7}`))
	if err != nil {
		t.Fatal(err)
	}
	tab.waitRev(ctx, rev)
	want["d"] = 7
	check("after the node caught up")
}

// behindWatch is a bucket whose watchers are served by a node behind
// (watched, another bucket), while everything else is asked of the bucket
// itself, as of its stream's leader.
type behindWatch struct {
	jetstream.KeyValue
	watched jetstream.KeyValue
}

func (b behindWatch) WatchAll(ctx context.Context, opts ...jetstream.WatchOpt) (jetstream.KeyWatcher, error) {
	return b.watched.WatchAll(ctx, opts...)
}

// TestACopyFollowsAnEmptiedOrRemadeBucket: keys that expired (no marker
// left) leave the copy when its watcher starts again, even when the bucket
// is left empty; a bucket deleted and made again (its revisions start over)
// is loaded anew, and its new writes are seen.
func TestACopyFollowsAnEmptiedOrRemadeBucket(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	js := bustest.Run(t).JetStream(t)
	cfg := jetstream.KeyValueConfig{Bucket: "test_expiring", TTL: time.Second}
	kv, err := js.CreateKeyValue(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	tab := newTable[doc](kv, "doc", zerolog.Nop())
	following(ctx, t, tab)
	var rev uint64
	for _, k := range []string{"a", "b", "c"} {
		if rev, err = kv.Put(ctx, k, []byte(`{"n":1}`)); err != nil {
			t.Fatal(err)
		}
	}
	tab.waitRev(ctx, rev)
	if n := tab.size(); n != 3 {
		t.Fatalf("the copy holds %d keys, want 3", n)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := kv.Get(ctx, "c"); errors.Is(err, jetstream.ErrKeyNotFound) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the keys never expired")
		}
	}
	rewatchAndWait(t, tab)
	if n := tab.size(); n != 0 {
		t.Fatalf("after the keys expired and the watcher started again, the copy holds %d keys", n)
	}

	// Made again: its revisions start over, below what the copy saw.
	if err := js.DeleteKeyValue(ctx, cfg.Bucket); err != nil {
		t.Fatal(err)
	}
	cfg.TTL = 0
	if kv, err = js.CreateKeyValue(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	// More writes than the first bucket had: its last revision alone does
	// not tell it is another bucket, its creation time does.
	for _, k := range []string{"z", "x", "w", "a"} {
		if _, err := kv.Put(ctx, k, []byte(`{"n":26}`)); err != nil {
			t.Fatal(err)
		}
	}
	rewatchAndWait(t, tab)
	if _, err = kv.Put(ctx, "y", []byte(`{"n":25}`)); err != nil {
		t.Fatal(err)
	}
	want := []string{"a", "w", "x", "y", "z"}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		var got []string
		for _, v := range tab.rows() {
			got = append(got, v.key)
		}
		slices.Sort(got)
		if slices.Equal(got, want) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the copy of the bucket made again holds %v, want %v", got, want)
		}
	}
}

// TestGroupsFollowTheirRows: a row is found in every group its value names,
// leaves a group its new value no longer names, and leaves all of them when
// it is deleted; rows loaded before the watch are grouped too.
func TestGroupsFollowTheirRows(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	kv := testBucket(t)
	if _, err := kv.Put(ctx, "early", []byte(`{"n":1}`)); err != nil {
		t.Fatal(err)
	}
	tab := newTable[doc](kv, "doc", zerolog.Nop())
	tab.groupsOf = func(d doc) []string {
		parity := "even"
		if d.N%2 == 1 {
			parity = "odd"
		}
		return []string{"all", parity}
	}
	following(ctx, t, tab)
	keys := func(group string) []string {
		var out []string
		for _, r := range tab.rowsOf(group) {
			out = append(out, r.key)
		}
		slices.Sort(out)
		return out
	}
	put := func(key, value string) {
		t.Helper()
		rev, err := kv.Put(ctx, key, []byte(value))
		if err != nil {
			t.Fatal(err)
		}
		tab.waitRev(ctx, rev)
	}
	put("a", `{"n":2}`)
	put("b", `{"n":3}`)
	for _, c := range []struct {
		name           string
		change         func()
		all, odd, even []string
	}{
		{"loaded and watched", func() {}, []string{"a", "b", "early"}, []string{"b", "early"}, []string{"a"}},
		{"a moves to odd", func() { put("a", `{"n":5}`) }, []string{"a", "b", "early"}, []string{"a", "b", "early"}, nil},
		{"early deleted", func() {
			if err := kv.Delete(ctx, "early"); err != nil {
				t.Fatal(err)
			}
			put("b", `{"n":4}`) // a later revision, to wait for
		}, []string{"a", "b"}, []string{"a"}, []string{"b"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			c.change()
			if got := keys("all"); !slices.Equal(got, c.all) {
				t.Errorf("all: %v, want %v", got, c.all)
			}
			if got := keys("odd"); !slices.Equal(got, c.odd) {
				t.Errorf("odd: %v, want %v", got, c.odd)
			}
			if got := keys("even"); !slices.Equal(got, c.even) {
				t.Errorf("even: %v, want %v", got, c.even)
			}
		})
	}
}

// TestChangeFromWritesWhatItHolds: changeFrom applies the change to the
// value the caller holds and writes it at the caller's revision without
// reading it back; a write in between is refused by the revision check,
// and the change is then made to the value read again; a change that
// leaves the value as it is writes nothing.
func TestChangeFromWritesWhatItHolds(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	real, js := testBus(t)
	tab := newTable[doc](real, "doc", zerolog.Nop())
	if err := tab.useBus(ctx, js); err != nil {
		t.Fatal(err)
	}
	following(ctx, t, tab)
	inc := func(d *doc) bool { d.N++; return true }
	for _, tc := range []struct {
		name    string
		between func(t *testing.T, key string) // a write after the caller's, or nothing
		held    doc                            // what the caller holds (the bucket has {1})
		fn      func(*doc) bool
		want    int // the value's N afterwards
		writes  bool
	}{
		// N 100 held against 1 stored at the same revision: 101 stored
		// shows the held value was changed, not one read back.
		{name: "held", held: doc{N: 100}, fn: inc, want: 101, writes: true},
		{name: "written in between", between: func(t *testing.T, key string) {
			if _, err := real.Put(ctx, key, []byte(`{"n":50}`)); err != nil {
				t.Fatal(err)
			}
		}, held: doc{N: 1}, fn: inc, want: 51, writes: true},
		{name: "left as it is", held: doc{N: 1}, fn: func(*doc) bool { return false }, want: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key := strings.ReplaceAll(tc.name, " ", "-")
			rev, err := tab.create(ctx, key, doc{N: 1})
			if err != nil {
				t.Fatal(err)
			}
			if tc.between != nil {
				tc.between(t, key)
			}
			before, _ := real.Get(ctx, key)
			got, err := tab.changeFrom(ctx, key, tc.held, rev, tc.fn)
			if err != nil {
				t.Fatal(err)
			}
			stored, v, err := tab.fetch(ctx, key)
			if err != nil {
				t.Fatal(err)
			}
			if stored.N != tc.want || got.N != tc.want {
				t.Fatalf("stored %d, returned %d; want %d", stored.N, got.N, tc.want)
			}
			if wrote := v != before.Revision(); wrote != tc.writes {
				t.Fatalf("wrote %v, want %v", wrote, tc.writes)
			}
		})
	}
}
