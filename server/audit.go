package server

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// audit records a REST call made by the request's principal.
func (s *Server) audit(r *http.Request, outcome string, status int, err error) {
	role := ""
	if p := principalFrom(r.Context()); p != nil {
		role = p.Role
	}
	s.auditAs(r, whoFrom(r.Context()), role, outcome, status, err)
}

// whoFrom names the caller of ctx's request on the audit trail.
func whoFrom(ctx context.Context) string {
	if p := principalFrom(ctx); p != nil {
		return p.who()
	}
	return "anonymous"
}

// auditAs records a REST call made by who.
func (s *Server) auditAs(r *http.Request, who, role, outcome string, status int, err error) {
	rec := protocol.AuditRecord{Who: who, Role: role, From: clientAddr(r), Action: r.Method + " " + r.URL.Path,
		Object: objectOf(r.URL.Path), ObjectID: r.PathValue("id"), Outcome: outcome, Status: status}
	if err != nil {
		ae := asAPIError(err)
		rec.Error = &protocol.Error{Code: ae.code, Message: ae.detail}
	}
	s.record(r.Context(), rec)
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
// 1000), oldest first, optionally of one object kind.
func (s *Server) listAudit(r *http.Request) (any, error) {
	q := r.URL.Query()
	limit, after := 100, uint64(0)
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 1000 {
			return nil, invalid("query parameter limit: %q is not a number from 1 to 1000", v)
		}
		limit = n
	}
	hasAfter := q.Has("after")
	if hasAfter {
		n, err := strconv.ParseUint(q.Get("after"), 10, 64)
		if err != nil {
			return nil, invalid("query parameter after: %q is not a sequence number", q.Get("after"))
		}
		after = n
	}
	object := q.Get("object")
	st, err := s.js.Stream(r.Context(), protocol.StreamAudit)
	if err != nil {
		return nil, unavailable(err, "the audit trail cannot be read")
	}
	state := st.CachedInfo().State
	first := after + 1
	if !hasAfter && state.LastSeq >= uint64(limit) {
		first = state.LastSeq - uint64(limit) + 1
	}
	first = max(first, state.FirstSeq)
	out := []auditEntry{}
	for seq := first; seq <= state.LastSeq && len(out) < limit; seq++ {
		m, err := st.GetMsg(r.Context(), seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			return nil, unavailable(err, "the audit trail cannot be read")
		}
		var rec protocol.AuditRecord
		if protocol.Decode(m.Data, &rec) != nil || object != "" && rec.Object != object {
			continue
		}
		out = append(out, auditEntry{Seq: seq, AuditRecord: rec})
	}
	return out, nil
}
