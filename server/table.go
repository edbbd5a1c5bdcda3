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

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
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
	// applied after the initial load (outside the lock).
	onChange func(key string)
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

// writeWait bounds how long a write the bus did not answer is tried
// again: a stream with no leader, as for some seconds after a cluster node
// is lost, answers nothing until it has one.
const writeWait = 30 * time.Second

// retried runs write until the bus answers it (bus.Unanswered), for at
// most writeWait and no longer than ctx. again is true for every try after
// the first: its answer may then be about the earlier try, which the bus
// may have taken without its acknowledgement reaching the server.
//
// Under a context marked withoutWriteRetries the write is tried once: the
// caller has a retry of its own that must not wait (the folding of events,
// handed back to the bus at once: a fold that waited would hold up the
// events after it past their ack wait).
func (t *table[T]) retried(ctx context.Context, id string, write func(again bool) error) error {
	return untilAnswered(ctx, t.log.With().Str("key", id).Logger(), write)
}

// untilAnswered is retried for any write of the server's: write runs again
// while the bus does not answer, for at most writeWait, and once only
// under a context marked withoutWriteRetries.
func untilAnswered(ctx context.Context, log zerolog.Logger, write func(again bool) error) error {
	if ctx.Value(noWriteRetries{}) != nil {
		return write(false)
	}
	deadline := time.Now().Add(writeWait)
	backoff := 100 * time.Millisecond
	for again := false; ; again = true {
		err := write(again)
		if err == nil || !bus.Unanswered(err) || ctx.Err() != nil || time.Now().After(deadline) {
			return err
		}
		log.Warn().Err(err).Msg("not answered by the bus; trying again")
		select {
		case <-ctx.Done():
			return err
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

type noWriteRetries struct{}

// withoutWriteRetries marks ctx for writes tried once (retried).
func withoutWriteRetries(ctx context.Context) context.Context {
	return context.WithValue(ctx, noWriteRetries{}, true)
}

// writeBus is what a table writes through: the bus's JetStream.
type writeBus interface {
	PublishMsg(ctx context.Context, msg *nats.Msg, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error)
	Stream(ctx context.Context, name string) (jetstream.Stream, error)
	// Conn and Options make the reads that only a stream's leader answers
	// (readLeader).
	Conn() *nats.Conn
	Options() jetstream.JetStreamOptions
}

// useBus makes the table write through js, and learns whether its bucket
// is replicated (tookEarlier is for a single copy only).
func (t *table[T]) useBus(ctx context.Context, js writeBus) error {
	info, err := t.streamInfo(ctx)
	if err != nil {
		return err
	}
	t.bus, t.replicated = js, info.Config.Replicas > 1
	return nil
}

// streamInfo describes the bucket's stream, as the bus has it now.
func (t *table[T]) streamInfo(ctx context.Context) (*jetstream.StreamInfo, error) {
	st, err := t.kv.Status(ctx)
	if err != nil {
		return nil, fmt.Errorf("status of %s bucket: %w", t.kind, err)
	}
	bs, ok := st.(*jetstream.KeyValueBucketStatus)
	if !ok {
		return nil, fmt.Errorf("status of %s bucket: unexpected type %T", t.kind, st)
	}
	return bs.StreamInfo(), nil
}

// KV operations of the client's key-value buckets (a header on a delete).
const (
	kvOperationHeader = "KV-Operation"
	kvDelete          = "DEL"
	kvPurge           = "PURGE"
)

// writeKey writes b (nil with op: a delete marker) as the value of id,
// provided the key's last revision is expect (0: the key holds nothing),
// and returns the new revision. It is what the client's KeyValue
// Create/Update/Delete publish, with a message id, so that a try again
// (retried) of a write the bus took but whose answer was lost is known for
// the duplicate it is, with the revision it was given, even if another
// writer has written the key since (writeAgain). A refusal by the
// revision check is errConflict.
func (t *table[T]) writeKey(ctx context.Context, id string, b []byte, op string, expect uint64, msgID string) (uint64, error) {
	if t.bus == nil {
		return 0, fmt.Errorf("%s bucket: no bus to write through (useBus)", t.kind)
	}
	m := nats.NewMsg(protocol.KVSubject(t.kv.Bucket(), id))
	m.Data = b
	if op != "" {
		m.Header.Set(kvOperationHeader, op)
	}
	ack, err := t.bus.PublishMsg(ctx, m, jetstream.WithMsgID(msgID), jetstream.WithExpectLastSequencePerSubject(expect))
	if isWrongLastSequence(err) {
		return 0, errConflict
	}
	if err != nil {
		return 0, err
	}
	return ack.Sequence, nil
}

// neverAMsgID is a message id no write carries.
const neverAMsgID = "fm-never-a-message-id"

// tookEarlier asks the bus whether it took an earlier try of the write of
// msgID to id, whose answer was lost: a publish of the same message id
// that expects a last message id no write carries. A single copy (R1)
// checks duplicates before that expectation: it answers a duplicate with
// the revision the write was given, and refuses anything else (wrong last
// message id), writing nothing. Only for a bucket of one copy: a
// replicated stream's leader checks duplicates first and answers a try
// again itself, and checks the expected last message id only when each
// replica applies the entry, where a refusal stops the stream (nats-server
// v2.15.3), so a replicated bucket is never asked.
func (t *table[T]) tookEarlier(ctx context.Context, id, msgID string) (uint64, bool, error) {
	if t.replicated {
		return 0, false, nil
	}
	m := nats.NewMsg(protocol.KVSubject(t.kv.Bucket(), id))
	ack, err := t.bus.PublishMsg(ctx, m, jetstream.WithMsgID(msgID), jetstream.WithExpectLastMsgID(neverAMsgID))
	var apiErr *jetstream.APIError
	switch {
	case err == nil && ack.Duplicate:
		return ack.Sequence, true, nil
	case err == nil:
		// Not a duplicate, and yet taken: cannot be, the last message
		// never carries that id. Say so rather than guess.
		return 0, false, fmt.Errorf("the bus took a write that expected message id %s", neverAMsgID)
	case errors.As(err, &apiErr) && apiErr.ErrorCode == errCodeWrongLastMsgID:
		return 0, false, nil // not taken
	}
	return 0, false, err
}

// errCodeWrongLastMsgID is the refusal of a publish whose expected last
// message id is not the stream's (nats-server's JSStreamWrongLastMsgIDErrF).
const errCodeWrongLastMsgID = 10070

// writeAgain is writeKey for a try of retried: a try again refused by the
// revision check is the earlier try's, if the bus took that one.
func (t *table[T]) writeAgain(ctx context.Context, again bool, id string, b []byte, op string, expect uint64, msgID string) (uint64, error) {
	rev, err := t.writeKey(ctx, id, b, op, expect, msgID)
	if again && errors.Is(err, errConflict) {
		if seq, took, terr := t.tookEarlier(ctx, id, msgID); terr != nil {
			return 0, terr
		} else if took {
			return seq, nil
		}
	}
	return rev, err
}

func isWrongLastSequence(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// deletedAt is the revision of the delete or purge marker that is id's
// last entry, or 0 if its last entry is a value (or it has none).
func (t *table[T]) deletedAt(ctx context.Context, id string) (uint64, error) {
	st, err := t.bus.Stream(ctx, "KV_"+t.kv.Bucket())
	if err != nil {
		return 0, err
	}
	m, err := st.GetLastMsgForSubject(ctx, protocol.KVSubject(t.kv.Bucket(), id))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	if op := m.Header.Get(kvOperationHeader); op == kvDelete || op == kvPurge {
		return m.Sequence, nil
	}
	return 0, nil
}

// create stores v under id if id is free (never written, or deleted);
// errExists otherwise.
func (t *table[T]) create(ctx context.Context, id string, v T) (uint64, error) {
	rev, err := t.createUnwaited(ctx, id, v)
	if err == nil {
		t.waitRev(ctx, rev)
	}
	return rev, err
}

// createUnwaited is create without waiting for the copy to have the new
// key: for a caller whose next write to the same key waits for it.
func (t *table[T]) createUnwaited(ctx context.Context, id string, v T) (uint64, error) {
	b, err := t.marshal(id, v)
	if err != nil {
		return 0, fmt.Errorf("encode %s %s: %w", t.kind, id, err)
	}
	msgID := protocol.NewID("kv")
	var rev uint64
	err = t.retried(ctx, id, func(again bool) (err error) {
		rev, err = t.writeAgain(ctx, again, id, b, "", 0, msgID)
		if errors.Is(err, errConflict) {
			// A deleted key is free: written over its delete marker.
			var marker uint64
			if marker, err = t.deletedAt(ctx, id); err == nil {
				if marker == 0 {
					return errExists
				}
				rev, err = t.writeKey(ctx, id, b, "", marker, msgID)
			}
		}
		return err
	})
	if errors.Is(err, errConflict) || errors.Is(err, errExists) {
		return 0, errExists
	}
	if err != nil {
		return 0, fmt.Errorf("create %s %s: %w", t.kind, id, err)
	}
	return rev, nil
}

// update replaces id's value if it is still at revision rev; errConflict
// otherwise.
func (t *table[T]) update(ctx context.Context, id string, v T, rev uint64) (uint64, error) {
	b, err := t.marshal(id, v)
	if err != nil {
		return 0, fmt.Errorf("encode %s %s: %w", t.kind, id, err)
	}
	msgID := protocol.NewID("kv")
	var newRev uint64
	err = t.retried(ctx, id, func(again bool) (err error) {
		newRev, err = t.writeAgain(ctx, again, id, b, "", rev, msgID)
		return err
	})
	if errors.Is(err, errConflict) {
		return 0, errConflict
	}
	if err != nil {
		return 0, fmt.Errorf("update %s %s: %w", t.kind, id, err)
	}
	t.waitRev(ctx, newRev)
	return newRev, nil
}

// remove deletes id if it is still at revision rev; errConflict otherwise.
func (t *table[T]) remove(ctx context.Context, id string, rev uint64) error {
	msgID := protocol.NewID("kv")
	err := t.retried(ctx, id, func(again bool) error {
		_, err := t.writeAgain(ctx, again, id, nil, kvDelete, rev, msgID)
		return err
	})
	if errors.Is(err, errConflict) {
		return errConflict
	}
	if err != nil {
		return fmt.Errorf("delete %s %s: %w", t.kind, id, err)
	}
	// Wait until the key is gone from the copy.
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	for {
		ch := t.changes()
		if _, _, ok := t.get(id); !ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-ch:
		}
	}
}

// change rewrites id with a revision check, retrying on conflicts; fn
// returns false to leave it as it is.
func (t *table[T]) change(ctx context.Context, id string, fn func(*T) bool) (T, error) {
	for attempt := 0; ; attempt++ {
		v, rev, err := t.fetch(ctx, id)
		if err != nil {
			return v, err
		}
		if !fn(&v) {
			return v, nil
		}
		if _, err = t.update(ctx, id, v, rev); err == nil {
			return v, nil
		}
		if !errors.Is(err, errConflict) || attempt >= 10 {
			return v, err
		}
	}
}

// fetch reads id from the bucket itself, bypassing the copy, for decisions
// that must not act on a stale view. It asks the bucket's stream leader
// (readLeader): the client's Get is a direct get, which any replica of a
// replicated bucket may answer, and one a little behind answers with what
// was there before a write another replica of the server just made.
//
// A read the bus does not answer (a stream electing its leader after a node
// is lost) is tried again for up to writeWait, as a write is.
func (t *table[T]) fetch(ctx context.Context, id string) (T, uint64, error) {
	var v T
	var data []byte
	var rev uint64
	err := untilAnswered(ctx, t.log, func(bool) error {
		var err error
		data, rev, err = t.readLeader(ctx, id)
		return err
	})
	if err != nil {
		return v, 0, err
	}
	if err := t.unmarshal(id, data, &v); err != nil {
		return v, 0, fmt.Errorf("decode %s %s: %w", t.kind, id, err)
	}
	return v, rev, nil
}

// readLeader reads the last value of key id from the bucket's stream
// leader (the JetStream API's STREAM.MSG.GET, which only the leader
// answers), errNotFound if there is none or it was deleted.
func (t *table[T]) readLeader(ctx context.Context, id string) ([]byte, uint64, error) {
	if t.bus == nil {
		// Before useBus (tests of the copy alone): the client's Get.
		e, err := t.kv.Get(ctx, id)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			return nil, 0, errNotFound
		}
		if err != nil {
			return nil, 0, fmt.Errorf("get %s %s: %w", t.kind, id, err)
		}
		return e.Value(), e.Revision(), nil
	}
	bucket := t.kv.Bucket()
	m, err := getStoredMsg(ctx, t.bus.Conn(), t.bus.Options(), "KV_"+bucket, msgGetRequest{LastFor: protocol.KVSubject(bucket, id)})
	if errors.Is(err, errNotFound) {
		return nil, 0, errNotFound
	}
	if err != nil {
		return nil, 0, fmt.Errorf("get %s %s: %w", t.kind, id, err)
	}
	if len(m.Hdrs) > 0 {
		if h, err := nats.DecodeHeadersMsg(m.Hdrs); err == nil {
			if op := h.Get(kvOperationHeader); op == kvDelete || op == kvPurge {
				return nil, 0, errNotFound
			}
		}
	}
	return m.Data, m.Seq, nil
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
