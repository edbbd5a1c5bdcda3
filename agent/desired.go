package agent

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
)

// desiredWatch follows the instance's desired state without a durable
// consumer: every change is republished by fm_desired on the instance's
// subject, and on every (re)connect the agent reads its key with a direct
// get, so that changes made while it was away are not missed. The highest
// revision wins.
type desiredWatch struct {
	instance string
	nc       *nats.Conn
	log      zerolog.Logger
	rejected func(err error, revision uint64)
	// open, if set, opens what a desired state holds sealed; a state it
	// fails is rejected.
	open func(*protocol.DesiredState) error

	mu      sync.Mutex
	current *protocol.DesiredState
	rev     uint64
	changed chan struct{} // receives when current changes (coalesced)
	// loaded is closed once the key was first read (whatever it held) or a
	// value of it received: before, "no desired state" may only mean the
	// agent just started.
	loaded     chan struct{}
	markLoaded func()
}

func newDesiredWatch(instance string, nc *nats.Conn, log zerolog.Logger, rejected func(error, uint64)) *desiredWatch {
	w := &desiredWatch{instance: instance, nc: nc, log: log, rejected: rejected, changed: make(chan struct{}, 1),
		loaded: make(chan struct{})}
	w.markLoaded = sync.OnceFunc(func() { close(w.loaded) })
	return w
}

// whenLoaded returns the current desired state once the key was read (nil
// if it holds none), or what there is when ctx ends first: a command that
// needs the desired state and arrives right after a restart waits for it
// rather than fails.
func (w *desiredWatch) whenLoaded(ctx context.Context) *protocol.DesiredState {
	select {
	case <-w.loaded:
	case <-ctx.Done():
	}
	return w.latest()
}

// latest returns the current desired state (nil if none yet).
func (w *desiredWatch) latest() *protocol.DesiredState {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.current
}

// offer considers a value of the key at a revision.
func (w *desiredWatch) offer(data []byte, rev uint64, deleted bool) {
	w.mu.Lock()
	if rev != 0 && rev <= w.rev {
		w.mu.Unlock()
		return
	}
	if deleted {
		w.rev = rev
		w.mu.Unlock()
		w.log.Warn().Uint64("revision", rev).Msg("the desired state was deleted; keeping the machine as it is")
		return
	}
	var d protocol.DesiredState
	if err := protocol.Decode(data, &d); err != nil {
		w.rev = rev
		w.mu.Unlock()
		w.rejected(err, rev)
		return
	}
	if d.Instance != w.instance {
		w.rev = rev
		w.mu.Unlock()
		w.rejected(fmt.Errorf("%w: desired state names instance %q", protocol.ErrMalformed, d.Instance), rev)
		return
	}
	if w.open != nil {
		if err := w.open(&d); err != nil {
			w.rev = rev
			w.mu.Unlock()
			w.rejected(err, rev)
			return
		}
	}
	w.current, w.rev = &d, rev
	w.mu.Unlock()
	w.markLoaded()
	select {
	case w.changed <- struct{}{}:
	default:
	}
}

// ownKey says whether msg is a value of the instance's key of fm_desired.
// Every agent's answers come back to the agents' account, and an agent may
// name another's subject as its reply (NATS does not check a reply): an
// answer of JetStream's to another agent (its own desired state, a publish
// acknowledgement) would land on this subscription. What is not this key
// is dropped without a word, an event or a change of revision, so that
// another agent cannot fill this one's records through it.
func (w *desiredWatch) ownKey(msg *nats.Msg) bool {
	return msg.Header.Get("Nats-Subject") == protocol.KVSubject(protocol.BucketDesired, w.instance)
}

// subscribe receives republished changes until the connection closes.
func (w *desiredWatch) subscribe() (*nats.Subscription, error) {
	return w.nc.Subscribe(protocol.DesiredSubject(w.instance), func(msg *nats.Msg) {
		if !w.ownKey(msg) {
			return
		}
		rev, _ := strconv.ParseUint(msg.Header.Get("Nats-Sequence"), 10, 64)
		op := msg.Header.Get("KV-Operation")
		w.offer(msg.Data, rev, op == "DEL" || op == "PURGE")
	})
}

// fetch reads the key with a direct get on the bucket's stream, the request
// an agent's permissions allow for its own key.
func (w *desiredWatch) fetch(ctx context.Context) error {
	subject := "$JS.API.DIRECT.GET.KV_" + protocol.BucketDesired + ".$KV." + protocol.BucketDesired + "." + w.instance
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	msg, err := w.nc.RequestWithContext(ctx, subject, nil)
	if err != nil {
		return fmt.Errorf("read desired state: %w", err)
	}
	switch msg.Header.Get("Status") {
	case "":
		if !w.ownKey(msg) {
			return fmt.Errorf("read desired state: the answer is not the instance's key (%q)", msg.Header.Get("Nats-Subject"))
		}
	case "404":
		w.markLoaded()
		return nil // no desired state yet
	default:
		return fmt.Errorf("read desired state: status %s %s", msg.Header.Get("Status"), msg.Header.Get("Description"))
	}
	rev, _ := strconv.ParseUint(msg.Header.Get("Nats-Sequence"), 10, 64)
	op := msg.Header.Get("KV-Operation")
	w.offer(msg.Data, rev, op == "DEL" || op == "PURGE")
	w.markLoaded() // read, even if what it held was refused
	return nil
}

// run reads the key now and after every reconnect, retrying failures.
func (w *desiredWatch) run(ctx context.Context, reconnected <-chan struct{}) {
	for {
		backoff := time.Second
		for ctx.Err() == nil {
			err := w.fetch(ctx)
			if err == nil {
				break
			}
			if !errors.Is(err, context.Canceled) {
				w.log.Debug().Err(err).Msg("desired state not read yet")
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 15*time.Second)
		}
		select {
		case <-ctx.Done():
			return
		case <-reconnected:
		}
	}
}
