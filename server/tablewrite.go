package server

// The writes of a table, and its reads from the bucket itself (table.go
// keeps the copy they are seen in).

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

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

// changeFrom is change for a caller that holds id's value as it wrote it,
// at revision rev: fn is applied to a shallow copy of held and written at
// rev without a read, and only if another write came in between (the
// revision check refuses it) is the value read back and changed as change
// does. held itself is returned if fn leaves it as it is.
func (t *table[T]) changeFrom(ctx context.Context, id string, held T, rev uint64, fn func(*T) bool) (T, error) {
	v := held
	if !fn(&v) {
		return held, nil
	}
	_, err := t.update(ctx, id, v, rev)
	if err == nil {
		return v, nil
	}
	if !errors.Is(err, errConflict) {
		return held, err
	}
	return t.change(ctx, id, fn)
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
