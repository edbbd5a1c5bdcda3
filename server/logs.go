package server

import (
	"errors"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/fleetmanager/fm/protocol"
)

// logsAnswer is GET /instances/{id}/logs (FM's own): what the instance's
// agent shipped to FM_LOGS, oldest first, and the sequence to ask after
// next (next; the last one read, or the one asked after if none).
type logsAnswer struct {
	Entries []logEntry `json:"entries"`
	Next    uint64     `json:"next"`
}

type logEntry struct {
	Seq    uint64    `json:"seq"`
	Time   time.Time `json:"time"`
	Source string    `json:"source"`
	Text   string    `json:"text"`
}

// Bounds of a logs call: each entry is one message of at most 64 KiB.
const (
	defaultLogEntries = 100
	maxLogEntries     = 1000
	defaultLogsSince  = 10 * time.Minute
)

// instanceLogs serves GET /instances/{id}/logs?source=agent|dss&after=SEQ
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
		if err != nil {
			return nil, invalid("query parameter after: %q is not a sequence number", q.Get("after"))
		}
		after, req.Seq = n, n+1
	default:
		since := time.Now().Add(-defaultLogsSince)
		if v := q.Get("since"); v != "" {
			if d, err := time.ParseDuration(v); err == nil && d > 0 {
				since = time.Now().Add(-d)
			} else if t, err := time.Parse(time.RFC3339, v); err == nil {
				since = t
			} else {
				return nil, invalid("query parameter since: %q is neither a time (RFC 3339) nor a duration (10m)", v)
			}
		}
		req.StartTime = &since
	}
	answer := logsAnswer{Entries: []logEntry{}, Next: after}
	for len(answer.Entries) < limit {
		m, err := getStoredMsg(r.Context(), s.cfg.Conn, s.js.Options(), protocol.StreamLogs, req)
		if errors.Is(err, errNotFound) {
			break
		}
		if err != nil {
			return nil, unavailable(err, "the instance's logs could not be read")
		}
		answer.Entries = append(answer.Entries, logEntry{Seq: m.Seq, Time: m.Time,
			Source: m.Subject[strings.LastIndexByte(m.Subject, '.')+1:], Text: string(m.Data)})
		answer.Next = m.Seq
		req = msgGetRequest{Seq: m.Seq + 1, NextFor: subject}
	}
	return answer, nil
}
