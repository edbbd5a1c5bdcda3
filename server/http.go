package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"path"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
	"github.com/rs/zerolog"
)

// maxBody bounds a request body.
const maxBody = 1 << 20

// handlerFunc serves one method of one route. The value it returns is sent as
// JSON with status 200; an error is sent as the contract's error body.
type handlerFunc func(r *http.Request) (any, error)

// endpoint is one method of one route: the least role it needs, whether it
// is recorded in the audit trail, and its handler.
type endpoint struct {
	role  string
	audit bool
	fn    handlerFunc
}

// reads is an endpoint that changes nothing.
func reads(role string, fn handlerFunc) endpoint { return endpoint{role: role, fn: fn} }

// writes is an endpoint that changes something, or hands out a secret: it
// is audited.
func writes(role string, fn handlerFunc) endpoint { return endpoint{role: role, audit: true, fn: fn} }

// methods routes one path by HTTP method. ServeMux's own method matching
// answers a wrong method with a plain-text 405; this answers with the JSON
// error body every client of the contract expects.
type methods map[string]endpoint

// routeHandler is a route bound to its server.
type routeHandler struct {
	s       *Server
	methods methods
	tenant  bool // the pattern has a {tenant} segment
}

func (h routeHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if h.tenant {
		if t := r.PathValue("tenant"); t != api.DefaultTenant {
			h.s.writeError(w, r, newAPIError(protocol.CodeNotFound, "Unknown tenant",
				"tenant %q does not exist; this Fleet Manager has only the tenant %q", t, api.DefaultTenant))
			return
		}
	}
	ep, ok := h.methods[r.Method]
	if !ok {
		allowed := make([]string, 0, len(h.methods))
		for m := range h.methods {
			allowed = append(allowed, m)
		}
		sort.Strings(allowed)
		h.s.writeError(w, r, methodNotAllowed(w, r, allowed...))
		return
	}
	if p := principalFrom(r.Context()); p != nil && !p.may(ep.role) {
		err := newAPIError(protocol.CodePermissionDenied, "Permission denied",
			"%s %s needs the %s role; %s has the %s role", r.Method, r.URL.Path, ep.role, p.who(), p.Role)
		h.s.audit(r, "refused", http.StatusForbidden, err)
		h.s.writeError(w, r, err)
		return
	}
	v, err := ep.fn(r)
	if err != nil {
		if ep.audit {
			h.s.audit(r, "failed", httpStatus(asAPIError(err).code), err)
		}
		h.s.writeError(w, r, err)
		return
	}
	if ep.audit {
		h.s.audit(r, "ok", http.StatusOK, nil)
	}
	if d, ok := v.(*fileDownload); ok {
		h.s.sendFile(w, r, d)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// fileDownload is a handler's answer sent as a file rather than JSON (a
// diagnosis bundle): streamed, and closed once sent.
type fileDownload struct {
	name, contentType string
	size              int64
	body              io.ReadCloser
}

func (s *Server) sendFile(w http.ResponseWriter, r *http.Request, d *fileDownload) {
	defer d.body.Close()
	w.Header().Set("Content-Type", d.contentType)
	w.Header().Set("Content-Length", strconv.FormatInt(d.size, 10))
	w.Header().Set("Content-Disposition", mime.FormatMediaType("attachment", map[string]string{"filename": d.name}))
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(http.StatusOK)
	if n, err := io.Copy(w, d.body); err != nil {
		// The status is sent: the client sees a body shorter than
		// Content-Length.
		s.log.Warn().Err(err).Int64("sent", n).Int64("size", d.size).Str("path", r.URL.Path).
			Str("call_id", callIDFrom(r.Context())).Msg("download cut short")
	}
}

// methodNotAllowed is the answer to a method the path does not serve; it
// sets the Allow header.
func methodNotAllowed(w http.ResponseWriter, r *http.Request, allowed ...string) *apiError {
	w.Header().Set("Allow", strings.Join(allowed, ", "))
	return newAPIError(protocol.CodeMethodNotAllowed, "Method not allowed",
		"%s is not allowed on %s; use %s", r.Method, r.URL.Path, strings.Join(allowed, " or "))
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	var b []byte
	var err error
	if p, ok := v.(preEncoded); ok {
		b = p
	} else {
		b, err = json.Marshal(v)
	}
	if err != nil {
		status = http.StatusInternalServerError
		b, _ = json.Marshal(api.Error{ErrorType: string(protocol.CodeInternal), Message: "Internal error",
			DetailedMessage: "the response could not be encoded"})
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

func (s *Server) writeError(w http.ResponseWriter, r *http.Request, err error) {
	ae := asAPIError(err)
	status := httpStatus(ae.code)
	if ae.cause != nil || status >= 500 {
		s.log.Error().Err(ae).Str("method", r.Method).Str("path", r.URL.Path).Str("call_id", callIDFrom(r.Context())).Msg("request failed")
	}
	if ae.retryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(retryAfterSeconds(ae.retryAfter)))
	}
	writeJSON(w, status, ae.body())
}

// cleanPath serves //api/... and /api/.../ as /api/... without a redirect:
// Dataiku's client builds "//api" when its host ends with a slash, and a
// redirect would turn its POSTs into GETs.
func cleanPath(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p := path.Clean("/" + r.URL.Path)
		if p != r.URL.Path {
			r2 := r.Clone(r.Context())
			r2.URL.Path = p
			r2.URL.RawPath = ""
			r = r2
		}
		next.ServeHTTP(w, r)
	})
}

// recoverPanics turns a panicking handler into a 500 with the JSON body.
func (s *Server) recoverPanics(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				s.log.Error().Str("panic", fmt.Sprint(v)).Bytes("stack", debug.Stack()).
					Str("method", r.Method).Str("path", r.URL.Path).Str("call_id", callIDFrom(r.Context())).Msg("handler panicked")
				writeJSON(w, http.StatusInternalServerError, api.Error{ErrorType: string(protocol.CodeInternal),
					Message: "Internal error", DetailedMessage: "the server failed while handling the request; see its log"})
			}
		}()
		next.ServeHTTP(w, r)
	})
}

// statusRecorder remembers the status a handler wrote, for the access log
// and metrics.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (r *statusRecorder) WriteHeader(code int) {
	r.status = code
	r.ResponseWriter.WriteHeader(code)
}

// Unwrap lets http.ResponseController reach the connection's writer (the
// console's event stream flushes, and lifts the write deadline).
func (r *statusRecorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// callIDHeader names a REST call: the client's, if it sent a usable one,
// or one the server makes; the response echoes it, the access log, the
// audit record and the bus messages the call causes carry it (callId), so
// that one call is followed through every role's log.
const callIDHeader = "X-Request-Id"

type callIDKey struct{}

// callIDFrom is the id of the REST call ctx belongs to, "" outside one.
func callIDFrom(ctx context.Context) string {
	id, _ := ctx.Value(callIDKey{}).(string)
	return id
}

// usableCallID says whether a client's X-Request-Id may name the call:
// at most 64 letters, digits, dots, dashes and underscores (nothing a log
// reader would misread).
func usableCallID(id string) bool { return plainToken(id, "._-") }

// plainToken says whether s is 1 to 64 ASCII letters and digits, dashes,
// underscores (protocol.ValidToken) and the characters of extra: what may
// go into a log line, a label or a terminal from someone FM does not
// trust.
func plainToken(s, extra string) bool {
	return protocol.ValidToken(strings.Map(func(r rune) rune {
		if strings.ContainsRune(extra, r) {
			return '_'
		}
		return r
	}, s))
}

// withCallIDs names every call (callIDHeader).
func withCallIDs(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get(callIDHeader)
		if !usableCallID(id) {
			id = newID("req")
		}
		w.Header().Set(callIDHeader, id)
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), callIDKey{}, id)))
	})
}

// logRequests logs every request: reads at debug level (clients poll
// futures every few seconds), everything else at info.
func (s *Server) logRequests(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
		next.ServeHTTP(rec, r)
		level := zerolog.InfoLevel
		if r.Method == http.MethodGet && rec.status < 400 {
			level = zerolog.DebugLevel
		}
		ev := s.log.WithLevel(level).Str("method", r.Method).Str("path", r.URL.Path).
			Int("status", rec.status).Dur("took", time.Since(start)).Str("call_id", callIDFrom(r.Context()))
		if p := principalFrom(r.Context()); p != nil {
			ev = ev.Str("key", p.KeyID)
		}
		ev.Msg("request")
		// A console event stream lasts as long as its page: counted, but
		// not a call whose latency means anything.
		took := time.Since(start)
		if r.URL.Path == LivePath && rec.status == http.StatusOK {
			took = 0
		}
		s.metrics.observeRequest(r.Method, rec.status, took)
	})
}

// readJSON decodes the request body into v whatever its Content-Type
// (Dataiku's client sends none). Unknown fields are ignored: clients echo
// back whole objects, server-owned fields included.
func readJSON(r *http.Request, v any) error {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil {
		return invalid("the request body could not be read: %v", err)
	}
	if len(body) > maxBody {
		return newAPIError(protocol.CodeRequestTooLarge, "Request too large", "the request body is larger than %d bytes", maxBody)
	}
	if len(bytes.TrimSpace(body)) == 0 {
		return invalid("a JSON body is required")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(v); err != nil {
		return jsonError(err)
	}
	if dec.More() {
		return invalid("the body holds more than one JSON value")
	}
	return nil
}

// jsonError names the field and the problem of a decoding failure.
func jsonError(err error) error {
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.As(err, &syn):
		return invalid("the body is not valid JSON: %v (at byte %d)", syn, syn.Offset)
	case errors.As(err, &typ):
		if typ.Field == "" {
			return invalid("the body must be a JSON %s, not %s", typ.Type.Kind(), typ.Value)
		}
		return invalid("field %s: expected %s, got %s", typ.Field, jsonKind(typ.Type.String()), typ.Value)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return invalid("the body is not valid JSON: it ends too early")
	default:
		return invalid("the body could not be decoded: %v", err)
	}
}

func jsonKind(goType string) string {
	switch strings.TrimLeft(goType, "*") {
	case "string":
		return "a string"
	case "bool":
		return "a boolean"
	case "int", "int64", "uint64", "float64":
		return "a number"
	case "map[string]string":
		return "an object of strings"
	case "[]string":
		return "an array of strings"
	}
	if strings.HasPrefix(goType, "[]") {
		return "an array"
	}
	return "an object"
}

// queryBool reads a boolean query parameter. Dataiku's client writes Python
// booleans (True/False); any case is accepted. def is used when the
// parameter is absent.
func queryBool(r *http.Request, name string, def bool) (bool, error) {
	vals, ok := r.URL.Query()[name]
	if !ok || len(vals) == 0 {
		return def, nil
	}
	switch strings.ToLower(strings.TrimSpace(vals[len(vals)-1])) {
	case "true", "1", "yes":
		return true, nil
	case "false", "0", "no":
		return false, nil
	}
	return false, invalid("query parameter %s: %q is not a boolean (use True or False)", name, vals[len(vals)-1])
}
