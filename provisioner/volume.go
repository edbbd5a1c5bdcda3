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

// handleGrow grows the instance's data volume. Only the volume's size in
// the machine record changes; the outcome goes to the server as an
// EventMachine of step grow-volume, and the server then has the agent grow
// its file system.
func (p *Provisioner) handleGrow(ctx context.Context, m jetstream.Msg, req protocol.ProvisionRequest, log zerolog.Logger) {
	cur, _, err := p.machineState(ctx, req.Instance)
	if err != nil {
		log.Warn().Err(err).Msg("machine state unreadable; retrying")
		_ = m.NakWithDelay(2 * time.Second)
		return
	}
	working, done := keepInProgress(ctx, m)
	defer done()
	var next protocol.MachineState
	switch {
	case cur.VolumeID == "":
		err = protocol.Errorf(protocol.CodeFailedPrecondition, "instance %s has no data volume to grow", req.Instance)
	case cur.VolumeSizeGB >= req.VolumeSizeGB:
		next = cur // grown already (a redelivery)
	default:
		next, err = p.cfg.Backend.GrowVolume(working, p.request(ctx, req), cur, req.VolumeSizeGB)
	}
	if ctx.Err() != nil {
		_ = m.Nak()
		return
	}
	if err == nil && next.VolumeSizeGB != cur.VolumeSizeGB {
		err = p.recordVolumeSize(ctx, req.Instance, next.VolumeSizeGB)
		if err != nil {
			log.Warn().Err(err).Msg("grown volume not recorded; retrying")
			_ = m.NakWithDelay(2 * time.Second)
			return
		}
	}
	e := protocol.Event{Instance: req.Instance, Kind: protocol.EventMachine, OpID: req.OpID, Step: string(req.Action),
		Status: protocol.StatusOK, Message: fmt.Sprintf("data volume %s is %d GB", cur.VolumeID, next.VolumeSizeGB)}
	if err != nil {
		e.Status, e.Error, e.Message = protocol.StatusFailed, asProtocolError(err), err.Error()
		log.Warn().Err(err).Msg("data volume not grown")
	} else {
		log.Info().Int("sizeGB", next.VolumeSizeGB).Msg("data volume grown")
	}
	p.event(ctx, e, req.ID+"-"+string(e.Status))
	_ = m.Ack()
}

// recordVolumeSize changes only the volume size of the machine record, so
// that a concurrent change (a machine found lost) is kept.
func (p *Provisioner) recordVolumeSize(ctx context.Context, instance string, sizeGB int) error {
	for attempt := 0; ; attempt++ {
		st, rev, err := p.machineState(ctx, instance)
		if err != nil {
			return err
		}
		st.VolumeSizeGB = sizeGB
		_, err = p.putState(ctx, instance, st, rev)
		conflict := errors.Is(err, jetstream.ErrKeyRevisionMismatch) || errors.Is(err, jetstream.ErrKeyExists)
		if err == nil || attempt >= 5 || !conflict {
			return err
		}
	}
}
