package server

import (
	"context"
	"errors"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

// Bounds of a logs call. An agent may fill its subjects with large
// messages (up to 128 KiB each) of escapes that JSON makes six times
// longer: a page stops at maxLogPageBytes of text (after one entry at
// least), and a call at logsCallTime.
const (
	defaultLogEntries = 100
	maxLogEntries     = 1000
	maxLogPageBytes   = 4 << 20
	defaultLogsSince  = 10 * time.Minute
	logsCallTime      = 10 * time.Second
)

// instanceLogs serves GET /instances/{id}/logs?source=agent|dss&after=SEQ
// (api.Logs)
// &since=T&limit=N: the messages after sequence after, or from since (a
// time, RFC 3339, or a duration before now: 10m), by default the last ten
// minutes; at most limit (100, at most 1000). Operator: DSS's logs may
// hold what a viewer should not read.
func (s *Server) instanceLogs(r *http.Request) (any, error) {
	id := r.PathValue("id")
	if _, ok := s.st.instances.view(id); !ok {
		return nil, notFound(kindInstance, id)
	}
	q := r.URL.Query()
	subject := protocol.LogSubject(id, "*")
	if src := q.Get("source"); src != "" {
		if !slices.Contains(protocol.LogSources, src) {
			return nil, invalid("query parameter source: %q is not one of %s", src, strings.Join(protocol.LogSources, ", "))
		}
		subject = protocol.LogSubject(id, src)
	}
	limit := defaultLogEntries
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > maxLogEntries {
			return nil, invalid("query parameter limit: %q is not a number from 1 to %d", v, maxLogEntries)
		}
		limit = n
	}
	req := msgGetRequest{NextFor: subject}
	var after uint64
	switch {
	case q.Has("after") && q.Has("since"):
		return nil, invalid("query parameters after and since: give one")
	case q.Has("after"):
		n, err := strconv.ParseUint(q.Get("after"), 10, 64)
		if err != nil || n == math.MaxUint64 {
			return nil, invalid("query parameter after: %q is not a sequence number", q.Get("after"))
		}
		after, req.Seq = n, n+1
	default:
		since := time.Now().Add(-defaultLogsSince)
		if v := q.Get("since"); v != "" {
			if d, err := time.ParseDuration(v); err == nil && d >= 0 {
				since = time.Now().Add(-d)
			} else if t, err := time.Parse(time.RFC3339, v); err == nil {
				since = t
			} else {
				return nil, invalid("query parameter since: %q is neither a time (RFC 3339) nor a duration (10m)", v)
			}
		}
		req.StartTime = &since
		// Where the stream stands now: read on from there if nothing is
		// found (what comes after has a later sequence).
		st, err := s.js.Stream(r.Context(), protocol.StreamLogs)
		if err != nil {
			return nil, unavailable(err, "the instance's logs could not be read")
		}
		after = st.CachedInfo().State.LastSeq
	}
	ctx, cancel := context.WithTimeout(r.Context(), logsCallTime)
	defer cancel()
	answer := api.Logs{Entries: []api.LogEntry{}, Next: after}
	size := 0
	for {
		if len(answer.Entries) == limit || size >= maxLogPageBytes || ctx.Err() != nil {
			answer.More = true
			break
		}
		m, err := getStoredMsg(ctx, s.cfg.Conn, s.js.Options(), protocol.StreamLogs, req)
		if errors.Is(err, errNotFound) {
			break
		}
		if err != nil {
			if len(answer.Entries) > 0 {
				answer.More = true // what was read, and where to read on
				break
			}
			return nil, unavailable(err, "the instance's logs could not be read")
		}
		answer.Entries = append(answer.Entries, api.LogEntry{Seq: m.Seq, Time: m.Time,
			Source: m.Subject[strings.LastIndexByte(m.Subject, '.')+1:], Text: string(m.Data)})
		answer.Next = m.Seq
		size += len(m.Data)
		req = msgGetRequest{Seq: m.Seq + 1, NextFor: subject}
	}
	return answer, nil
}
