package provisioner

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// errRetryLater makes handleBeside hand a request back for a later try.
var errRetryLater = errors.New("retry later")

// handleBeside carries out a request that leaves the machine as it is
// (snapshots, volume growth): do reports the outcome on FM_EVENTS itself,
// unless it fails in a way that may go away by itself, which is retried
// until the request's deadline. On shutdown the request is handed back, to
// be done again by the next provisioner. Once its outcome is reported, the
// request is recorded as handled in the machine record before it is
// acknowledged: delivered again later (its acknowledgement lost), it is
// acknowledged without being done again, where doing it again could take a
// snapshot deleted since (an archive nobody refers to).
func (p *Provisioner) handleBeside(ctx context.Context, m jetstream.Msg, req protocol.ProvisionRequest, log zerolog.Logger,
	do func(ctx context.Context, cur protocol.MachineState) error) {
	cur, _, err := p.machineState(ctx, req.Instance)
	if err != nil {
		log.Warn().Err(err).Msg("machine state unreadable; retrying")
		_ = m.NakWithDelay(2 * time.Second)
		return
	}
	if handled(cur, req.ID) {
		log.Info().Msg("request already handled; acknowledging it again")
		p.ack(ctx, m, req, log)
		return
	}
	if !time.Now().Before(p.deadline(req)) {
		// The server has failed the operation: done now, its result would
		// be kept nowhere (an archive nobody refers to).
		refusal := protocol.Errorf(protocol.CodeDeadlineExceeded, "%s of %s was not carried out by its deadline", req.Action, req.Instance)
		if err := p.besideOutcome(ctx, req, refusal); err != nil {
			_ = m.NakWithDelay(p.retryDelay(m))
			return
		}
		p.ack(ctx, m, req, log)
		return
	}
	if p.deposed(m, log) {
		return
	}
	working, done := p.keepInProgress(ctx, m)
	defer done()
	err = do(working, cur)
	switch {
	case ctx.Err() != nil:
		_ = m.Nak()
		return
	case errors.Is(err, errRetryLater):
		delay := p.retryDelay(m)
		log.Warn().Err(err).Dur("retry_in", delay).Msg("retrying")
		_ = m.NakWithDelay(delay)
		return
	case err != nil:
		log.Warn().Err(err).Msg("operation failed")
	default:
		log.Info().Msg("operation done")
	}
	if err := p.crash.Around("provisioner/"+string(req.Action)+"/handled", func() error {
		return p.recordHandled(ctx, req.Instance, req.ID)
	}); err != nil {
		// Delivered again, it is done again (the backend finds what it did)
		// and reported again under the same event id.
		log.Warn().Err(err).Msg("request not recorded as handled; it will be delivered again")
		_ = m.NakWithDelay(p.retryDelay(m))
		return
	}
	p.ack(ctx, m, req, log)
}

// snapshotWork takes or deletes req.Snapshot.
func (p *Provisioner) snapshotWork(ctx context.Context, req protocol.ProvisionRequest) func(context.Context, protocol.MachineState) error {
	return func(working context.Context, cur protocol.MachineState) error {
		breq := p.request(ctx, req)
		var (
			ref protocol.SnapshotRef
			err error
		)
		if req.Action == protocol.ProvisionSnapshot {
			ref, err = p.takeSnapshot(working, breq, cur)
		} else {
			ref = *req.Snapshot
			p.snapshotEvent(ctx, req, ref, protocol.StatusStarted, nil)
			err = p.crash.Around("provisioner/delete-snapshot/backend", func() error {
				began := time.Now()
				err := p.cfg.Backend.DeleteSnapshot(working, breq, ref)
				p.metrics.observe(p.cfg.Backend.Name(), "delete-snapshot", began, err)
				return err
			})
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil && isTransient(err) && time.Now().Before(p.deadline(req)) {
			p.retrying(ctx, req, fmt.Sprintf("%v; trying again", err))
			return fmt.Errorf("%w: %v", errRetryLater, err)
		}
		if perr := p.snapshotOutcome(ctx, req, ref, err); perr != nil {
			return fmt.Errorf("%w: the outcome was not reported: %v", errRetryLater, perr)
		}
		return err
	}
}

// besideOutcome reports the failure of a request beside the lifecycle
// that was not carried out.
func (p *Provisioner) besideOutcome(ctx context.Context, req protocol.ProvisionRequest, failure error) error {
	if req.Action == protocol.ProvisionGrowVolume {
		return p.growOutcome(ctx, req, protocol.MachineState{}, failure)
	}
	return p.snapshotOutcome(ctx, req, *req.Snapshot, failure)
}

// takeSnapshot takes req.Snapshot of the instance's data volume; the
// caller reports the outcome (snapshotOutcome).
func (p *Provisioner) takeSnapshot(ctx context.Context, req Request, cur protocol.MachineState) (protocol.SnapshotRef, error) {
	want := *req.Snapshot
	p.snapshotEvent(ctx, req.ProvisionRequest, want, protocol.StatusStarted, nil)
	var (
		ref protocol.SnapshotRef
		err error
	)
	if cur.VolumeID == "" {
		err = protocol.Errorf(protocol.CodeFailedPrecondition, "instance %s has no data volume to snapshot", req.Instance)
	} else {
		err = p.crash.Around("provisioner/"+string(req.Action)+"/snapshot", func() (err error) {
			began := time.Now()
			ref, err = p.cfg.Backend.Snapshot(ctx, req, cur, want)
			p.metrics.observe(p.cfg.Backend.Name(), "snapshot", began, err)
			return err
		})
	}
	if err != nil {
		ref = want
	}
	ref.ID = want.ID
	if ref.VolumeSizeGB == 0 {
		ref.VolumeSizeGB = cur.VolumeSizeGB
	}
	return ref, err
}

// snapshotOutcome reports how a snapshot or its deletion ended, and says
// whether the bus took the report.
func (p *Provisioner) snapshotOutcome(ctx context.Context, req protocol.ProvisionRequest, ref protocol.SnapshotRef, err error) error {
	return p.crash.Around("provisioner/"+string(req.Action)+"/snapshot-event", func() error {
		return p.snapshotEvent(ctx, req, ref, statusOf(err), err)
	})
}

func statusOf(err error) protocol.Status {
	if err != nil {
		return protocol.StatusFailed
	}
	return protocol.StatusOK
}

// request gives a provision request a progress reporter. Reporting a step
// passes a crash point first: a backend reports each step once its side
// effect is done, so every step, a new one too, has a crash point after it
// (and, the previous step's, before it).
func (p *Provisioner) request(ctx context.Context, req protocol.ProvisionRequest) Request {
	return Request{ProvisionRequest: req, Progress: func(step, msg string) {
		p.crash.At("provisioner/" + string(req.Action) + "/progress " + step)
		p.progress(ctx, req, step, protocol.StatusOK, msg)
	}, Ongoing: p.ongoing(ctx, req)}
}

// ongoing reports how far a long step got without holding it up (it is
// called from an upload's reads): the reports are published in order by
// one goroutine at a time, and a report made while another is on its way
// replaces any still waiting (the latest wins; the last is always sent).
// Each is dated when it was made, so that the server drops one that comes
// after the step's end.
func (p *Provisioner) ongoing(ctx context.Context, req protocol.ProvisionRequest) func(step, msg string) {
	var (
		mu      sync.Mutex
		waiting *protocol.Event
		sending bool
	)
	return func(step, msg string) {
		e := protocol.Event{Instance: req.Instance, Kind: protocol.EventMachine, OpID: req.OpID, Generation: req.Generation,
			Step: step, Status: protocol.StatusProgress, Message: msg, Time: time.Now().UTC()}
		mu.Lock()
		waiting = &e
		if sending {
			mu.Unlock()
			return
		}
		sending = true
		mu.Unlock()
		go func() {
			for {
				mu.Lock()
				next := waiting
				waiting, sending = nil, next != nil
				mu.Unlock()
				if next == nil {
					return
				}
				p.event(ctx, *next, "")
			}
		}()
	}
}

// snapshotEvent reports a snapshot's progress or outcome; an outcome's id
// derives from the request's, so that reporting it again is deduplicated.
// A progress report is sent as best it can; an outcome's error says
// whether the bus took it.
func (p *Provisioner) snapshotEvent(ctx context.Context, req protocol.ProvisionRequest, ref protocol.SnapshotRef, status protocol.Status, err error) error {
	step := string(protocol.ProvisionSnapshot)
	if req.Action == protocol.ProvisionDeleteSnapshot {
		step = string(protocol.ProvisionDeleteSnapshot)
	}
	e := protocol.Event{Instance: req.Instance, Kind: protocol.EventSnapshot, OpID: req.OpID, Step: step, Status: status, Snapshot: &ref}
	switch status {
	case protocol.StatusStarted:
		e.Message = fmt.Sprintf("%s %s started", step, ref.ID)
	case protocol.StatusOK:
		e.Message = fmt.Sprintf("%s %s done", step, ref.ID)
	case protocol.StatusFailed:
		e.Error, e.Message = asProtocolError(err), err.Error()
	}
	if status == protocol.StatusStarted {
		p.event(ctx, e, "")
		return nil
	}
	// A request has one snapshot at most: its id keeps the event's short
	// (ids are tokens of at most 64 characters). The snapshot a reprovision
	// takes first is not the reprovision's outcome.
	id := resultEventID(req, status)
	if req.Action == protocol.ProvisionReprovision {
		id = req.ID + "-snapshot-" + string(status)
	}
	return p.publishEvent(ctx, e, id)
}
