package natsauth

import (
	"context"
	"strings"
	"sync"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Why a relay. What an agent stores (its events, logs, diagnosis chunks and
// status) used to cross into the FM account straight onto the streams'
// subjects, headers and all, and NATS permissions cannot forbid a header.
// One header stalls a stream of three replicas for good (nats-server
// v2.15.3): JetStream's leader does not check Nats-Expected-Last-Msg-Id
// before it proposes a message, every replica then refuses the message as
// it applies it, takes that refusal for a storage failure and steps down
// (docs/security.md, "A header that stalls a stream"). So those requests
// reach the FM account under relayPrefix, where no stream listens, and the
// relay (in each fm server, one queue group) publishes them onto the
// stream's subject with the one header FM's agents use, Nats-Msg-Id, kept
// to the sender's instance, and answers with JetStream's acknowledgement.
// Nothing changes on the agent's side: its permissions, subjects and
// client are as before, and it cannot tell the relay is there.

// relayPrefix is where what agents store reaches the FM account. It is
// outside fm.>, which read-only operators may listen to.
const relayPrefix = "fmin."

// RelaySubject is subject, as an agent stores on it, where it reaches the
// FM account: what the relay takes.
func RelaySubject(subject string) string { return relayPrefix + subject }

// relayQueue is the relays' queue group: each request is relayed once,
// by one fm server.
const relayQueue = "fm-relay"

// maxRelayedMsgID bounds a Nats-Msg-Id: JetStream keeps each one in memory
// for its duplicate window, and an agent's are short (an event's id, a log
// batch's, a diagnosis chunk's subject and number).
const maxRelayedMsgID = 200

// Relay relays what agents store, publishing it with a user of the FM
// account. Every fm server runs one (queue group): while none runs,
// agents' events, logs and status wait in the agents, which retry.
type Relay struct {
	nc     *nats.Conn
	admit  func(ctx context.Context, subject string, size int) bool
	sub    *nats.Subscription
	slots  chan struct{}
	ctx    context.Context // ends with Stop
	cancel context.CancelFunc
	mu     sync.Mutex
	// stopped: no relaying starts (a callback under way when Stop began may
	// still be running).
	stopped bool
	wg      sync.WaitGroup
}

// relayInFlight bounds the requests a relay waits on at once (a
// JetStream acknowledgement takes a few milliseconds); beyond, the
// subscription's backlog holds the rest.
const relayInFlight = 256

// relayWait bounds the wait for JetStream's acknowledgement (and for
// admit): an agent has given up by then (it waits 5 seconds), and asks
// again.
const relayWait = 10 * time.Second

// StartRelay starts a relay on nc, a connection of the FM account, until
// Stop. admit, if not nil, says whether to store a message of size bytes
// on the subject it names (what the bus alone cannot tell, such as whether
// the agent was asked for it); a message it refuses is dropped,
// unanswered.
func StartRelay(nc *nats.Conn, admit func(ctx context.Context, subject string, size int) bool) (*Relay, error) {
	r := &Relay{nc: nc, admit: admit, slots: make(chan struct{}, relayInFlight)}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	sub, err := nc.QueueSubscribe(relayPrefix+">", relayQueue, r.relay)
	if err != nil {
		r.cancel()
		return nil, err
	}
	r.sub = sub
	return r, nil
}

// Stop ends the subscription and the requests under way (their agents
// ask again), and waits for them.
func (r *Relay) Stop() {
	_ = r.sub.Unsubscribe()
	r.mu.Lock()
	r.stopped = true
	r.mu.Unlock()
	r.cancel()
	r.wg.Wait()
}

// relay stores m and answers it with JetStream's answer. A client may not
// name the "_R_." reply subject NATS made for the agent's request (it is
// reserved), so the relay asks itself and passes the answer on: no answer
// (JetStream unavailable) is no answer, and the agent asks again.
func (r *Relay) relay(m *nats.Msg) {
	out := relayedMsg(m)
	if out == nil {
		return
	}
	select {
	case r.slots <- struct{}{}:
	case <-r.ctx.Done():
		return
	}
	r.mu.Lock()
	if r.stopped {
		r.mu.Unlock()
		<-r.slots
		return
	}
	r.wg.Add(1)
	r.mu.Unlock()
	go func() {
		defer func() { <-r.slots; r.wg.Done() }()
		ctx, cancel := context.WithTimeout(r.ctx, relayWait)
		defer cancel()
		if r.admit != nil && !r.admit(ctx, out.Subject, len(out.Data)) {
			return
		}
		if m.Reply == "" {
			_ = r.nc.PublishMsg(out)
			return
		}
		ans, err := r.nc.RequestMsgWithContext(ctx, out)
		if err != nil {
			return
		}
		_ = m.RespondMsg(&nats.Msg{Data: ans.Data, Header: ans.Header})
	}()
}

// relayedMsg is what the relay publishes for m, or nil to drop it: m's
// subject without the prefix, if it is one an agent stores on, its data,
// and its Nats-Msg-Id made the sender's own.
func relayedMsg(m *nats.Msg) *nats.Msg {
	subject, ok := strings.CutPrefix(m.Subject, relayPrefix)
	instance := storingInstance(subject)
	if !ok || instance == "" {
		return nil
	}
	out := &nats.Msg{Subject: subject, Data: m.Data}
	if id := m.Header.Get(jetstream.MsgIDHeader); id != "" {
		if len(id) > maxRelayedMsgID {
			return nil
		}
		// Kept to the sender: an agent cannot use another's ids, or FM's
		// own (the provisioner's events), to have theirs dropped as
		// duplicates.
		out.Header = nats.Header{jetstream.MsgIDHeader: []string{"agent." + instance + "." + id}}
	}
	return out
}

// storingInstance is the instance whose agent stores on subject, if it is
// one of the subjects relayed (the agents' permissions narrow them to
// their own instance before the relay sees them), or "".
func storingInstance(subject string) string {
	for _, e := range agentsPublish {
		if !e.relayed {
			continue
		}
		prefix := strings.TrimSuffix(e.subject, ">")
		if rest, ok := strings.CutPrefix(subject, prefix); ok && rest != "" {
			instance, _, _ := strings.Cut(rest, ".")
			if protocol.ValidToken(instance) {
				return instance
			}
		}
	}
	return ""
}
