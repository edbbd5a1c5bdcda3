package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// EventsConsumer is the servers' durable consumer on FM_EVENTS. Every server
// replica pulls from it, so each event is folded by one of them.
const EventsConsumer = protocol.ConsumerEvents

// folder folds what the provisioner and the agents report (fm_machines,
// fm_agents, FM_EVENTS, heartbeats) into each instance's lifecycle and its
// operation. Every change is made with a revision check and is idempotent,
// so replicas folding the same instance agree.
type folder struct {
	sweeps      int // sweeps done (the sweep's goroutine only)
	mu          sync.Mutex
	dirty       map[string]bool
	wake        chan struct{}
	beats       map[string]beat      // last heartbeat per instance, this replica's view
	republished map[string]time.Time // last republication per operation
}

func newFolder() *folder {
	return &folder{dirty: map[string]bool{}, wake: make(chan struct{}, 1), beats: map[string]beat{},
		republished: map[string]time.Time{}}
}

// enqueue marks an instance to be reconciled soon.
func (s *Server) enqueue(id string) {
	s.fold.mu.Lock()
	s.fold.dirty[id] = true
	s.fold.mu.Unlock()
	select {
	case s.fold.wake <- struct{}{}:
	default:
	}
}

// beat is an instance's last heartbeat: when it came, and the machine
// facts it carried (nil from agents before heartbeats carried them).
type beat struct {
	at      time.Time
	machine *protocol.MachineFacts
	every   time.Duration // the interval the agent says it beats at (0: not said)
}

// lastBeat is the instance's last heartbeat, as this replica saw it.
func (s *Server) lastBeat(id string) beat {
	s.fold.mu.Lock()
	defer s.fold.mu.Unlock()
	return s.fold.beats[id]
}

// runFolding does the folding until ctx ends.
func (s *Server) runFolding(ctx context.Context) {
	hb, err := s.cfg.Conn.Subscribe(protocol.SubjectAllHeartbeat, func(m *nats.Msg) {
		// The subject, which NATS lets only the instance's own agent publish
		// on, says who beats; a payload naming another instance is a lie,
		// and an instance not on record takes no room.
		var h protocol.Heartbeat
		id := protocol.InstanceFromSubject(m.Subject)
		if protocol.Decode(m.Data, &h) != nil || h.Instance != id {
			return
		}
		if _, _, ok := s.st.instances.get(id); !ok {
			return
		}
		s.fold.mu.Lock()
		s.fold.beats[id] = beat{at: time.Now(), machine: h.Machine, every: time.Duration(min(max(h.EverySeconds, 0), 3600)) * time.Second}
		s.fold.mu.Unlock()
	})
	if err != nil {
		s.log.Error().Err(err).Msg("heartbeats not followed")
	} else {
		defer func() { _ = hb.Unsubscribe() }()
	}
	// Folding ends once the events taken are folded or handed back.
	consumed := make(chan struct{})
	go func() { defer close(consumed); s.consumeEvents(ctx) }()
	defer func() { <-consumed }()
	tick := time.NewTicker(s.cfg.SweepInterval)
	defer tick.Stop()
	s.sweep(ctx)
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.fold.wake:
		case <-tick.C:
			s.sweep(ctx)
		}
		s.fold.mu.Lock()
		ids := make([]string, 0, len(s.fold.dirty))
		for id := range s.fold.dirty {
			ids = append(ids, id)
		}
		s.fold.dirty = map[string]bool{}
		s.fold.mu.Unlock()
		s.reconcileAll(ctx, ids)
	}
}

// eachAtOnce calls fn(i) for each i in [0, n), at most workers at once,
// and returns when every call has.
func eachAtOnce(workers, n int, fn func(i int)) {
	work := make(chan int)
	var wg sync.WaitGroup
	for range min(workers, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				fn(i)
			}
		}()
	}
	for i := range n {
		work <- i
	}
	close(work)
	wg.Wait()
}

// reconcileWorkers is how many instances are reconciled at once: each
// waits on the bus most of its time, and a fleet-wide change ends
// thousands of operations together.
const reconcileWorkers = 8

// reconcileAll reconciles each of ids (distinct instances) once, a few at
// a time; one that fails is queued again.
func (s *Server) reconcileAll(ctx context.Context, ids []string) {
	one := func(id string) {
		if err := s.reconcile(ctx, id); err != nil && ctx.Err() == nil {
			s.log.Warn().Err(err).Str("instance", id).Msg("reconcile failed; will retry")
			s.enqueue(id)
		}
	}
	if len(ids) == 1 {
		one(ids[0])
		return
	}
	eachAtOnce(reconcileWorkers, len(ids), func(i int) { one(ids[i]) })
}

// reconcile brings an instance's lifecycle and operation in line with what
// its machine and agent report.
func (s *Server) reconcile(ctx context.Context, id string) error {
	lc, rev, ok := s.st.lifecycle.get(id)
	if !ok {
		return nil
	}
	if lc.OpID == "" {
		if lc.State != stateRunning {
			return nil
		}
		if m, _, _ := s.st.machines.get(id); m.Status == protocol.MachineLost || m.Status == protocol.MachineFailed {
			// The machine went away on its own: start or reprovision it.
			next := lc
			next.State, next.Since, next.UpdatedAt = stateFailed, time.Now().UTC(), time.Now().UTC()
			next.Error = apiErrorOf(m.Error, "The machine is lost")
			if _, err := s.st.lifecycle.update(ctx, id, next, rev); err != nil && !errors.Is(err, errConflict) {
				return err
			}
			return nil
		}
		s.requestSecrets(ctx, id)
		return nil
	}
	op, _, found := s.st.ops.get(lc.OpID)
	if !found {
		// The copy may not have it yet (another replica just made it): only
		// the bucket says it is gone.
		fetched, _, err := s.st.ops.fetch(ctx, lc.OpID)
		switch {
		case err == nil:
			op, found = fetched, true
		case !errors.Is(err, errNotFound):
			return err
		}
	}
	if !found || op.Kind != opDelete {
		gone, err := s.instanceGone(ctx, id)
		if err != nil {
			return err
		}
		if gone {
			// A deletion raced this operation's claim, and the server
			// stopped before act saw it: nothing goes out for an instance
			// that is gone, and its records go too.
			if found && op.State == api.OpRunning {
				if err := s.failOp(ctx, op, &api.Error{ErrorType: string(protocol.CodeNotFound), Message: "Instance deleted",
					DetailedMessage: "instance " + id + " was deleted before " + op.Kind + " was under way; nothing was done"}); err != nil {
					return err
				}
			}
			s.withdrawJoinTokens(ctx, op.Instance, op.RequestID)
			return s.forgetInstance(ctx, id, lc.BasePort)
		}
	}
	if !found || op.State != api.OpRunning {
		return s.settle(ctx, id, lc, rev, op, found)
	}
	m, _, _ := s.st.machines.get(id)
	ag, _, _ := s.st.agents.get(id)
	switch op.Kind {
	case opReprovision, opStart:
		if m.RequestID != op.RequestID {
			return nil
		}
		if m.Error != nil && m.Status != protocol.MachineFailed && m.Status != protocol.MachineLost {
			// The provisioner refused before it changed anything (a snapshot
			// failed its check, or could not be taken before an upgrade).
			return s.failOpTo(ctx, op, apiErrorOf(m.Error, "The machine was left as it was"), stateOfMachine(m))
		}
		switch m.Status {
		case protocol.MachineFailed, protocol.MachineLost:
			return s.failOp(ctx, op, apiErrorOf(m.Error, "The machine operation failed"))
		case protocol.MachineRunning:
		default:
			return nil
		}
		if lc.State != stateStarting {
			if err := s.setState(ctx, id, rev, stateStarting); err != nil {
				return err
			}
		}
		// Only reports of this machine's agent, made since the operation
		// began, count: the machine being replaced reports too.
		fresh := ag.Time.After(op.StartedAt) && (ag.MachineRequest == "" || ag.MachineRequest == lc.Machine)
		if fresh && ag.Target >= op.Target && ag.Phase == protocol.PhaseFailed {
			return s.failOp(ctx, op, apiErrorOf(ag.Error, "DSS could not be set up"))
		}
		if fresh && ag.Generation >= op.Target && ag.Phase == protocol.PhaseReady && ag.DSS.State == protocol.DSSRunning {
			if !s.hasSecrets(id) {
				// Done only once FM holds the credentials, so that a client
				// can ask for the initial password right after.
				s.requestSecrets(ctx, id)
				return nil
			}
			return s.succeedOp(ctx, op, nil, stateRunning)
		}
	case opReplayActions:
		if op.CommandID != "" {
			// Sent as a command by an FM before replays were generations:
			// its result ends it.
			return nil
		}
		// The operation's generation is new: a report that names it is of
		// this replay (the agent's clock is not compared with FM's). Like a
		// reprovision, it fails at the first failure the agent reports,
		// which goes on retrying what is transient until the deadline.
		if ag.Target >= op.Target && ag.Phase == protocol.PhaseFailed {
			return s.failOp(ctx, op, apiErrorOf(ag.Error, "The setup actions failed"))
		}
		if ag.Generation >= op.Target && ag.Phase == protocol.PhaseReady {
			return s.succeedOp(ctx, op, map[string]string{"instanceId": id,
				"message": fmt.Sprintf("setup actions replayed (generation %d)", op.Target)}, "")
		}
	case opStop, opDeprovision, opDelete:
		if op.Kind == opDelete && op.RequestID == "" {
			// A deletion without a machine, cut short after its claim (the
			// request that made it is done with it by now): there is nothing
			// for a provisioner to do, it only has to end.
			if time.Since(op.StartedAt) < s.cfg.RepublishAfter {
				return nil
			}
			if s.balancedDeletion(ctx, op) {
				return nil
			}
			if m.HasMachine() {
				// Made after the deletion looked (a stale copy): deleting the
				// instance now would leave the machine running unseen.
				return s.failOp(ctx, op, &api.Error{ErrorType: string(protocol.CodeFailedPrecondition), Message: "Instance has a machine",
					DetailedMessage: "a machine was made for instance " + id + " meanwhile (" + m.MachineID + "); deprovision it first, or delete with force=True"})
			}
			in, _, _ := s.st.instances.get(id)
			return s.succeedOp(ctx, op, map[string]string{"id": id, "label": in.Label}, stateDeleted)
		}
		if m.RequestID != op.RequestID {
			return nil
		}
		want := map[string]protocol.MachineStatus{opStop: protocol.MachineStopped,
			opDeprovision: protocol.MachineDeprovisioned, opDelete: protocol.MachineDeleted}[op.Kind]
		switch m.Status {
		case protocol.MachineFailed:
			return s.failOp(ctx, op, apiErrorOf(m.Error, "The machine operation failed"))
		case want:
			if op.Kind != opStop {
				// Revoked before the operation ends: a failure is tried again
				// at the next reconcile.
				if err := s.revokeAgent(ctx, id); err != nil {
					return fmt.Errorf("revoke the machine's credentials: %w", err)
				}
			}
			if op.Kind == opDelete {
				in, _, _ := s.st.instances.get(id)
				return s.succeedOp(ctx, op, map[string]string{"id": id, "label": in.Label}, stateDeleted)
			}
			state := map[string]string{opStop: stateStopped, opDeprovision: stateDeprovisioned}[op.Kind]
			return s.succeedOp(ctx, op, nil, state)
		}
	}
	return nil
}

// instanceGone reports whether the instance is no longer on record: not in
// the copy, and not in the bucket either (the copy may lag behind).
func (s *Server) instanceGone(ctx context.Context, id string) (bool, error) {
	if _, _, ok := s.st.instances.get(id); ok {
		return false, nil
	}
	_, _, err := s.st.instances.fetch(ctx, id)
	if errors.Is(err, errNotFound) {
		return true, nil
	}
	return false, err
}

// settled is the lifecycle lc moves to from its operation op, which ended
// (found false: which is no longer on record). The status shows it as soon
// as the operation ends, so that a client that waited for the operation
// never reads the state the instance is leaving.
func settled(lc lifecycle, op opRecord, found bool, now time.Time) lifecycle {
	next := lc
	if lc.OpID != "" {
		next.LastOpID = lc.OpID
	}
	next.OpID, next.OpKind, next.UpdatedAt = "", "", now
	transitional := oneOfStr(lc.State, stateProvisioning, stateStarting, stateStopping, stateDeprovisioning, stateDeleting)
	switch {
	case !found:
		if transitional {
			next.State, next.Since = stateFailed, now
			next.Error = &api.Error{ErrorType: string(protocol.CodeAborted), Message: "Operation lost",
				DetailedMessage: "the operation " + lc.OpID + " is no longer on record"}
		}
	case op.State == api.OpSucceeded:
		if op.EndState != "" && op.EndState != lc.State {
			next.State, next.Since = op.EndState, now
		}
		next.Error = nil
		if op.Kind == opReprovision && op.TargetImageID != "" {
			next.ImageID, next.DSSVersion = op.TargetImageID, op.TargetDSSVersion
		}
	case op.EndState != "":
		next.State, next.Since, next.Error = op.EndState, now, op.Error
	case transitional:
		next.State, next.Since, next.Error = stateFailed, now, op.Error
	}
	return next
}

// settle moves the lifecycle on from an operation that ended (or expired
// from fm_ops): to the state its end recorded, or, for one that ended
// without saying (aborted, timed out) or was lost, to failed if the
// instance was in a transitional state, so that a retry or reprovision can
// start. It is the one place a lifecycle leaves an operation, so that a
// server that stops between ending an operation and moving the lifecycle
// on leaves the next one (or the sweep) to finish.
func (s *Server) settle(ctx context.Context, id string, lc lifecycle, rev uint64, op opRecord, found bool) error {
	if found && op.State == api.OpSucceeded && op.EndState == stateDeleted {
		return s.finishDelete(ctx, op)
	}
	now := time.Now().UTC()
	if found && op.EndedAt != nil {
		now = *op.EndedAt // as the status showed it from the operation's end
	}
	next := settled(lc, op, found, now)
	if found && op.Kind == opReprovision && op.RequestID != "" {
		// The reprovision is over. Succeeded, its machine joined and keeps
		// what it got: its tokens go, used ones too, so that none can be
		// exchanged again. Otherwise its unused ones go (a machine that
		// joined but lost its answer may still ask again, and report).
		request, succeeded := op.RequestID, op.State == api.OpSucceeded
		s.withdrawTokens(ctx, id, func(_ string, r joinRecord) bool { return r.Request == request && (succeeded || !r.used()) })
	}
	if found && op.Kind == opDiagnosis {
		// Whatever its end, the chunks of its runs go: FM_DIAG is shared.
		s.dropDiagnosisChunks(ctx, id)
	}
	_, err := s.st.lifecycle.update(ctx, id, next, rev)
	if errors.Is(err, errConflict) {
		s.enqueue(id)
		return nil
	}
	return err
}

// settleNow settles the instance of operation ended, as endOpTo returned
// it, if its lifecycle still points at it. An ended operation does not
// change, so it is not read again.
func (s *Server) settleNow(ctx context.Context, ended opRecord) error {
	if ended.State == api.OpRunning {
		return nil
	}
	lc, rev, err := s.st.lifecycle.fetch(ctx, ended.Instance)
	if errors.Is(err, errNotFound) {
		return nil
	}
	if err != nil || lc.OpID != ended.JobID {
		return err
	}
	return s.settle(ctx, ended.Instance, lc, rev, ended, true)
}

func (s *Server) setState(ctx context.Context, id string, rev uint64, state string) error {
	lc, _, _ := s.st.lifecycle.get(id)
	lc.State, lc.Since, lc.UpdatedAt = state, time.Now().UTC(), time.Now().UTC()
	_, err := s.st.lifecycle.update(ctx, id, lc, rev)
	if errors.Is(err, errConflict) {
		s.enqueue(id)
		return nil
	}
	return err
}

// succeedOp ends the operation with result (nil: the instance's new state)
// and puts the instance in state ("" keeps it). The operation ends first,
// with the state recorded; the lifecycle follows (settle).
func (s *Server) succeedOp(ctx context.Context, op opRecord, result any, state string) error {
	if result == nil {
		result = map[string]string{"instanceId": op.Instance, "state": state}
	}
	ended, byThis, err := s.endOpTo(ctx, op.JobID, result, nil, state)
	if err != nil {
		return err
	}
	if byThis {
		s.crash.At("server/end-op/ended")
	}
	s.log.Info().Str("instance", op.Instance).Str("op", op.JobID).Str("state", ended.EndState).Msg("instance operation succeeded")
	return s.settleNow(ctx, ended)
}

// failOp ends the operation with an error and leaves the instance failed
// (a failed command or replay leaves it as it was).
func (s *Server) failOp(ctx context.Context, op opRecord, failure *api.Error) error {
	state := stateFailed
	if op.CommandID != "" || op.Kind == opReplayActions {
		// The machine is as it was: a command or a replay that failed
		// leaves the instance in its state, with the error beside it.
		state = ""
	}
	return s.failOpTo(ctx, op, failure, state)
}

// stateOfMachine is the lifecycle state matching an untouched machine.
func stateOfMachine(m protocol.MachineState) string {
	switch m.Status {
	case protocol.MachineRunning:
		return stateRunning
	case protocol.MachineStopped:
		return stateStopped
	case protocol.MachineDeprovisioned:
		return stateDeprovisioned
	}
	return stateFailed
}

// failOpTo ends the operation with an error and puts the instance in state
// ("" keeps the one it has), with the error beside it.
func (s *Server) failOpTo(ctx context.Context, op opRecord, failure *api.Error, state string) error {
	ended, byThis, err := s.endOpTo(ctx, op.JobID, nil, failure, state)
	if err != nil {
		return err
	}
	if byThis {
		s.crash.At("server/end-op/ended")
	}
	s.log.Warn().Str("instance", op.Instance).Str("op", op.JobID).Str("error", failure.DetailedMessage).Msg("instance operation failed")
	return s.settleNow(ctx, ended)
}

// finishDelete removes what is left of a deleted instance, once its
// deletion succeeded: the instance, then its records. Done again after a
// crash, it finishes what is left.
func (s *Server) finishDelete(ctx context.Context, op opRecord) error {
	in, rev, err := s.st.instances.fetch(ctx, op.Instance)
	if err == nil {
		if err := s.st.instances.erase(ctx, op.Instance, in, rev); err != nil {
			return err
		}
		s.crash.At("server/delete/instance-erased")
	} else if !errors.Is(err, errNotFound) {
		return err
	}
	lc, _, _ := s.st.lifecycle.get(op.Instance)
	if err := s.forgetInstance(ctx, op.Instance, lc.BasePort); err != nil {
		return err
	}
	s.log.Info().Str("instance", op.Instance).Msg("instance deleted")
	return nil
}

// forgetInstance purges an instance's records: its desired state,
// secrets, last agent status and machine record, and, last, its lifecycle:
// while it is there, a retry knows there is something to finish, so a purge
// that failed is tried again. It frees the instance's port.
func (s *Server) forgetInstance(ctx context.Context, id string, port int) error {
	s.releasePort(ctx, id, port)
	for _, kv := range []jetstream.KeyValue{s.st.desired, s.st.secrets.kv, s.st.agents.kv, s.st.machines.kv, s.st.lifecycle.kv} {
		forget := kv.Purge
		if kv.Bucket() == protocol.BucketAgents {
			forget = kv.Delete // roll-ups, which a purge is, are off there (bus.Topology.Declare)
		}
		if err := forget(ctx, id); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
			return fmt.Errorf("purge the record of deleted instance %s from %s: %w", id, kv.Bucket(), err)
		}
	}
	return nil
}

// consumeEvents folds FM_EVENTS: progress into operations, command results
// into their operations and into the credentials FM keeps. An event whose
// folding failed (a write to the bus refused or lost) is handed back, to be
// folded again a little later, never acknowledged and lost. Once ctx ends,
// an event not folded, or folded with writes ctx cut short, is handed back
// at once to the next server (folding is idempotent).
func (s *Server) consumeEvents(ctx context.Context) {
	filer := newDiagnosisFiler(s)
	defer func() {
		// Hand-backs (Nak) must reach the bus before the caller closes the
		// connection, the filers' included.
		filer.wait()
		_ = s.js.Conn().FlushTimeout(2 * time.Second)
	}()
	for ctx.Err() == nil {
		cons, err := s.js.CreateOrUpdateConsumer(ctx, protocol.StreamEvents, jetstream.ConsumerConfig{
			Durable: EventsConsumer, AckPolicy: jetstream.AckExplicitPolicy, DeliverPolicy: jetstream.DeliverNewPolicy,
			AckWait: eventsAckWait, MaxAckPending: 1000, MaxDeliver: eventsMaxDeliver,
		})
		if err == nil {
			err = bus.Pull(ctx, cons, eventBatch, func(m jetstream.Msg) {
				if cmd, ok := s.filesDiagnosis(m.Subject(), m.Data()); ok {
					filer.file(ctx, m, cmd)
					return
				}
				// Tried once: a fold that fails is handed back, and one
				// that waited would hold the batch past its ack wait.
				s.settleEvent(ctx, m, s.foldEvent(withoutWriteRetries(ctx), m.Subject(), m.Data()))
			})
		}
		if ctx.Err() != nil {
			return
		}
		s.log.Warn().Err(err).Msg("events not followed yet; retrying")
		select {
		case <-ctx.Done():
		case <-time.After(2 * time.Second):
		}
	}
}

// settleEvent acknowledges an event folded (ferr nil), or hands it back to
// be folded again later, or drops one that can never be.
func (s *Server) settleEvent(ctx context.Context, m jetstream.Msg, ferr error) {
	switch {
	case ctx.Err() != nil:
		_ = m.Nak()
	case ferr != nil && !foldAgain(ferr):
		// Folding it again would fail the same way (a value the bus
		// refuses, say): it must not hold a place among the events handed
		// out, which every instance shares.
		s.log.Error().Err(ferr).Str("subject", m.Subject()).Msg("event not folded; dropped")
		_ = m.Term()
	case ferr != nil && delivered(m) >= eventsMaxDeliver:
		s.log.Error().Err(ferr).Str("subject", m.Subject()).Int("deliveries", eventsMaxDeliver).Msg("event not folded; given up")
		_ = m.Term()
	case ferr != nil:
		// The bus away, slow, electing a leader or racing another writer:
		// folded again later, not dropped.
		delay := foldRetryDelay(m)
		s.log.Warn().Err(ferr).Str("subject", m.Subject()).Dur("retry_in", delay).Msg("event not folded; it will be again")
		_ = m.NakWithDelay(delay)
	default:
		s.crash.At("server/fold/ack:before")
		_ = m.Ack()
	}
}

// foldAgain reports whether folding an event that failed with err may
// succeed later: the bus away, slow or busy (a JetStream API error of
// status 5xx: no leader yet, not the leader, out of storage; 408, 429), or
// a write that kept losing the race to another writer.
func foldAgain(err error) bool {
	return bus.Unanswered(err) || errors.Is(err, errConflict) || errors.Is(err, jetstream.ErrKeyExists)
}

// foldRetryDelay grows with each delivery of an event that could not be
// folded: 1s, 2s, … up to 30s.
func foldRetryDelay(m jetstream.Msg) time.Duration {
	n := delivered(m)
	d := time.Second
	for i := uint64(1); i < n && d < 30*time.Second; i++ {
		d *= 2
	}
	return min(d, 30*time.Second)
}

// delivered is how many times m was handed out, this time included.
func delivered(m jetstream.Msg) uint64 {
	if md, err := m.Metadata(); err == nil {
		return md.NumDelivered
	}
	return 1
}

// eventBatch is how many events a server asks for at a time.
const eventBatch = 100

// eventsAckWait is how long events taken by a server that died wait before
// another folds them: well beyond what folding a batch takes, even on a
// loaded bus, since an event folded at once by two servers could start a
// volume's growth twice.
const eventsAckWait = 30 * time.Second

// eventsMaxDeliver bounds how many times an event is handed out: one whose
// folding keeps failing while the bus delivers (its delays add up to about
// an hour) is given up on rather than held for ever, where enough of them
// would stop the folding of every other. The bus being away delivers
// nothing, and so counts nothing.
const eventsMaxDeliver = 125

// foldEvent folds one event, which arrived on subject. It returns an error
// when folding failed (a write to the bus); an event that cannot be read,
// or that names another instance than the subject its sender may publish
// on, is skipped.
func (s *Server) foldEvent(ctx context.Context, subject string, data []byte) error {
	var e protocol.Event
	if err := protocol.Decode(data, &e); err != nil {
		s.log.Warn().Err(err).Msg("an event does not decode; skipped")
		return nil
	}
	// NATS lets an agent publish only on its own instance's subjects, and
	// only the kinds an agent sends: the subject, not the payload, says
	// who sent the event and about what.
	if from := protocol.InstanceFromSubject(subject); from != e.Instance {
		s.log.Warn().Str("subject", subject).Str("instance", e.Instance).Msg("an event names another instance than its subject; skipped")
		return nil
	}
	if kind := protocol.EventKindFromSubject(subject); kind != e.Kind {
		s.log.Warn().Str("subject", subject).Str("kind", string(e.Kind)).Msg("an event is of another kind than its subject; skipped")
		return nil
	}
	if src := e.Kind.TrustedSource(); src != "" {
		e.Source = src
	} else if e.Source != protocol.SourceAgent && e.Source != protocol.SourceProvisioner {
		s.log.Warn().Str("subject", subject).Str("source", e.Source).Msg("an event from an unknown source; skipped")
		return nil
	}
	defer s.enqueue(e.Instance)
	if e.Kind == protocol.EventSnapshot {
		return s.foldSnapshot(ctx, e)
	}
	if e.Kind == protocol.EventAlert && e.Step == "data-volume-high" && e.Source == protocol.SourceAgent {
		return s.growVolume(ctx, e.Instance, e.ID)
	}
	if e.Kind == protocol.EventMachine && e.OpID != "" {
		if folded, err := s.foldSnapshotStep(ctx, e); folded || err != nil {
			return err
		}
	}
	if op, _, ok := s.st.ops.get(e.OpID); ok && op.Kind == opGrowVolume && op.State == api.OpRunning && op.Instance == e.Instance {
		return s.foldGrowVolume(ctx, op, e)
	}
	if e.Kind == protocol.EventCommand && strings.HasPrefix(e.CommandID, secretCommandPrefix) {
		return s.storeSecret(ctx, e)
	}
	var op opRecord
	found := false
	lc, _, lcFound := s.st.lifecycle.get(e.Instance)
	if lcFound && lc.OpID != "" {
		op, _, found = s.st.ops.get(lc.OpID)
	}
	if (!found || op.State != api.OpRunning) && e.OpID != "" && e.OpID != op.JobID {
		// The copies may lag behind the operation's claim (an agent that
		// answers a command at once): the event's own operation, from the
		// bucket, if it is this instance's.
		fetched, _, err := s.st.ops.fetch(ctx, e.OpID)
		switch {
		case err == nil:
			op, found = fetched, fetched.Instance == e.Instance && !fetched.lifecycleFree()
		case !errors.Is(err, errNotFound):
			return err
		}
	}
	if !found || op.State != api.OpRunning {
		return s.foldLateStep(ctx, e, lc)
	}
	ours := e.OpID == op.JobID || (e.Source == protocol.SourceAgent && e.Generation != 0 && e.Generation == op.Target)
	if e.Kind == protocol.EventCommand && e.CommandID == op.CommandID && op.CommandID != "" {
		if e.Status == protocol.StatusFailed {
			return s.failOp(ctx, op, apiErrorOf(e.Error, "The command failed"))
		}
		var result any = map[string]string{"instanceId": op.Instance, "message": e.Message}
		if len(e.Result) > 0 {
			result = json.RawMessage(e.Result)
		}
		if e.Step == string(protocol.CommandCollectDiagnosis) {
			filed, err := s.fileDiagnosis(ctx, op.Instance, e.CommandID, e.Result)
			if err != nil && foldAgain(err) {
				return err
			}
			if err != nil {
				return s.failOp(ctx, op, &api.Error{ErrorType: string(protocol.CodeUnavailable), Message: "Diagnosis not filed",
					DetailedMessage: err.Error()})
			}
			result = filed
		}
		return s.succeedOp(ctx, op, result, "")
	}
	if !ours || e.Status == protocol.StatusStarted && e.Kind == protocol.EventStep {
		return nil
	}
	name := e.Step
	if e.Source == protocol.SourceProvisioner {
		name = "machine: " + name
	}
	return s.addStep(ctx, op.JobID, name, e)
}
