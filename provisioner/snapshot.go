package provisioner

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// errRetryLater makes handleBeside hand a request back for a later try.
var errRetryLater = errors.New("retry later")

// handleBeside carries out a request that leaves the machine and its
// record as they are (snapshots, volume growth): do reports the outcome on
// FM_EVENTS itself. On shutdown the request is handed back, to be done
// again by the next provisioner.
func (p *Provisioner) handleBeside(ctx context.Context, m jetstream.Msg, req protocol.ProvisionRequest, log zerolog.Logger,
	do func(ctx context.Context, cur protocol.MachineState) error) {
	cur, _, err := p.machineState(ctx, req.Instance)
	if err != nil {
		log.Warn().Err(err).Msg("machine state unreadable; retrying")
		_ = m.NakWithDelay(2 * time.Second)
		return
	}
	working, done := keepInProgress(ctx, m)
	defer done()
	err = do(working, cur)
	switch {
	case ctx.Err() != nil:
		_ = m.Nak()
	case errors.Is(err, errRetryLater):
		log.Warn().Err(err).Msg("retrying")
		_ = m.NakWithDelay(2 * time.Second)
	case err != nil:
		log.Warn().Err(err).Msg("operation failed")
		_ = m.Ack()
	default:
		log.Info().Msg("operation done")
		_ = m.Ack()
	}
}

// snapshotWork takes or deletes req.Snapshot.
func (p *Provisioner) snapshotWork(ctx context.Context, req protocol.ProvisionRequest) func(context.Context, protocol.MachineState) error {
	return func(working context.Context, cur protocol.MachineState) error {
		breq := p.request(ctx, req)
		if req.Action == protocol.ProvisionSnapshot {
			_, err := p.takeSnapshot(working, breq, cur)
			return err
		}
		p.snapshotEvent(ctx, req, *req.Snapshot, protocol.StatusStarted, nil)
		err := p.cfg.Backend.DeleteSnapshot(working, breq, *req.Snapshot)
		p.snapshotEvent(ctx, req, *req.Snapshot, statusOf(err), err)
		return err
	}
}

// takeSnapshot takes req.Snapshot of the instance's data volume and reports
// it.
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
		ref, err = p.cfg.Backend.Snapshot(ctx, req, cur, want)
	}
	if err != nil {
		ref = want
	}
	ref.ID = want.ID
	if ref.VolumeSizeGB == 0 {
		ref.VolumeSizeGB = cur.VolumeSizeGB
	}
	p.snapshotEvent(ctx, req.ProvisionRequest, ref, statusOf(err), err)
	return ref, err
}

func statusOf(err error) protocol.Status {
	if err != nil {
		return protocol.StatusFailed
	}
	return protocol.StatusOK
}

// request gives a provision request a progress reporter.
func (p *Provisioner) request(ctx context.Context, req protocol.ProvisionRequest) Request {
	return Request{ProvisionRequest: req, Progress: func(step, msg string) {
		p.event(ctx, protocol.Event{Instance: req.Instance, Kind: protocol.EventMachine, OpID: req.OpID, Generation: req.Generation,
			Step: step, Status: protocol.StatusOK, Message: msg}, "")
	}}
}

// snapshotEvent reports a snapshot's progress or outcome; an outcome's id
// derives from the request's, so that reporting it again is deduplicated.
func (p *Provisioner) snapshotEvent(ctx context.Context, req protocol.ProvisionRequest, ref protocol.SnapshotRef, status protocol.Status, err error) {
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
	id := ""
	if status != protocol.StatusStarted {
		// A request has one snapshot at most: its id keeps the event's short
		// (ids are tokens of at most 64 characters).
		id = req.ID + "-" + string(status)
		if req.Action == protocol.ProvisionReprovision {
			id = req.ID + "-snapshot-" + string(status)
		}
	}
	p.event(ctx, e, id)
}
