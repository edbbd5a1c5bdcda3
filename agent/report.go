package agent

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// maxOutbox bounds the events held while the bus is away; past it the oldest
// progress events are dropped (command results are kept).
const maxOutbox = 5000

// reporter sends what the agent has to say: events (through an outbox that
// survives bus outages and publishes in order with JetStream acks), its
// status in fm_agents, and heartbeats.
type reporter struct {
	instance string
	version  string
	nc       *nats.Conn
	js       jetstream.JetStream
	log      zerolog.Logger
	refresh  time.Duration

	mu      sync.Mutex
	outbox  []protocol.Event
	dropped int
	status  protocol.AgentStatus
	changes uint64        // counts status changes
	written uint64        // the change count last written to fm_agents
	wake    chan struct{} // something to send
	sent    chan struct{} // closed, and replaced, when the outbox shrinks
	hbEvery time.Duration
	facts   *protocol.MachineFacts // the last measurement, whole, for heartbeats
	// hbChanged wakes the heartbeats when hbEvery changes, so that a
	// shorter interval does not wait out the longer one.
	hbChanged chan struct{}
	// reconnected makes the next heartbeat go within a second: FM learns
	// that the agent is back without waiting a whole interval.
	reconnected chan struct{}
	hbSeq       uint64
	started     time.Time
}

func newReporter(instance, version string, nc *nats.Conn, js jetstream.JetStream, refresh time.Duration, log zerolog.Logger) *reporter {
	return &reporter{
		instance: instance, version: version, nc: nc, js: js, log: log, refresh: refresh,
		wake: make(chan struct{}, 1), sent: make(chan struct{}), hbEvery: 10 * time.Second, hbChanged: make(chan struct{}, 1), started: time.Now(),
		status: protocol.AgentStatus{Instance: instance, AgentVersion: version, Phase: protocol.PhaseConverging,
			DSS: protocol.DSSStatus{State: protocol.DSSAbsent}},
	}
}

func (r *reporter) poke() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// event queues an event; its time, and its id unless set, are filled in.
// An id that derives from what the event reports (a command's result) makes
// a repeat after a crash a duplicate the bus drops.
func (r *reporter) event(e protocol.Event) {
	if e.ID == "" {
		e.ID = protocol.NewID("ev")
	}
	e.Instance, e.Time, e.Source = r.instance, time.Now().UTC(), protocol.SourceAgent
	r.mu.Lock()
	r.outbox = append(r.outbox, e)
	if len(r.outbox) > maxOutbox {
		// Drop the oldest event that is not a command result.
		for i, q := range r.outbox {
			if q.Kind != protocol.EventCommand {
				r.outbox = append(r.outbox[:i], r.outbox[i+1:]...)
				r.dropped++
				break
			}
		}
	}
	r.mu.Unlock()
	r.poke()
}

// deliver queues an event and waits until the bus has it, or ctx ends: what
// the agent records after it (a command's cursor) must not get ahead of it.
func (r *reporter) deliver(ctx context.Context, e protocol.Event) error {
	if e.ID == "" {
		e.ID = protocol.NewID("ev")
	}
	r.event(e)
	for {
		r.mu.Lock()
		queued := false
		for _, q := range r.outbox {
			if q.ID == e.ID {
				queued = true
				break
			}
		}
		sent := r.sent
		r.mu.Unlock()
		if !queued {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-sent:
		}
	}
}

// updateStatus changes the status; it is written to fm_agents soon after.
func (r *reporter) updateStatus(change func(*protocol.AgentStatus)) {
	r.mu.Lock()
	before, _ := json.Marshal(r.status)
	change(&r.status)
	after, _ := json.Marshal(r.status)
	if string(before) != string(after) {
		r.changes++
	}
	r.mu.Unlock()
	r.poke()
}

func (r *reporter) currentStatus() protocol.AgentStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.status
}

// setFacts keeps the machine's last measurement for the heartbeats, and
// puts in the status only what changes seldom (statusFacts).
func (r *reporter) setFacts(f protocol.MachineFacts) {
	r.mu.Lock()
	r.facts = &f
	r.mu.Unlock()
	r.updateStatus(func(s *protocol.AgentStatus) { s.Machine = statusFacts(f) })
}

// statusFacts are the machine facts the status keeps: the data volume's
// size, its use rounded down to 1/200 of it (at least 1 MiB), and the
// memory's total. Load, free memory and uptime change at every
// measurement; heartbeats carry them.
func statusFacts(f protocol.MachineFacts) protocol.MachineFacts {
	step := max(f.DataVolumeBytes/200, 1<<20)
	return protocol.MachineFacts{DataVolumeBytes: f.DataVolumeBytes, DataVolumeUsedBytes: f.DataVolumeUsedBytes / step * step,
		MemTotalBytes: f.MemTotalBytes}
}

func (r *reporter) setHeartbeat(every time.Duration) {
	r.mu.Lock()
	changed := r.hbEvery != every
	r.hbEvery = every
	r.mu.Unlock()
	if changed {
		select {
		case r.hbChanged <- struct{}{}:
		default:
		}
	}
}

// run sends queued events and status changes until ctx ends. While the bus
// is away it waits and retries; nothing queued is lost but what the bound
// drops.
func (r *reporter) run(ctx context.Context) {
	refresh := time.NewTicker(r.refresh)
	defer refresh.Stop()
	retry := time.NewTimer(time.Hour)
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.wake:
		case <-refresh.C:
			// Rewrite even an unchanged status, before fm_agents expires it.
			r.mu.Lock()
			r.changes++
			r.mu.Unlock()
		case <-retry.C:
		}
		if !r.flush(ctx) {
			retry.Reset(time.Second)
		}
	}
}

// flush sends what is pending and reports whether all of it went.
func (r *reporter) flush(ctx context.Context) bool {
	for {
		r.mu.Lock()
		if n := r.dropped; n > 0 {
			r.dropped = 0
			r.log.Warn().Int("events", n).Msg("events dropped while the bus was away")
		}
		if len(r.outbox) == 0 {
			r.mu.Unlock()
			break
		}
		e := r.outbox[0]
		r.mu.Unlock()
		if err := r.publish(ctx, e); err != nil {
			r.log.Debug().Err(err).Msg("event not sent yet")
			return false
		}
		r.mu.Lock()
		if len(r.outbox) > 0 && r.outbox[0].ID == e.ID {
			r.outbox = r.outbox[1:]
			close(r.sent)
			r.sent = make(chan struct{})
		}
		r.mu.Unlock()
	}
	r.mu.Lock()
	st, changes, written := r.status, r.changes, r.written
	r.mu.Unlock()
	if changes == written {
		return true
	}
	if err := r.putStatus(ctx, st); err != nil {
		r.log.Debug().Err(err).Msg("status not written yet")
		return false
	}
	r.mu.Lock()
	r.written = changes
	r.mu.Unlock()
	return true
}

func (r *reporter) publish(ctx context.Context, e protocol.Event) error {
	data, err := protocol.EncodeEvent(e)
	if err != nil {
		r.log.Error().Err(err).Str("step", e.Step).Msg("an event could not be encoded; dropped")
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err = r.js.Publish(ctx, protocol.EventSubject(r.instance, e.Kind), data, jetstream.WithMsgID(e.ID))
	if errors.Is(err, jetstream.ErrStreamMessageExceedsMaximum) {
		// Refused for good (EncodeEvent keeps within the limit; a stream
		// declared smaller): holding it would hold every event after it.
		r.log.Error().Err(err).Str("step", e.Step).Int("bytes", len(data)).Msg("an event larger than FM_EVENTS takes; dropped")
		return nil
	}
	return err
}

func (r *reporter) putStatus(ctx context.Context, st protocol.AgentStatus) error {
	st.Time = time.Now().UTC()
	data, err := protocol.Encode(&st)
	if err != nil {
		r.log.Error().Err(err).Msg("status could not be encoded")
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	// A put of its own key, published as the KV client would, without
	// binding the bucket: binding needs STREAM.INFO of KV_fm_agents, which
	// lists every instance's key.
	_, err = r.js.Publish(ctx, protocol.KVSubject(protocol.BucketAgents, r.instance), data)
	return err
}

// heartbeats publishes a heartbeat every interval, with ±10% jitter so that
// a fleet's agents do not beat in step.
func (r *reporter) heartbeats(ctx context.Context) {
	for {
		r.mu.Lock()
		every := r.hbEvery
		r.mu.Unlock()
		jitter := time.Duration(0)
		if span := every / 5; span > 0 {
			jitter = randomDuration(span) - every/10
		}
		select {
		case <-ctx.Done():
			return
		case <-r.hbChanged:
			continue // a new interval starts now
		case <-r.reconnected:
			select {
			case <-ctx.Done():
				return
			case <-time.After(randomDuration(time.Second)):
			}
		case <-time.After(every + jitter):
		}
		if !r.nc.IsConnected() {
			continue
		}
		st := r.currentStatus()
		r.mu.Lock()
		r.hbSeq++
		hb := protocol.Heartbeat{Instance: r.instance, Seq: r.hbSeq, Time: time.Now().UTC(),
			Generation: st.Generation, DSS: st.DSS.State, AgentVersion: r.version, Machine: r.facts,
			EverySeconds: int(every / time.Second)}
		r.mu.Unlock()
		if data, err := protocol.Encode(&hb); err == nil {
			_ = r.nc.Publish(protocol.HeartbeatSubject(r.instance), data)
		}
	}
}
