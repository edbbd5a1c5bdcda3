package server

import (
	"context"
	"errors"
	"strings"
	"sync"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
)

// Agents ask the server for a few things by core request and reply on
// subjects of their own instance (protocol.RenewSubject,
// protocol.CommandsAfterSubject): the subject is the sender's, since only
// an agent of that instance may publish on it.

// agentPacer paces one kind of agent request: at most one per instance
// per interval, so that one agent asking over and over holds up neither
// the others, whose requests the subscription answers in turn, nor the
// bus, nor the server's log. It holds one entry per instance that asked
// within the last interval or so (older ones are swept as it grows).
type agentPacer struct {
	interval time.Duration
	mu       sync.Mutex
	last     map[string]time.Time
	added    int // entries added since the last sweep
	kept     int // entries the last sweep kept
}

// allow says whether instance may be answered at now, and counts it.
func (p *agentPacer) allow(instance string, now time.Time) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if prev, seen := p.last[instance]; seen && now.Sub(prev) < p.interval {
		return false
	}
	if p.last == nil {
		p.last = map[string]time.Time{}
	}
	if p.added++; p.added >= max(64, p.kept) {
		// Amortized: a sweep after as many additions as it kept entries.
		for id, at := range p.last {
			if now.Sub(at) >= p.interval {
				delete(p.last, id)
			}
		}
		p.added, p.kept = 0, len(p.last)
	}
	p.last[instance] = now
	return true
}

// agentReplyOK says whether an answer for instance may go to reply. NATS
// does not check the reply subject a client names, and an answer to a
// subject of FM's own (a bucket's key) would be stored there. An agent of
// the agents' account asks through the FM account's export, and its reply
// reaches FM as the "_R_." subject NATS made, which routes the answer back
// to the agents' account; an agent on a bus without accounts (FM run
// without a NATS authority, as in tests) may only be answered in its own
// inbox.
func agentReplyOK(instance, reply string) bool {
	return strings.HasPrefix(reply, "_R_.") || strings.HasPrefix(reply, protocol.InboxPrefix(instance)+".")
}

// agentRequestWorkers is how many agents' requests are answered at once.
const agentRequestWorkers = 16

// agentWorkers answers agents' requests a few at a time: a fleet asks
// together (10,000 agents catch up with their commands after a bus
// restart), and each answer waits on the bus.
type agentWorkers struct {
	slots  chan struct{}
	ctx    context.Context // ends with close
	cancel context.CancelFunc
	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup
}

func newAgentWorkers(n int) *agentWorkers {
	ctx, cancel := context.WithCancel(context.Background())
	return &agentWorkers{slots: make(chan struct{}, n), ctx: ctx, cancel: cancel}
}

// do runs fn on a goroutine of its own once one of the slots is free
// (the subscription waits meanwhile), unless the workers are closed; fn's
// context ends with close.
func (w *agentWorkers) do(fn func(ctx context.Context)) {
	w.slots <- struct{}{}
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		<-w.slots
		return
	}
	w.wg.Add(1)
	w.mu.Unlock()
	go func() {
		defer func() { <-w.slots; w.wg.Done() }()
		fn(w.ctx)
	}()
}

// close ends the requests under way and waits for them; none starts
// after it.
func (w *agentWorkers) close() {
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
	w.cancel()
	w.wg.Wait()
}

// serveAgentRequests answers, in queue group fm-server, the requests agents
// send on subject (whose last token is the instance): handle's answer, or
// failed's with the error (one not a *protocol.Error is internal). The
// subscription ends with the connection's drain or Unsubscribe.
func serveAgentRequests[R protocol.Message](s *Server, subject, what string, pace *agentPacer,
	handle func(ctx context.Context, instance string, data []byte) (R, error), failed func(*protocol.Error) R) (*nats.Subscription, error) {
	return s.cfg.Conn.QueueSubscribe(subject, "fm-server", func(m *nats.Msg) {
		instance := protocol.InstanceFromSubject(m.Subject)
		allowed := pace.allow(instance, time.Now())
		if !agentReplyOK(instance, m.Reply) {
			if allowed { // logged at the pace of answers
				s.log.Warn().Str("instance", safeToken(instance)).Str("request", what).Msg("an agent's request with a reply subject outside its inbox; ignored")
			}
			return
		}
		answer := func(resp R, err error) {
			if err != nil {
				var perr *protocol.Error
				if !errors.As(err, &perr) {
					perr = protocol.Errorf(protocol.CodeInternal, "%v", err)
				}
				resp = failed(perr)
			}
			if data, err := protocol.Encode(resp); err == nil {
				_ = m.Respond(data)
			}
		}
		if !allowed {
			var none R
			answer(none, protocol.Errorf(protocol.CodeResourceExhausted, "%s asked less than %s ago; ask later", what, pace.interval))
			return
		}
		s.agentWork.do(func(ctx context.Context) {
			ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			answer(handle(ctx, instance, m.Data))
		})
	})
}
