package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// Errors a table returns for callers to branch on.
var (
	// errRewatch ends a watcher asked to start again (rewatch).
	errRewatch  = errors.New("watcher asked to start again")
	errExists   = errors.New("key exists")
	errConflict = errors.New("revision conflict")
	errNotFound = errors.New("key not found")
)

// table is one key-value bucket of JSON documents of type T, with an
// in-memory copy kept current by a watcher, so that lists and look-ups do not
// cost a bus round trip each. Writes go to the bucket with a revision check
// (compare-and-set) and then wait until the copy has caught up, so that a
// caller reads its own writes.
//
// Values handed out are shallow copies: a caller may set their scalar fields
// but must not modify their maps or slices.
type table[T any] struct {
	kv jetstream.KeyValue
	// bus makes the writes (writeKey): a KV write published with a message
	// id, so that a try again of one the bus took is answered as the
	// duplicate it is.
	bus        writeBus
	replicated bool // the bucket has more than one copy (useBus)
	kind       string
	log        zerolog.Logger
	// decode reads the document of a key (json.Unmarshal unless set);
	// encode writes one (json.Marshal unless set).
	decode func(key string, b []byte, v *T) error
	encode func(key string, v T) ([]byte, error)

	// onChange, if set before run, is called with the key of every change
	// applied after the initial load (outside the lock); onRemove, with
	// the value a key held, when an update removes it.
	onChange func(key string)
	onRemove func(key string, old T)
	// groupsOf, if set before run, groups the values (join tokens by
	// instance), so that rowsOf finds a group's rows without a look at
	// every row. A value may be in several groups.
	groupsOf func(v T) []string
	groups   map[string]map[string]bool // group -> keys

	mu    sync.RWMutex
	items map[string]row[T]
	// keys are the keys of items in order, kept until the set of keys
	// changes (nil then), so that a list of a big bucket does not sort it.
	keys    []string
	keysGen uint64        // counts the changes of the set of keys
	rev     uint64        // highest revision applied to items
	gen     uint64        // counts the changes applied to items (generation)
	synced  bool          // the initial snapshot has been applied
	changed chan struct{} // closed and replaced after every applied change
	// rewatching asks the watcher to start again (rewatch).
	rewatching chan struct{}
	// lastRewatch is when a lagging copy last restarted its watcher, and
	// loading whether a watcher's initial snapshot is being read
	// (rewatchStale).
	lastRewatch time.Time
	loading     bool
	loads       int // initial snapshots applied (tests)
	// created is when the bucket's stream was made, as the leader said at
	// the last load: another time means the bucket was made again, and its
	// revisions started over (resumed).
	created time.Time
}

type row[T any] struct {
	val T
	rev uint64
}

func newTable[T any](kv jetstream.KeyValue, kind string, log zerolog.Logger) *table[T] {
	return &table[T]{
		kv: kv, kind: kind,
		log:        log.With().Str("bucket", kv.Bucket()).Logger(),
		items:      map[string]row[T]{},
		changed:    make(chan struct{}),
		rewatching: make(chan struct{}, 1),
	}
}

// rewatchStale is rewatch for a copy found lagging (waitRev), at most once
// in staleRewatchEvery, and not while a snapshot loads: a busy watcher, or
// one loading a big bucket, is not made to start over and over.
func (t *table[T]) rewatchStale() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.synced || time.Since(t.lastRewatch) < staleRewatchEvery || t.loading {
		return false
	}
	t.lastRewatch = time.Now()
	t.rewatch()
	return true
}

// staleRewatchEvery bounds how often a lagging copy restarts its watcher.
const staleRewatchEvery = 10 * time.Second

// rewatch makes the watcher start again at once, with a new consumer and
// a new initial snapshot. The client's watcher (an ordered consumer) finds
// out that its consumer went with a bus node only after two missed idle
// heartbeats (10 s), and meanwhile the copy stands still: rewatch is
// called when a write is not seen in the copy in time, and when the
// connection comes back after a loss.
func (t *table[T]) rewatch() {
	select {
	case t.rewatching <- struct{}{}:
	default:
	}
}

// run keeps the copy current until ctx ends. A watcher that stops (the
// connection was closed or the consumer lost) is started again, and its
// initial snapshot replaces the copy, so deletions missed meanwhile are seen.
func (t *table[T]) run(ctx context.Context) {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := t.watchOnce(ctx)
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, errRewatch) {
			t.log.Info().Msg("bucket watcher restarted")
			backoff = 100 * time.Millisecond
			continue
		}
		t.log.Warn().Err(err).Dur("retry_in", backoff).Msg("bucket watcher stopped; restarting")
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

func (t *table[T]) watchOnce(ctx context.Context) error {
	w, err := t.kv.WatchAll(ctx)
	if err != nil {
		return fmt.Errorf("watch: %w", err)
	}
	t.mu.Lock()
	t.loading = true
	// What the copy holds is the bucket up to revision floor: a watcher
	// started again brings nothing older (resumeCopy).
	floor, resumed := t.rev, t.synced
	t.mu.Unlock()
	defer func() {
		_ = w.Stop()
		t.mu.Lock()
		t.loading = false
		t.mu.Unlock()
	}()
	snapshot := map[string]row[T]{}
	deleted := map[string]uint64{} // keys whose entry in the snapshot is a delete marker
	var snapRev uint64
	inSnapshot := true
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.rewatching:
			return errRewatch
		case e, ok := <-w.Updates():
			if !ok {
				return errors.New("watcher closed")
			}
			if e == nil { // end of the initial values
				rev := max(floor, snapRev)
				var reset bool
				if resumed {
					// Only this goroutine writes the copy: it reads it
					// without the lock while it asks the bus.
					snapshot, reset = t.resumed(ctx, floor, snapshot, deleted, snapRev)
					if reset {
						floor, rev = 0, snapRev
					}
				} else if info, err := t.streamInfo(ctx); err == nil {
					t.created = info.Created
				} else {
					t.log.Warn().Err(err).Msg("the bucket's creation time is unknown: a bucket made again will be told by its revisions only")
				}
				t.mu.Lock()
				// A snapshot that replaces a copy (the watcher started
				// again) may hold changes no update reported: they are
				// reported now, as updates would have been (every key,
				// after a reset: revisions of two buckets say nothing).
				var changed []string
				if t.synced && t.onChange != nil {
					if reset {
						changed = append(slices.Collect(maps.Keys(t.items)), slices.Collect(maps.Keys(snapshot))...)
					} else {
						changed = changedKeys(t.items, snapshot)
					}
				}
				t.items, t.keys = snapshot, nil
				t.keysGen++
				t.regroupLocked()
				t.rev = rev
				t.loads++
				t.synced, t.loading = true, false
				t.notifyLocked()
				t.mu.Unlock()
				for _, k := range changed {
					t.onChange(k)
				}
				inSnapshot = false
				continue
			}
			if inSnapshot {
				t.apply(snapshot, e)
				if e.Operation() == jetstream.KeyValuePut {
					delete(deleted, e.Key())
				} else {
					deleted[e.Key()] = e.Revision()
				}
				snapRev = max(snapRev, e.Revision())
				continue
			}
			if e.Revision() <= floor {
				continue // in the copy already: the node serving the watcher catches up
			}
			t.mu.Lock()
			before, had := t.items[e.Key()]
			t.apply(t.items, e)
			after, has := t.items[e.Key()]
			if has != had {
				t.keys = nil
				t.keysGen++
			}
			t.ungroupLocked(e.Key(), before, had)
			t.groupLocked(e.Key(), after, has)
			t.rev = max(t.rev, e.Revision())
			t.notifyLocked()
			t.mu.Unlock()
			if had && !has && t.onRemove != nil {
				t.onRemove(e.Key(), before.val)
			}
			if t.onChange != nil {
				t.onChange(e.Key())
			}
		}
	}
}

func (t *table[T]) apply(into map[string]row[T], e jetstream.KeyValueEntry) {
	if e.Operation() != jetstream.KeyValuePut {
		delete(into, e.Key())
		return
	}
	var v T
	if err := t.unmarshal(e.Key(), e.Value(), &v); err != nil {
		// A document FM cannot read is left in the bucket for an operator to
		// inspect (nats kv get) rather than dropped.
		t.log.Error().Err(err).Str("key", e.Key()).Uint64("revision", e.Revision()).Msg("unreadable document skipped")
		return
	}
	into[e.Key()] = row[T]{val: v, rev: e.Revision()}
}

func (t *table[T]) notifyLocked() {
	t.gen++
	close(t.changed)
	t.changed = make(chan struct{})
}

// generation counts the changes applied to the copy: the same number
// twice means the same copy (what was made of it may be reused). Read
// before the copy is.
func (t *table[T]) generation() uint64 {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.gen
}

// waitSynced blocks until the initial snapshot is loaded.
func (t *table[T]) waitSynced(ctx context.Context) error {
	for {
		t.mu.RLock()
		synced, ch := t.synced, t.changed
		t.mu.RUnlock()
		if synced {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("load %s bucket: %w", t.kind, ctx.Err())
		case <-ch:
		}
	}
}

// waitRev blocks until the copy has applied revision rev, for at most a few
// seconds: past that the write is done anyway and only the copy lags.
func (t *table[T]) waitRev(ctx context.Context, rev uint64) {
	timer := time.NewTimer(5 * time.Second)
	defer timer.Stop()
	for {
		t.mu.RLock()
		cur, ch := t.rev, t.changed
		t.mu.RUnlock()
		if cur >= rev {
			return
		}
		select {
		case <-ctx.Done():
			return // the caller gave up: nothing is known to lag
		case <-timer.C:
			if t.rewatchStale() {
				t.log.Warn().Uint64("revision", rev).Msg("local copy lags behind a write; its watcher starts again")
			} else {
				t.log.Warn().Uint64("revision", rev).Msg("local copy lags behind a write")
			}
			return
		case <-ch:
		}
	}
}

// getOrFetch returns the value of id and its revision from the copy, or
// from the bucket itself (fetch) when the copy has none: a write made
// through another server replica, or one the copy has not seen yet (it
// lags while its watcher starts again), is found all the same. Only a key
// missing from the bucket too is errNotFound.
func (t *table[T]) getOrFetch(ctx context.Context, id string) (T, uint64, error) {
	if v, rev, ok := t.get(id); ok {
		return v, rev, nil
	}
	return t.fetch(ctx, id)
}

// get returns the value of id and its revision.
func (t *table[T]) get(id string) (T, uint64, bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	r, ok := t.items[id]
	return r.val, r.rev, ok
}

// list returns every value, ordered by key.
func (t *table[T]) list() []T {
	rows := t.rows()
	out := make([]T, len(rows))
	for i, r := range rows {
		out[i] = r.val
	}
	return out
}

// keyedRow is a value with its key and revision.
type keyedRow[T any] struct {
	key string
	val T
	rev uint64
}

// rows returns every value with its key and revision, ordered by key.
func (t *table[T]) rows() []keyedRow[T] {
	keys := t.sortedKeys()
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := make([]keyedRow[T], 0, len(keys))
	for _, k := range keys {
		// A key removed since the keys were read is skipped; one added is
		// in the next list.
		if r, ok := t.items[k]; ok {
			out = append(out, keyedRow[T]{key: k, val: r.val, rev: r.rev})
		}
	}
	return out
}

// rowsOf returns the rows of a group (groupsOf), in no order.
func (t *table[T]) rowsOf(group string) []keyedRow[T] {
	t.mu.RLock()
	defer t.mu.RUnlock()
	var out []keyedRow[T]
	for k := range t.groups[group] {
		if r, ok := t.items[k]; ok {
			out = append(out, keyedRow[T]{key: k, val: r.val, rev: r.rev})
		}
	}
	return out
}

// regroupLocked makes the groups of every row; t.mu is held.
func (t *table[T]) regroupLocked() {
	if t.groupsOf == nil {
		return
	}
	t.groups = map[string]map[string]bool{}
	for k, r := range t.items {
		t.groupLocked(k, r, true)
	}
}

func (t *table[T]) groupLocked(key string, r row[T], present bool) {
	if t.groupsOf == nil || !present {
		return
	}
	if t.groups == nil {
		t.groups = map[string]map[string]bool{}
	}
	for _, g := range t.groupsOf(r.val) {
		if t.groups[g] == nil {
			t.groups[g] = map[string]bool{}
		}
		t.groups[g][key] = true
	}
}

func (t *table[T]) ungroupLocked(key string, r row[T], present bool) {
	if t.groupsOf == nil || !present {
		return
	}
	for _, g := range t.groupsOf(r.val) {
		delete(t.groups[g], key)
		if len(t.groups[g]) == 0 {
			delete(t.groups, g)
		}
	}
}

// sortedKeys returns the keys in order: those kept since the set of keys
// last changed, or sorted anew. The slice is shared: never modified.
func (t *table[T]) sortedKeys() []string {
	t.mu.RLock()
	keys, gen := t.keys, t.keysGen
	kept := keys != nil
	if !kept {
		keys = slices.Collect(maps.Keys(t.items))
	}
	t.mu.RUnlock()
	if !kept {
		// Sorted outside the lock: look-ups and the watcher go on.
		slices.Sort(keys)
		t.mu.Lock()
		if t.keysGen == gen {
			t.keys = keys
		}
		t.mu.Unlock()
	}
	return keys
}

// changes returns a channel closed at the next applied change.
func (t *table[T]) changes() <-chan struct{} {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.changed
}

func (t *table[T]) marshal(key string, v T) ([]byte, error) {
	if t.encode != nil {
		return t.encode(key, v)
	}
	return json.Marshal(v)
}

// sealFields makes the table store the fields secrets names (by field
// name) sealed with box, each bound to its bucket, key and field, and open
// them when it reads: a sealed value moved to another key or field does not
// open. A field found in clear (written before the server sealed it) is
// read as it is, and sealed at the next write, as is one sealed before
// values were bound.
func sealFields[T any](t *table[T], box *seal.Box, secrets func(*T) map[string]*string) {
	place := func(key, field string) string { return t.kv.Bucket() + "/" + key + "/" + field }
	t.encode = func(key string, v T) ([]byte, error) {
		// Sealed in a copy of its own: v's pointers (a settings document's
		// sections) are the caller's, who goes on with the clear values.
		b, err := json.Marshal(v)
		if err != nil {
			return nil, err
		}
		var own T
		if err := json.Unmarshal(b, &own); err != nil {
			return nil, err
		}
		for name, f := range secrets(&own) {
			*f = box.Seal(*f, place(key, name))
		}
		return json.Marshal(own)
	}
	t.decode = func(key string, b []byte, v *T) error {
		if err := json.Unmarshal(b, v); err != nil {
			return err
		}
		for name, f := range secrets(v) {
			plain, err := box.Open(*f, place(key, name))
			if errors.Is(err, seal.ErrNotSealed) {
				continue
			}
			if err != nil {
				return err
			}
			*f = plain
		}
		return nil
	}
}

func (t *table[T]) unmarshal(key string, b []byte, v *T) error {
	if t.decode != nil {
		return t.decode(key, b, v)
	}
	return json.Unmarshal(b, v)
}

// newMessageTable is a table of protocol messages, decoded (version checked)
// with protocol.Decode.
func newMessageTable[T any, PT interface {
	*T
	protocol.Message
}](kv jetstream.KeyValue, kind string, log zerolog.Logger) *table[T] {
	t := newTable[T](kv, kind, log)
	t.decode = func(_ string, b []byte, v *T) error { return protocol.Decode(b, PT(v)) }
	return t
}

func isRevisionMismatch(err error) bool {
	return errors.Is(err, jetstream.ErrKeyRevisionMismatch) || errors.Is(err, jetstream.ErrKeyExists)
}

// sync waits until the copy holds every write the bucket had acknowledged
// when sync was called, for decisions (is this object in use?) that must not
// miss a write made through another server replica.
func (t *table[T]) sync(ctx context.Context) error {
	info, err := t.streamInfo(ctx)
	if err != nil {
		return err
	}
	t.waitRev(ctx, info.State.LastSeq)
	return nil
}

// size is the number of values in the copy.
func (t *table[T]) size() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return len(t.items)
}

// filter returns the values keep accepts, ordered by key.
func (t *table[T]) filter(keep func(T) bool) []T {
	var out []T
	for _, r := range t.rows() {
		if keep(r.val) {
			out = append(out, r.val)
		}
	}
	if out == nil {
		out = []T{}
	}
	return out
}
