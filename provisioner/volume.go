package provisioner

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// growWork grows the instance's data volume. Only the volume's size in
// the machine record changes; the outcome goes to the server as an
// EventMachine of step grow-volume, and the server then has the agent grow
// its file system.
func (p *Provisioner) growWork(ctx context.Context, req protocol.ProvisionRequest) func(context.Context, protocol.MachineState) error {
	return func(working context.Context, cur protocol.MachineState) error {
		var (
			next protocol.MachineState
			err  error
		)
		switch {
		case cur.VolumeID == "":
			err = protocol.Errorf(protocol.CodeFailedPrecondition, "instance %s has no data volume to grow", req.Instance)
		case cur.VolumeSizeGB >= req.VolumeSizeGB:
			next = cur // grown already (a redelivery)
		default:
			err = p.crash.Around("provisioner/grow-volume/backend", func() (err error) {
				began := time.Now()
				next, err = p.cfg.Backend.GrowVolume(working, p.request(ctx, req), cur, req.VolumeSizeGB)
				p.metrics.observe(p.cfg.Backend.Name(), "grow-volume", began, err)
				return err
			})
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		inTime := time.Now().Before(p.deadline(req))
		if err != nil && isTransient(err) && inTime {
			p.retrying(ctx, req, fmt.Sprintf("%v; trying again", err))
			return fmt.Errorf("%w: %v", errRetryLater, err)
		}
		if err == nil && next.VolumeSizeGB != cur.VolumeSizeGB {
			if rerr := p.crash.Around("provisioner/grow-volume/size-recorded", func() error {
				return p.recordVolumeSize(ctx, req.Instance, next.VolumeSizeGB)
			}); rerr != nil {
				if inTime {
					return fmt.Errorf("%w: the grown volume is not recorded: %v", errRetryLater, rerr)
				}
				err = protocol.Errorf(protocol.CodeUnavailable, "the volume was grown to %d GB but its size could not be recorded: %v", next.VolumeSizeGB, rerr)
			}
		}
		if perr := p.growOutcome(ctx, req, next, err); perr != nil {
			return fmt.Errorf("%w: the outcome was not reported: %v", errRetryLater, perr)
		}
		return err
	}
}

// growOutcome reports how growing the volume ended.
func (p *Provisioner) growOutcome(ctx context.Context, req protocol.ProvisionRequest, next protocol.MachineState, err error) error {
	e := protocol.Event{Instance: req.Instance, Kind: protocol.EventMachine, OpID: req.OpID, Step: string(req.Action),
		Status: protocol.StatusOK, Message: fmt.Sprintf("data volume %s is %d GB", next.VolumeID, next.VolumeSizeGB)}
	if err != nil {
		e.Status, e.Error, e.Message = protocol.StatusFailed, asProtocolError(err), err.Error()
	}
	return p.crash.Around("provisioner/grow-volume/result-event", func() error {
		return p.publishEvent(ctx, e, resultEventID(req, e.Status))
	})
}

// recordVolumeSize changes only the volume size of the machine record, so
// that a concurrent change (a machine found lost) is kept.
func (p *Provisioner) recordVolumeSize(ctx context.Context, instance string, sizeGB int) error {
	return p.changeState(ctx, instance, func(st *protocol.MachineState) { st.VolumeSizeGB = sizeGB })
}

// changeState applies change to the instance's record and writes it with a
// revision check, reading it again (a few times) when a concurrent write
// got there first, so that what that write changed is kept. An instance
// without a record is left without one.
func (p *Provisioner) changeState(ctx context.Context, instance string, change func(*protocol.MachineState)) error {
	for attempt := 0; ; attempt++ {
		st, rev, err := p.machineState(ctx, instance)
		if err != nil || rev == 0 {
			return err
		}
		change(&st)
		_, err = p.putState(ctx, instance, st, rev)
		conflict := errors.Is(err, jetstream.ErrKeyRevisionMismatch) || errors.Is(err, jetstream.ErrKeyExists)
		if err == nil || attempt >= 5 || !conflict {
			return err
		}
	}
}

// VolumeSizeGB is the size of an instance's data volume for a backend to
// make or record: the spec's, or what it already is when larger (a volume
// is never shrunk).
func VolumeSizeGB(spec *protocol.MachineSpec, cur protocol.MachineState) int {
	size := cur.VolumeSizeGB
	if spec != nil {
		size = max(size, spec.DataVolume.SizeGB)
	}
	return size
}
