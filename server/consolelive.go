package server

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
)

// The web console's pages follow the fleet live through one stream of
// server-sent events per page (LivePath), fed by the buckets' watchers
// this replica already runs: a change of an instance, of its machine,
// agent or lifecycle, of an operation or a snapshot is told to every open
// page as "this instance changed", and the page reads again through the
// REST API what it shows of it. The events carry ids only, which every
// role may list; what is read again is read with the page's own
// principal. An instance's log lines are told the same way, from a
// subscription to its log subjects on the bus while a page follows them.
const (
	// LivePath is the console's event stream.
	LivePath = "/console/events"
	// maxLiveStreams bounds the open streams of one replica, and
	// maxSessionStreams those of one session (its tabs), so that one
	// person cannot take every stream.
	maxLiveStreams    = 1000
	maxSessionStreams = 10
	// maxPrincipalStreams bounds those of one key or person, whatever
	// sessions they start.
	maxPrincipalStreams = 20
	// liveWriteTime bounds each write to a stream: a write that the page
	// does not take within it (its connection's buffers full) drops the
	// stream, rather than holding it for good.
	liveWriteTime = 30 * time.Second
	// liveBuffer is how many changes wait for a slow page; beyond, it is
	// told to read everything again ("resync").
	liveBuffer = 256
	// liveKeepAlive is how often an idle stream is written to, and its
	// session checked again: a sign-out or a revoked key ends the stream
	// within it.
	liveKeepAlive = 20 * time.Second
)

// liveEvent is one change: Kind is "instance" (ID is the instance's),
// "fleet" (ID the object's kind: networks, templates, images), or "log"
// (ID the instance's).
type liveEvent struct {
	Kind string `json:"kind"`
	ID   string `json:"id"`
}

// liveHub fans the changes out to the open streams.
type liveHub struct {
	mu          sync.Mutex
	subs        map[*liveSub]struct{}
	bySession   map[string]int
	byPrincipal map[string]int
	closed      bool
	// keepAlive is liveKeepAlive (tests shorten it).
	keepAlive time.Duration
}

type liveSub struct {
	session, principal string
	ch                 chan liveEvent
	resync             chan struct{} // one pending "read everything again"
	done               chan struct{} // closed when the hub closes
}

func newLiveHub(keepAlive time.Duration) *liveHub {
	if keepAlive <= 0 {
		keepAlive = liveKeepAlive
	}
	return &liveHub{subs: map[*liveSub]struct{}{}, bySession: map[string]int{}, byPrincipal: map[string]int{}, keepAlive: keepAlive}
}

// publish tells every stream of a change. It never blocks: a stream whose
// buffer is full is told to resync instead.
func (h *liveHub) publish(kind, id string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for sub := range h.subs {
		select {
		case sub.ch <- liveEvent{Kind: kind, ID: id}:
		default:
			select {
			case sub.resync <- struct{}{}:
			default:
			}
		}
	}
}

// subscribe opens a stream for a session of a principal; nil when
// maxLiveStreams are open, or maxSessionStreams of the session, or
// maxPrincipalStreams of the principal, or the hub is closed.
func (h *liveHub) subscribe(session, principal string) *liveSub {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed || len(h.subs) >= maxLiveStreams || h.bySession[session] >= maxSessionStreams || h.byPrincipal[principal] >= maxPrincipalStreams {
		return nil
	}
	sub := &liveSub{session: session, principal: principal, ch: make(chan liveEvent, liveBuffer), resync: make(chan struct{}, 1), done: make(chan struct{})}
	h.subs[sub] = struct{}{}
	h.bySession[session]++
	h.byPrincipal[principal]++
	return sub
}

func (h *liveHub) unsubscribe(sub *liveSub) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.subs[sub]; !ok {
		return
	}
	delete(h.subs, sub)
	if h.bySession[sub.session]--; h.bySession[sub.session] <= 0 {
		delete(h.bySession, sub.session)
	}
	if h.byPrincipal[sub.principal]--; h.byPrincipal[sub.principal] <= 0 {
		delete(h.byPrincipal, sub.principal)
	}
}

// close ends every stream, so that a graceful shutdown does not wait for
// pages that never hang up.
func (h *liveHub) close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return
	}
	h.closed = true
	for sub := range h.subs {
		close(sub.done)
	}
}

// count is the number of open streams.
func (h *liveHub) count() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.subs)
}

// liveInstance is the onChange of the tables keyed by instance id.
func (s *Server) liveInstance(key string) { s.live.publish("instance", key) }

// liveFleet is the onChange of a table of kind (networks, templates,
// images, alerts): the pages that list them read them again.
func (s *Server) liveFleet(kind string) func(string) {
	return func(string) { s.live.publish("fleet", kind) }
}

// liveOp is the ops table's onChange: the operation's instance changed
// (a snapshot's operation names its instance too; a load balancer's none).
func (s *Server) liveOp(key string) {
	if op, _, ok := s.st.ops.get(key); ok && op.Instance != "" {
		s.live.publish("instance", op.Instance)
	}
}

// liveSnapshot is the snapshots table's onChange.
func (s *Server) liveSnapshot(key string) {
	if sn, _, ok := s.st.snapshots.get(key); ok {
		s.live.publish("instance", sn.InstanceID)
	}
}

// serveLive serves LivePath: server-sent events until the page goes, the
// session ends or the server stops. ?logs=<instance> (operator) adds
// "log" events when that instance ships log lines.
func (s *Server) serveLive(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		s.writeError(w, r, methodNotAllowed(w, r, "GET"))
		return
	}
	// An EventSource cannot send the CSRF header. What it reads, another
	// origin cannot (no CORS is granted, and the cookie is SameSite), and
	// Sec-Fetch-Site refuses a cross-site page outright.
	if site := r.Header.Get("Sec-Fetch-Site"); site != "" && site != "same-origin" && site != "none" {
		s.writeError(w, r, newAPIError(protocol.CodePermissionDenied, "Cross-site request refused",
			"the console's events are for its own pages"))
		return
	}
	if s.draining.Load() {
		s.writeError(w, r, unavailable(nil, "this replica is stopping"))
		return
	}
	p, cs, err := s.sessionFrom(r, false)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	var logNudges chan struct{}
	if id := r.URL.Query().Get("logs"); id != "" {
		if !p.may(RoleOperator) {
			s.writeError(w, r, newAPIError(protocol.CodePermissionDenied, "Permission denied",
				"following logs needs the operator role; %s has the %s role", p.who(), p.Role))
			return
		}
		if _, ok := s.st.instances.view(id); !ok || !protocol.ValidToken(id) {
			s.writeError(w, r, notFound(kindInstance, id))
			return
		}
		logNudges = make(chan struct{}, 1)
		sub, err := s.cfg.Conn.Subscribe(protocol.LogSubject(id, "*"), func(*nats.Msg) {
			select {
			case logNudges <- struct{}{}:
			default:
			}
		})
		if err != nil {
			s.writeError(w, r, unavailable(err, "the instance's logs cannot be followed"))
			return
		}
		defer func() { _ = sub.Unsubscribe() }()
	}
	sub := s.live.subscribe(cs.CSRF, p.KeyID) // (the CSRF token names the session here: it is one per session)
	if sub == nil {
		s.writeError(w, r, unavailable(nil, "too many console pages follow this server (at most %d a session, %d a key or person): close some, or try again later",
			maxSessionStreams, maxPrincipalStreams))
		return
	}
	defer s.live.unsubscribe(sub)
	rc := http.NewResponseController(w)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	// The server's write timeout is for calls; a stream lasts, each write
	// within liveWriteTime.
	write := func(text string) bool {
		_ = rc.SetWriteDeadline(time.Now().Add(liveWriteTime))
		if _, err := io.WriteString(w, text); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	send := func(event string, v any) bool {
		b, _ := json.Marshal(v)
		return write(fmt.Sprintf("event: %s\ndata: %s\n\n", event, b))
	}
	if !send("hello", map[string]string{"who": p.who(), "role": p.Role}) {
		return
	}
	tick := time.NewTicker(s.live.keepAlive)
	defer tick.Stop()
	ctx := r.Context()
	for {
		var ok bool
		select {
		case <-ctx.Done():
			return
		case <-sub.done:
			return
		case ev := <-sub.ch:
			ok = send("change", ev)
		case <-sub.resync:
			ok = send("resync", map[string]string{})
		case <-logNudges:
			ok = send("change", liveEvent{Kind: "log", ID: r.URL.Query().Get("logs")})
		case <-tick.C:
			// Ended only when the session is: a bus that does not answer
			// now is asked again at the next tick.
			if _, _, err := s.sessionFrom(r, false); err != nil && asAPIError(err).code == protocol.CodeUnauthenticated {
				send("ended", map[string]string{"message": asAPIError(err).detail})
				return
			}
			ok = write(": keep-alive\n\n")
		}
		if !ok {
			return
		}
	}
}
