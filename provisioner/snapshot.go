package provisioner

import (
	"context"
	"fmt"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// handleSnapshot takes or deletes a snapshot. It leaves the machine and its
// record alone: a snapshot needs only the data volume, and the outcome goes
// to the server as an EventSnapshot.
func (p *Provisioner) handleSnapshot(ctx context.Context, m jetstream.Msg, req protocol.ProvisionRequest, log zerolog.Logger) {
	cur, _, err := p.machineState(ctx, req.Instance)
	if err != nil {
		log.Warn().Err(err).Msg("machine state unreadable; retrying")
		_ = m.NakWithDelay(2 * time.Second)
		return
	}
	working, done := keepInProgress(ctx, m)
	defer done()
	breq := p.request(ctx, req)
	switch req.Action {
	case protocol.ProvisionSnapshot:
		_, err = p.takeSnapshot(working, breq, cur)
	case protocol.ProvisionDeleteSnapshot:
		p.snapshotEvent(ctx, req, *req.Snapshot, protocol.StatusStarted, nil)
		err = p.cfg.Backend.DeleteSnapshot(working, breq, *req.Snapshot)
		if ctx.Err() == nil {
			p.snapshotEvent(ctx, req, *req.Snapshot, statusOf(err), err)
		}
	}
	if ctx.Err() != nil {
		_ = m.Nak() // shutting down: the next provisioner does it
		return
	}
	if err != nil {
		log.Warn().Err(err).Str("snapshot", req.Snapshot.ID).Msg("snapshot operation failed")
	} else {
		log.Info().Str("snapshot", req.Snapshot.ID).Msg("snapshot operation done")
	}
	_ = m.Ack()
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
