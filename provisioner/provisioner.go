package provisioner

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/internal/crashpoint"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// ConsumerName is the provisioner's durable consumer on FM_PROVISION.
const ConsumerName = protocol.ConsumerProvisioner

// Config configures a Provisioner.
type Config struct {
	// Conn is the NATS connection; the caller owns it.
	Conn    *nats.Conn
	Backend Backend
	// Holder names this process in the lease (default: host name, pid and a
	// random part, so that two containers with the same name and pid differ).
	// A process that keeps its name across restarts (fm dev names itself
	// after its data folder) takes its lease back at once after a crash.
	Holder string
	// LeaseTTL must match the fm_leases bucket's TTL (bus.Topology.LeaseTTL).
	LeaseTTL time.Duration
	// CheckInterval is how often running machines are checked to still run.
	CheckInterval time.Duration
	// AckWait is how long a request taken by a provisioner that died waits
	// before it is delivered again (default 30s); a live one renews it
	// while it works. Tests shorten it.
	AckWait time.Duration
	// DefaultDeadline bounds the retries of a request that carries no
	// deadline (default an hour).
	DefaultDeadline time.Duration
	// Crash is passed every crash point of a request's handling (tests).
	Crash crashpoint.Hook
	// OpenSecret opens what the server sealed with FM's secret key (a new
	// machine's join token); nil: a provisioner without the key, which
	// cannot make machines for a server that seals their tokens.
	OpenSecret func(sealed, where string) (string, error)
	// Metrics, if set, is where the provisioner registers its metrics
	// (fm_provisioner_*): the process's registry, served at /metrics.
	Metrics prometheus.Registerer
	Logger  zerolog.Logger
}

// Provisioner consumes provision requests. Create it with New, run it with
// Run, release it with Close.
type Provisioner struct {
	cfg     Config
	log     zerolog.Logger
	js      jetstream.JetStream
	crash   crashpoint.Hook
	metrics *metrics

	machines jetstream.KeyValue
	// agents is fm_agents, read for the machines waiting for their runtime
	// profile (swapProfiles), opened at the first.
	agents jetstream.KeyValue
	// balancers is fm_balancers, the load balancers as made.
	balancers jetstream.KeyValue
	// lease is the one this provisioner last took: workers ask it whether
	// it is still held right before they act.
	lease atomic.Pointer[bus.Lease]
	// held, if set, replaces the lease's answer (tests).
	held func() bool

	// workerIdle is how long a worker with nothing to do stays.
	workerIdle time.Duration

	mu      sync.Mutex
	workers map[string]*worker // per instance, so its requests run in order
	active  map[string]bool    // instances whose machine operation is under way
	wg      sync.WaitGroup
}

// worker runs one instance's requests in order. queued counts the requests
// handed to it and not yet taken, so that it never leaves while one is on
// its way (it would be stranded until the ack wait).
type worker struct {
	ch     chan jetstream.Msg
	queued int
}

// New checks the configuration.
func New(cfg Config) (*Provisioner, error) {
	if cfg.Conn == nil || cfg.Backend == nil {
		return nil, errors.New("provisioner: a NATS connection and a backend are required")
	}
	if cfg.Holder == "" {
		host, _ := os.Hostname()
		cfg.Holder = fmt.Sprintf("%s-%d-%s", host, os.Getpid(), protocol.NewID("p"))
	}
	if cfg.LeaseTTL == 0 {
		cfg.LeaseTTL = 15 * time.Second
	}
	if cfg.CheckInterval == 0 {
		cfg.CheckInterval = 10 * time.Second
	}
	if cfg.AckWait == 0 {
		cfg.AckWait = 30 * time.Second
	}
	if cfg.DefaultDeadline == 0 {
		cfg.DefaultDeadline = time.Hour
	}
	js, err := jetstream.New(cfg.Conn)
	if err != nil {
		return nil, fmt.Errorf("provisioner: %w", err)
	}
	m, err := newMetrics(cfg.Metrics)
	if err != nil {
		return nil, fmt.Errorf("provisioner: metrics: %w", err)
	}
	return &Provisioner{
		cfg: cfg, js: js, crash: cfg.Crash, metrics: m, workerIdle: time.Minute, workers: map[string]*worker{}, active: map[string]bool{},
		log: cfg.Logger.With().Str("component", "provisioner").Str("backend", cfg.Backend.Name()).Logger(),
	}, nil
}

// Run takes the lease and consumes requests while it holds it, until ctx
// ends; it returns once every operation under way has stopped, leaving
// nothing to close. Losing the lease, or no longer being able to prove it
// is held, stops consuming and the work under way until it is taken again.
// It returns at once, with a *bus.LayoutError, on a bus laid out by a
// newer FM.
func (p *Provisioner) Run(ctx context.Context) error {
	for ctx.Err() == nil {
		err := p.runOnce(ctx)
		var layout *bus.LayoutError
		if errors.As(err, &layout) {
			// Waiting cannot help: a newer FM laid the bus out (a
			// downgrade), or no FM did.
			return fmt.Errorf("provisioner: %w", err)
		}
		if err != nil && ctx.Err() == nil {
			p.log.Warn().Err(err).Msg("provisioner paused; retrying")
			select {
			case <-ctx.Done():
			case <-time.After(2 * time.Second):
			}
		}
	}
	// The workers handed back what they had not finished (Nak); make sure
	// that reaches the server before the caller closes the connection, or
	// the next provisioner waits a whole ack wait for it.
	_ = p.cfg.Conn.FlushTimeout(2 * time.Second)
	return nil
}

func (p *Provisioner) consumerConfig() jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable: ConsumerName, AckPolicy: jetstream.AckExplicitPolicy, AckWait: p.cfg.AckWait,
		MaxAckPending: 1000, MaxDeliver: -1, FilterSubject: protocol.SubjectAllProvision,
	}
}

// fetchBatch is how many requests a provisioner asks for at a time.
const fetchBatch = 100

// pull dispatches requests until pulling ends; what is delivered after
// that is handed back at once (bus.Pull).
func (p *Provisioner) pull(pulling, work context.Context, cons jetstream.Consumer) {
	for pulling.Err() == nil {
		err := bus.Pull(pulling, cons, fetchBatch, func(m jetstream.Msg) { p.dispatch(pulling, work, m) })
		if err != nil && pulling.Err() == nil {
			p.log.Warn().Err(err).Msg("provision requests not fetched; retrying")
			select {
			case <-pulling.Done():
			case <-time.After(time.Second):
			}
		}
	}
}

// dispatch hands a request to its instance's worker, so that one instance's
// requests run one after the other while different instances' run in
// parallel.
// A request waiting for room in a busy worker's queue is handed back once
// pulling ends: the work goes on until pulling has ended, so waiting for
// work would never end.
func (p *Provisioner) dispatch(pulling, work context.Context, m jetstream.Msg) {
	instance := protocol.InstanceFromSubject(m.Subject())
	if work.Err() != nil {
		_ = m.Nak() // the lease is lost, or stopping: hand it back at once
		return
	}
	if p.deposed(m, p.log) {
		return
	}
	p.mu.Lock()
	w, ok := p.workers[instance]
	if !ok {
		w = &worker{ch: make(chan jetstream.Msg, 64)}
		p.workers[instance] = w
		p.wg.Add(1)
		go p.worker(work, instance, w)
	}
	w.queued++ // the worker stays until it has taken this one
	p.mu.Unlock()
	p.crash.At("provisioner/dispatch/queued")
	select {
	case w.ch <- m:
	case <-pulling.Done():
		p.mu.Lock()
		w.queued--
		p.mu.Unlock()
		_ = m.Nak() // stopping: hand it back at once
	}
}

func (p *Provisioner) worker(ctx context.Context, instance string, w *worker) {
	defer p.wg.Done()
	idle := time.NewTimer(p.workerIdle)
	defer idle.Stop()
	for {
		select {
		case <-ctx.Done():
			p.mu.Lock()
			if p.workers[instance] == w {
				delete(p.workers, instance)
			}
			p.mu.Unlock()
			// Hand back what was queued, and what a dispatch that found this
			// worker before it left is still about to hand over.
			for {
				p.mu.Lock()
				left := w.queued
				p.mu.Unlock()
				if left == 0 && len(w.ch) == 0 {
					return
				}
				select {
				case m := <-w.ch:
					p.mu.Lock()
					w.queued--
					p.mu.Unlock()
					_ = m.Nak() // never started: hand it back
				case <-time.After(10 * time.Millisecond):
				}
			}
		case m := <-w.ch:
			p.mu.Lock()
			w.queued--
			p.active[instance] = true
			p.mu.Unlock()
			p.handle(ctx, m)
			p.mu.Lock()
			delete(p.active, instance)
			p.mu.Unlock()
			idle.Reset(p.workerIdle)
		case <-idle.C:
			p.mu.Lock()
			if w.queued == 0 {
				delete(p.workers, instance)
				p.mu.Unlock()
				return
			}
			p.mu.Unlock()
			idle.Reset(p.workerIdle)
		}
	}
}

// handle carries out one request and acknowledges it once its outcome is
// recorded. A request already handled (a redelivery after a crash) is
// acknowledged without doing the work again. A failure that may go away by
// itself is retried until the request's deadline.
func (p *Provisioner) handle(ctx context.Context, m jetstream.Msg) {
	// Asked first, before anything is acknowledged, reported or written,
	// and again right before the machine is changed.
	if p.deposed(m, p.log) {
		return
	}
	var req protocol.ProvisionRequest
	if err := protocol.Decode(m.Data(), &req); err != nil {
		p.log.Warn().Err(err).Str("subject", m.Subject()).Msg("provision request rejected")
		instance := protocol.InstanceFromSubject(m.Subject())
		if protocol.ValidToken(instance) {
			p.event(ctx, protocol.Event{Instance: instance, Kind: protocol.EventRejected, Status: protocol.StatusFailed,
				Step: "provision-request", Message: "provision request rejected", Error: protocol.Errorf(protocol.CodeInvalidArgument, "%v", err)}, "")
		}
		_ = m.Term()
		return
	}
	if instance := protocol.InstanceFromSubject(m.Subject()); instance != req.Instance && !req.ForBalancer(instance) {
		// Whoever may publish on one instance's subject must not act on
		// another instance.
		p.log.Warn().Str("subject", m.Subject()).Str("instance", req.Instance).Msg("provision request for another instance than its subject's; rejected")
		_ = m.Term()
		return
	}
	if req.Deadline.IsZero() {
		// From a server that sets none: the default, from when the request
		// was issued (or stored).
		base := req.Issued
		if md, err := m.Metadata(); base.IsZero() && err == nil {
			base = md.Timestamp
		}
		req.Deadline = base.Add(p.cfg.DefaultDeadline)
	}
	log := p.log.With().Str("instance", req.Instance).Str("action", string(req.Action)).Str("request", req.ID).
		Str("op", req.OpID).Str("call_id", req.CallID).Logger()
	point := "provisioner/" + string(req.Action)
	switch req.Action {
	case protocol.ProvisionSnapshot, protocol.ProvisionDeleteSnapshot:
		p.handleBeside(ctx, m, req, log, p.snapshotWork(ctx, req))
		return
	case protocol.ProvisionGrowVolume:
		p.handleBeside(ctx, m, req, log, p.growWork(ctx, req))
		return
	case protocol.ProvisionBalancerApply, protocol.ProvisionBalancerDelete:
		p.handleBalancer(ctx, m, req, p.log.With().Str("load_balancer", req.LoadBalancer.ID).Str("action", string(req.Action)).
			Str("request", req.ID).Str("op", req.OpID).Str("call_id", req.CallID).Logger())
		return
	}
	cur, rev, err := p.machineState(ctx, req.Instance)
	if err != nil {
		log.Warn().Err(err).Msg("machine state unreadable; retrying")
		_ = m.NakWithDelay(2 * time.Second)
		return
	}
	if cur.RequestID == req.ID && !transitional(cur.Status) {
		// Handled to the end already (a redelivery after a crash, or a
		// request published twice): answered as it ended, not done again.
		log.Info().Msg("request already handled; acknowledging it again")
		var opErr error
		if cur.Error != nil {
			opErr = cur.Error
		}
		p.finish(ctx, m, req, cur, opErr, log)
		return
	}
	resumed := cur.RequestID == req.ID // pending: a crash cut it short
	before := cur.Status
	if resumed {
		before = cur.Before
	}
	refusal := p.openJoin(&req)
	if refusal == nil {
		refusal = p.refuse(req, cur, resumed)
	}
	if refusal != nil {
		// Past its deadline (the server has failed the operation and may
		// have sent another), or superseded by a later request or
		// generation: doing it now could make a machine nobody wants or
		// undo what came after it. It is answered for its own operation
		// only. A request cut short by a crash leaves its record failed
		// rather than in transition.
		log.Warn().Err(refusal).Msg("request not carried out")
		next := cur
		if resumed {
			next.Status, next.Before, next.Error = protocol.MachineFailed, "", refusal
			if _, err := p.putState(ctx, req.Instance, next, rev); err != nil {
				_ = m.NakWithDelay(2 * time.Second)
				return
			}
		}
		p.finish(ctx, m, req, next, refusal, log)
		return
	}
	working, done := p.keepInProgress(ctx, m)
	defer done()
	log.Info().Bool("resumed", resumed).Msg("machine operation started")
	pending := cur
	pending.Status, pending.Before, pending.RequestID, pending.Action, pending.Error = transitionalFor(req.Action), before, req.ID, req.Action, nil
	pending.Order = max(cur.Order, req.Order)
	if pending.Instance == "" {
		pending.Instance = req.Instance
	}
	if err := p.crash.Around(point+"/pending-state", func() (err error) {
		rev, err = p.putState(ctx, req.Instance, pending, rev)
		return err
	}); err != nil {
		log.Warn().Err(err).Msg("machine state not written; retrying")
		_ = m.NakWithDelay(2 * time.Second)
		return
	}
	// Right before the machine is changed: the pending state written is
	// what a crash here would leave, and the next holder resumes from it.
	if p.deposed(m, log) {
		return
	}
	next, opErr := p.run(working, p.request(ctx, req), cur)
	if ctx.Err() != nil {
		// Shutting down: hand the request back, to be redelivered (to the
		// next provisioner) and its machine adopted.
		_ = m.Nak()
		return
	}
	if opErr != nil && isTransient(opErr) && time.Now().Before(p.deadline(req)) {
		delay := min(p.retryDelay(m), max(time.Until(p.deadline(req)), time.Second))
		log.Warn().Err(opErr).Dur("retry_in", delay).Msg("machine operation failed for now; retrying")
		p.retrying(ctx, req, fmt.Sprintf("%v; trying again in %s", opErr, delay))
		// The reason stays on record: if the deadline passes first, it is
		// the one given.
		pending.Error = asProtocolError(opErr)
		_, _ = p.putState(ctx, req.Instance, pending, rev)
		_ = m.NakWithDelay(delay)
		return
	}
	switch {
	case opErr != nil && IsUntouched(opErr) && before != "":
		// Nothing changed: the machine keeps its status, with the reason
		// the operation did not go on beside it.
		next = cur
		next.Status, next.Before = before, ""
		next.Error = asProtocolError(opErr)
		log.Warn().Err(opErr).Msg("machine operation refused; the machine was left as it was")
	case opErr != nil:
		if next.Instance == "" {
			next = cur // the backend knows nothing more than before
		}
		next.Status = protocol.MachineFailed
		next.Error = asProtocolError(opErr)
		log.Warn().Err(opErr).Msg("machine operation failed")
	default:
		next.Error = nil
		log.Info().Str("status", string(next.Status)).Msg("machine operation done")
	}
	next.Instance, next.Backend, next.RequestID, next.Action, next.Before = req.Instance, p.cfg.Backend.Name(), req.ID, req.Action, ""
	next.Order = max(cur.Order, req.Order)
	// The backend describes the machine; what the provisioner keeps beside
	// it stays.
	next.Details = keepHandled(next.Details, cur.Details)
	if req.Generation != 0 && (req.Action == protocol.ProvisionReprovision || req.Action == protocol.ProvisionStart) && opErr == nil {
		next.Generation = req.Generation
	}
	if err := p.crash.Around(point+"/result-state", func() error {
		_, err := p.putState(ctx, req.Instance, next, rev)
		return err
	}); err != nil {
		log.Error().Err(err).Msg("machine state not recorded; the request will be redelivered")
		_ = m.NakWithDelay(2 * time.Second)
		return
	}
	p.finish(ctx, m, req, next, opErr, log)
}

// refuse says why a request must not be carried out now, if it must not:
// its deadline passed, a request issued after it was handled since (a late
// copy of it: its acknowledgement was lost, and it came back after the
// instance moved on), or a later generation was provisioned since.
func (p *Provisioner) refuse(req protocol.ProvisionRequest, cur protocol.MachineState, resumed bool) *protocol.Error {
	if !time.Now().Before(p.deadline(req)) {
		why := ""
		if resumed && cur.Error != nil {
			why = "; it last failed with: " + cur.Error.Message
		}
		return protocol.Errorf(protocol.CodeDeadlineExceeded, "%s of %s was not carried out by its deadline, %s%s",
			req.Action, req.Instance, p.deadline(req).Format(time.RFC3339), why)
	}
	if superseded(req, cur) {
		return protocol.Errorf(protocol.CodeAborted, "%s of %s (order %d) is superseded: %s %s (order %d) was handled since",
			req.Action, req.Instance, req.Order, cur.Action, cur.RequestID, cur.Order)
	}
	if (req.Action == protocol.ProvisionReprovision || req.Action == protocol.ProvisionStart) && req.Generation != 0 &&
		cur.Generation > req.Generation && !resumed {
		return protocol.Errorf(protocol.CodeAborted, "%s of %s for generation %d is superseded: generation %d was provisioned since",
			req.Action, req.Instance, req.Generation, cur.Generation)
	}
	return nil
}

// superseded reports whether req comes before the last request handled for
// the instance in the order the server gave them: a late copy of an older
// request, which must not be carried out after a newer one. An unordered
// request (from an older server) is never superseded.
func superseded(req protocol.ProvisionRequest, cur protocol.MachineState) bool {
	return req.ID != cur.RequestID && req.Order != 0 && req.Order < cur.Order
}

// finish reports a request's outcome and acknowledges it. The outcome must
// reach the bus first: an outcome lost would leave the operation waiting
// to its deadline. A request whose report could not be sent is handed
// back; delivered again, it is answered as it ended.
func (p *Provisioner) finish(ctx context.Context, m jetstream.Msg, req protocol.ProvisionRequest, st protocol.MachineState, opErr error, log zerolog.Logger) {
	if err := p.resultEvent(ctx, req, st, opErr); err != nil {
		log.Warn().Err(err).Msg("outcome not reported; the request will be delivered again")
		_ = m.NakWithDelay(p.retryDelay(m))
		return
	}
	p.ack(ctx, m, req, log)
}

// ackTimeout bounds the wait for the bus to confirm an acknowledgement.
const ackTimeout = 5 * time.Second

// ack acknowledges a request handled to its end and waits (a while) for
// the bus to confirm it, so that an acknowledgement lost is noticed. It is
// sent even when ctx has ended: the outcome is recorded, so the request is
// done. One the bus did not confirm is delivered again after the ack wait,
// and then answered as handled (or as superseded) without being done again.
func (p *Provisioner) ack(ctx context.Context, m jetstream.Msg, req protocol.ProvisionRequest, log zerolog.Logger) {
	p.crash.At("provisioner/" + string(req.Action) + "/ack:before")
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), ackTimeout)
	defer cancel()
	if err := m.DoubleAck(actx); err != nil {
		log.Warn().Err(err).Msg("acknowledgement not confirmed by the bus; a redelivery will be answered as handled")
	}
}

// retryDelay grows with each delivery of m: 2s, 4s, … up to a minute.
func (p *Provisioner) retryDelay(m jetstream.Msg) time.Duration {
	n := uint64(1)
	if md, err := m.Metadata(); err == nil {
		n = md.NumDelivered
	}
	d := 2 * time.Second
	for i := uint64(1); i < n && d < time.Minute; i++ {
		d *= 2
	}
	return min(d, time.Minute)
}

// deadline is when a request stops being retried (handle gives every
// request one).
func (p *Provisioner) deadline(req protocol.ProvisionRequest) time.Time {
	return req.Deadline
}

// isTransient reports whether err may go away by itself: the cloud or the
// bus unavailable, a call throttled. Such a failure is retried until the
// request's deadline; anything else fails the operation at once.
func isTransient(err error) bool {
	var pe *protocol.Error
	if errors.As(err, &pe) {
		return pe.Code == protocol.CodeUnavailable
	}
	return bus.Unanswered(err)
}

// keepInProgress keeps a request's message ours while the backend works,
// however long it takes, until the returned cancel is called.
func (p *Provisioner) keepInProgress(ctx context.Context, m jetstream.Msg) (context.Context, context.CancelFunc) {
	return bus.KeepInProgress(ctx, m, p.cfg.AckWait/3)
}

func (p *Provisioner) run(ctx context.Context, req Request, cur protocol.MachineState) (protocol.MachineState, error) {
	b := p.cfg.Backend
	if req.Action == protocol.ProvisionReprovision && req.Snapshot != nil && cur.VolumeID != "" {
		// The snapshot before an upgrade: without it, nothing is replaced.
		ref, err := p.takeSnapshot(ctx, req, cur)
		if err != nil && isTransient(err) && time.Now().Before(p.deadline(req.ProvisionRequest)) {
			return cur, err // tried again later
		}
		if perr := p.snapshotOutcome(ctx, req.ProvisionRequest, ref, err); perr != nil {
			// The outcome must be on record before anything is replaced.
			return cur, protocol.Errorf(protocol.CodeUnavailable, "the snapshot's outcome was not reported: %v", perr)
		}
		if err != nil {
			pe := asProtocolError(err)
			return cur, Untouched(protocol.Errorf(pe.Code, "the snapshot before the upgrade (%s) failed, so the machine was left as it was: %s", ref.ID, pe.Message))
		}
	}
	call := map[protocol.ProvisionAction]func(context.Context, Request, protocol.MachineState) (protocol.MachineState, error){
		protocol.ProvisionReprovision: b.Reprovision, protocol.ProvisionDeprovision: b.Deprovision,
		protocol.ProvisionStart: b.Start, protocol.ProvisionStop: b.Stop, protocol.ProvisionDelete: b.Delete,
	}[req.Action]
	if call == nil {
		return cur, protocol.Errorf(protocol.CodeUnimplemented, "unknown action %q", req.Action)
	}
	began := time.Now()
	next, err := call(ctx, req, cur)
	p.metrics.observe(b.Name(), string(req.Action), began, err)
	return next, err
}

func transitional(s protocol.MachineStatus) bool {
	switch s {
	case protocol.MachineProvisioning, protocol.MachineStopping, protocol.MachineDeprovisioning:
		return true
	}
	return false
}

func transitionalFor(a protocol.ProvisionAction) protocol.MachineStatus {
	switch a {
	case protocol.ProvisionStop:
		return protocol.MachineStopping
	case protocol.ProvisionDeprovision, protocol.ProvisionDelete:
		return protocol.MachineDeprovisioning
	}
	return protocol.MachineProvisioning
}

func asProtocolError(err error) *protocol.Error {
	var pe *protocol.Error
	if errors.As(err, &pe) {
		return pe
	}
	return &protocol.Error{Code: protocol.CodeInternal, Message: err.Error()}
}

// machineState reads the instance's record in fm_machines (zero if none).
func (p *Provisioner) machineState(ctx context.Context, instance string) (protocol.MachineState, uint64, error) {
	var st protocol.MachineState
	e, err := p.machines.Get(ctx, instance)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return st, 0, nil
	}
	if err != nil {
		return st, 0, err
	}
	if err := protocol.Decode(e.Value(), &st); err != nil {
		// An unreadable record is replaced, not trusted.
		p.log.Error().Err(err).Str("instance", instance).Msg("machine state unreadable; it will be rewritten")
		return protocol.MachineState{}, e.Revision(), nil
	}
	return st, e.Revision(), nil
}

// putState writes the record with a revision check (0: it must not exist).
func (p *Provisioner) putState(ctx context.Context, instance string, st protocol.MachineState, rev uint64) (uint64, error) {
	st.Instance, st.Updated = instance, time.Now().UTC()
	if st.Backend == "" {
		st.Backend = p.cfg.Backend.Name()
	}
	data, err := protocol.Encode(&st)
	if err != nil {
		return 0, err
	}
	if rev == 0 {
		return p.machines.Create(ctx, instance, data)
	}
	return p.machines.Update(ctx, instance, data, rev)
}

// resultEvent reports the outcome of a request; its id derives from the
// request's, so that reporting it again is deduplicated.
func (p *Provisioner) resultEvent(ctx context.Context, req protocol.ProvisionRequest, st protocol.MachineState, opErr error) error {
	e := protocol.Event{Instance: req.Instance, Kind: protocol.EventMachine, OpID: req.OpID, Generation: req.Generation,
		Step: string(req.Action), Status: protocol.StatusOK, Message: fmt.Sprintf("machine %s", st.Status)}
	if opErr != nil {
		e.Status, e.Error, e.Message = protocol.StatusFailed, asProtocolError(opErr), opErr.Error()
	}
	return p.crash.Around("provisioner/"+string(req.Action)+"/result-event", func() error {
		return p.publishEvent(ctx, e, resultEventID(req, e.Status))
	})
}

// openJoin opens the join token a request carries sealed, for the
// backend to hand the machine; a token that cannot be opened refuses the
// request (nothing is made) with what the operator must change.
func (p *Provisioner) openJoin(req *protocol.ProvisionRequest) *protocol.Error {
	if req.Spec == nil || req.Spec.Join == nil || req.Spec.Join.SealedToken == "" {
		return nil
	}
	if p.cfg.OpenSecret == nil {
		return protocol.Errorf(protocol.CodeFailedPrecondition,
			"the machine's join token is sealed with FM's secret key, which this provisioner does not hold: start fm provisioner with --secret-key-file (the server's DATA/secrets.key)")
	}
	token, err := p.cfg.OpenSecret(req.Spec.Join.SealedToken, protocol.SealedJoinTokenPlace(req.Instance))
	if err != nil {
		return protocol.Errorf(protocol.CodeFailedPrecondition,
			"the machine's join token does not open with this provisioner's secret key (--secret-key-file must be the server's): %v", err)
	}
	join := *req.Spec.Join
	join.Token, join.SealedToken = token, ""
	spec := *req.Spec
	spec.Join = &join
	req.Spec = &spec
	return nil
}

// resultEventID is the id of the event reporting how req ended: derived
// from the request's, so that reporting it again is a duplicate the bus
// drops, and the same for every kind of request.
func resultEventID(req protocol.ProvisionRequest, status protocol.Status) string {
	return req.ID + "-" + string(status)
}

// progress reports a step of a request as it happens.
func (p *Provisioner) progress(ctx context.Context, req protocol.ProvisionRequest, step string, status protocol.Status, msg string) {
	p.event(ctx, protocol.Event{Instance: req.Instance, Kind: protocol.EventMachine, OpID: req.OpID, Generation: req.Generation,
		Step: step, Status: status, Message: msg}, "")
}

// retrying reports that a request failed for now and will be tried again.
func (p *Provisioner) retrying(ctx context.Context, req protocol.ProvisionRequest, msg string) {
	p.event(ctx, protocol.Event{Instance: req.Instance, Kind: protocol.EventMachine, OpID: req.OpID, Generation: req.Generation,
		Step: string(req.Action), Status: protocol.StatusRetrying, Message: msg}, "")
}

// event publishes a progress event, as best it can: a progress report lost
// loses nothing but a line of the operation's progress. A stopping
// provisioner says nothing more.
func (p *Provisioner) event(ctx context.Context, e protocol.Event, id string) {
	if ctx.Err() != nil {
		return
	}
	if id == "" {
		id = protocol.NewID("ev")
	}
	if err := p.publishEvent(ctx, e, id); err != nil {
		p.log.Warn().Err(err).Str("step", e.Step).Msg("event not published")
	}
}

// publishEvent publishes an event with id as its Nats-Msg-Id, so that a
// repeat is a duplicate the bus drops, and waits for the bus to take it.
func (p *Provisioner) publishEvent(ctx context.Context, e protocol.Event, id string) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	e.ID, e.Source = id, protocol.SourceProvisioner
	if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	data, err := protocol.EncodeEvent(e)
	if err != nil {
		return fmt.Errorf("event not encoded: %w", err)
	}
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err = p.js.Publish(pctx, protocol.EventSubject(e.Instance, e.Kind), data, jetstream.WithMsgID(e.ID))
	return err
}
