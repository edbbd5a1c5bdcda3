package server

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// audit records a REST call made by the request's principal.
func (s *Server) audit(r *http.Request, outcome string, status int, err error) {
	s.auditAs(r, whoFrom(r.Context()), roleFrom(r.Context()), outcome, status, err)
}

// whoFrom names the caller of ctx's request on the audit trail.
func whoFrom(ctx context.Context) string {
	if p := principalFrom(ctx); p != nil {
		return p.who()
	}
	return "anonymous"
}

// roleFrom is the role of the caller of ctx's request, "" if none.
func roleFrom(ctx context.Context) string {
	if p := principalFrom(ctx); p != nil {
		return p.Role
	}
	return ""
}

// auditAs records a REST call made by who.
func (s *Server) auditAs(r *http.Request, who, role, outcome string, status int, err error) {
	rec := callRecord(r, who, role, objectOf(r.URL.Path), r.PathValue("id"))
	rec.Outcome, rec.Status = outcome, status
	if err != nil {
		ae := asAPIError(err)
		rec.Error = &protocol.Error{Code: ae.code, Message: ae.detail}
	}
	s.record(r.Context(), rec)
}

// auditOn records the request's REST call, which succeeded, once more as
// it concerns another object than its path names (each instance a
// template-wide replay started an operation on), so that the object's own
// audit trail shows it.
func (s *Server) auditOn(r *http.Request, object, objectID string) {
	rec := callRecord(r, whoFrom(r.Context()), roleFrom(r.Context()), object, objectID)
	rec.Outcome, rec.Status = "ok", http.StatusOK
	s.record(r.Context(), rec)
}

// callRecord is the audit record of the REST call r about an object.
func callRecord(r *http.Request, who, role, object, objectID string) protocol.AuditRecord {
	return protocol.AuditRecord{Who: who, Role: role, From: clientAddr(r), Action: r.Method + " " + r.URL.Path,
		Object: object, ObjectID: objectID}
}

// Audit objects of what FM does of its own accord.
const (
	auditInstances = "instances"
	auditSnapshots = "snapshots"
)

// recordByFM records what FM did of its own accord (credentials it minted or
// revoked, the snapshot scheduler, volume growth); err, if any, is why it did
// not succeed.
func (s *Server) recordByFM(ctx context.Context, action, object, objectID string, err error) {
	rec := protocol.AuditRecord{Who: "fm", Action: action, Object: object, ObjectID: objectID, Outcome: "ok"}
	if err != nil {
		ae := asAPIError(err)
		rec.Outcome, rec.Error = "failed", &protocol.Error{Code: ae.code, Message: ae.detail}
	}
	s.record(ctx, rec)
}

// objectOf is the kind of object a path is about: its first segment after
// the tenant prefix ("instances", "api-keys", …).
func objectOf(path string) string {
	rest, ok := strings.CutPrefix(path, api.BasePath)
	if !ok {
		return "server"
	}
	parts := strings.Split(rest, "/")
	if len(parts) < 2 || !protocol.ValidToken(parts[1]) {
		return "tenant"
	}
	return parts[1]
}

// record publishes an audit record, tried again with the same message id
// (the bus drops a repeat) while the bus does not answer, for at most
// writeWait: a stream electing a leader after a cluster node is lost takes
// seconds, and the record must outlive them. One that still cannot be
// published is logged as an error: the action it describes is already done.
func (s *Server) record(ctx context.Context, rec protocol.AuditRecord) {
	rec.ID, rec.Time = protocol.NewID("au"), time.Now().UTC()
	if rec.CallID == "" {
		rec.CallID = callIDFrom(ctx)
	}
	if rec.Tenant == "" {
		rec.Tenant = api.DefaultTenant
	}
	data, err := protocol.Encode(&rec)
	if err != nil {
		s.log.Error().Err(err).Str("action", rec.Action).Msg("audit record not encoded")
		return
	}
	ctx = context.WithoutCancel(ctx)
	deadline := time.Now().Add(writeWait)
	for backoff := 100 * time.Millisecond; ; backoff = min(2*backoff, 2*time.Second) {
		try, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := s.js.Publish(try, protocol.AuditSubject(rec.Tenant, rec.Object), data, jetstream.WithMsgID(rec.ID))
		cancel()
		if err == nil {
			return
		}
		if !bus.Unanswered(err) || time.Now().After(deadline) {
			s.log.Error().Err(err).Str("action", rec.Action).Str("who", rec.Who).Msg("audit record not stored")
			return
		}
		s.log.Warn().Err(err).Str("action", rec.Action).Msg("audit record not answered by the bus; trying again")
		time.Sleep(backoff)
	}
}

// auditEntry is an audit record with its place in FM_AUDIT.
type auditEntry struct {
	Seq uint64 `json:"seq"`
	protocol.AuditRecord
}

// listAudit serves GET /audit (FM; admin): the records after sequence
// `after` (default: the last `limit`), at most `limit` (default 100, at most
// 1000), oldest first, optionally of one object kind (object), of one
// actor (who: "key:<id>", "sso:<user>", "fm") and stored from a time on
// (since, RFC 3339). The reading starts at the first record of since; the actor
// is checked record by record (a rare actor's last records are looked for
// back to the trail's start, or since).
//
// The records are read through a consumer of FM_AUDIT filtered by the
// object's subject, in batches: the bus skips other objects' records, and a
// list costs a few requests, not one per record.
func (s *Server) listAudit(r *http.Request) (any, error) {
	q := r.URL.Query()
	limit, after := 100, uint64(0)
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > maxAuditList {
			return nil, invalid("query parameter limit: %q is not a number from 1 to %d", v, maxAuditList)
		}
		limit = n
	}
	hasAfter := q.Has("after")
	if hasAfter {
		n, err := strconv.ParseUint(q.Get("after"), 10, 64)
		if err != nil || n == math.MaxUint64 {
			return nil, invalid("query parameter after: %q is not a sequence number", q.Get("after"))
		}
		after = n
	}
	filter := protocol.SubjectAllAudit
	object := q.Get("object")
	if object != "" {
		if !protocol.ValidToken(object) {
			return nil, invalid("query parameter object: %q is not a kind of object (instances, api-keys, …)", object)
		}
		filter = protocol.AuditSubject("*", object)
	}
	who := q.Get("who")
	var since time.Time
	if v := q.Get("since"); v != "" {
		t, err := time.Parse(time.RFC3339, v)
		if err != nil {
			return nil, invalid("query parameter since: %q is not a time (RFC 3339)", v)
		}
		since = t
	}
	// since is the bus's time a record was stored at (where the reading
	// starts, below), not the time the record says: one clock decides.
	keep := func(rec *protocol.AuditRecord) bool {
		return (object == "" || rec.Object == object) && (who == "" || rec.Who == who)
	}
	ctx := r.Context()
	st, err := s.js.Stream(ctx, protocol.StreamAudit)
	if err != nil {
		return nil, unavailable(err, "the audit trail cannot be read")
	}
	state := st.CachedInfo().State
	first := state.FirstSeq
	if !since.IsZero() {
		// Read from the first record of then on, not back to the start.
		seq, found, err := auditSeqSince(ctx, st, filter, since)
		if err != nil {
			return nil, unavailable(err, "the audit trail cannot be read")
		}
		if !found {
			return []auditEntry{}, nil
		}
		first = max(first, seq)
	}
	var out []auditEntry
	switch {
	case hasAfter:
		out, err = readAudit(ctx, st, filter, keep, max(after+1, first), state.LastSeq, limit)
	default:
		out, err = lastAudit(ctx, st, filter, keep, first, state.LastSeq, limit)
	}
	if err != nil {
		return nil, unavailable(err, "the audit trail cannot be read")
	}
	if out == nil {
		out = []auditEntry{}
	}
	return out, nil
}

// lastAudit reads the last limit records of filter among sequences first to
// last: windows of the stream read backwards, each four times the one
// before, until limit records are found or the stream's start is reached.
func lastAudit(ctx context.Context, st jetstream.Stream, filter string, keep func(*protocol.AuditRecord) bool, first, last uint64, limit int) ([]auditEntry, error) {
	var out []auditEntry
	hi := last
	for window := uint64(limit); hi >= first && hi > 0 && len(out) < limit; window *= 4 {
		lo := first
		if hi-first >= window {
			lo = hi - window + 1
		}
		got, err := readAudit(ctx, st, filter, keep, lo, hi, 0)
		if err != nil {
			return nil, err
		}
		out = append(got, out...)
		if lo == first {
			break
		}
		hi = lo - 1
	}
	if len(out) > limit {
		out = out[len(out)-limit:]
	}
	return out, nil
}

// auditSeqSince is the sequence of the first record of filter at or after
// since: the first a consumer starting then delivers.
func auditSeqSince(ctx context.Context, st jetstream.Stream, filter string, since time.Time) (uint64, bool, error) {
	cons, err := st.CreateConsumer(ctx, jetstream.ConsumerConfig{
		FilterSubject: filter, DeliverPolicy: jetstream.DeliverByStartTimePolicy, OptStartTime: &since,
		AckPolicy: jetstream.AckNonePolicy, MemoryStorage: true, Replicas: 1, InactiveThreshold: time.Minute,
	})
	if err != nil {
		return 0, false, err
	}
	defer func() {
		del, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = st.DeleteConsumer(del, cons.CachedInfo().Name)
	}()
	if cons.CachedInfo().NumPending == 0 {
		return 0, false, nil
	}
	fetchCtx, cancel := context.WithTimeout(ctx, auditFetchWait)
	defer cancel()
	batch, err := cons.Fetch(1, jetstream.FetchContext(fetchCtx))
	if err != nil {
		return 0, false, err
	}
	if m, ok := <-batch.Messages(); ok {
		md, err := m.Metadata()
		if err != nil {
			return 0, false, err
		}
		return md.Sequence.Stream, true, nil
	}
	if err := batch.Error(); err != nil {
		return 0, false, err
	}
	return 0, false, errors.New("the first record since the time asked was not delivered")
}

// auditBatch is how many records a read asks the bus for at a time.
const auditBatch = 256

// readAudit reads the records of filter from sequence from to sequence to
// (included), at most limit of them (0: all, of which it keeps the last
// 1000, the most a list gives), oldest first, through an ephemeral consumer
// it deletes after.
func readAudit(ctx context.Context, st jetstream.Stream, filter string, keep func(*protocol.AuditRecord) bool, from, to uint64, limit int) ([]auditEntry, error) {
	if from > to {
		return nil, nil
	}
	cons, err := st.CreateConsumer(ctx, jetstream.ConsumerConfig{
		FilterSubject: filter, DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: from,
		AckPolicy: jetstream.AckNonePolicy, MemoryStorage: true, Replicas: 1, InactiveThreshold: time.Minute,
	})
	if err != nil {
		return nil, err
	}
	defer func() {
		del, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = st.DeleteConsumer(del, cons.CachedInfo().Name) // else gone a minute after its last use
	}()
	// The consumer counts what it has still to deliver: a fetch asks for
	// no more than that, so that it never waits for records that do not
	// exist, and one that brings fewer is the bus failing, not the end.
	pending := cons.CachedInfo().NumPending
	var out []auditEntry
	for pending > 0 {
		want := int(min(pending, auditBatch))
		got, err := func() (int, error) {
			fetchCtx, cancel := context.WithTimeout(ctx, auditFetchWait)
			defer cancel()
			batch, err := cons.Fetch(want, jetstream.FetchContext(fetchCtx))
			if err != nil {
				return 0, err
			}
			got := 0
			for m := range batch.Messages() {
				got++
				md, err := m.Metadata()
				if err != nil {
					return got, err
				}
				pending = md.NumPending
				seq := md.Sequence.Stream
				if seq > to {
					pending = 0 // past the window; the rest of the batch is drained
					continue
				}
				var rec protocol.AuditRecord
				if protocol.Decode(m.Data(), &rec) != nil || !keep(&rec) {
					continue
				}
				out = append(out, auditEntry{Seq: seq, AuditRecord: rec})
				if limit == 0 && len(out) > 2*maxAuditList {
					out = slices.Delete(out, 0, len(out)-maxAuditList)
				}
			}
			if err := batch.Error(); err != nil && !errors.Is(err, nats.ErrTimeout) && !errors.Is(err, context.DeadlineExceeded) {
				return got, err
			}
			return got, nil
		}()
		if err != nil {
			return nil, err
		}
		if limit > 0 && len(out) >= limit {
			return out[:limit], nil
		}
		if got < want && pending > 0 {
			// Records may have aged out since the count (the trail's
			// max age): the consumer says what is left.
			info, err := cons.Info(ctx)
			if err != nil {
				return nil, err
			}
			if pending = info.NumPending; pending > 0 {
				return nil, fmt.Errorf("the audit trail's consumer delivered %d of %d records in %v", got, want, auditFetchWait)
			}
		}
	}
	return out, nil
}

// auditFetchWait bounds one fetch of the audit trail: records that exist,
// which a slow bus may take seconds to deliver.
const auditFetchWait = 10 * time.Second

// maxAuditList is the most records one list gives.
const maxAuditList = 1000
