package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

// opGrowVolume grows an instance's data volume: the provisioner grows the
// volume, then the agent its file system. It runs beside the lifecycle.
const opGrowVolume = "grow-volume"

// Growth of a data volume that passed 80%: by half its size, at least
// growMinGB, up to the instance's dataVolumeSizeMaxGB, within growDeadline.
const (
	growMinGB    = 10
	growDeadline = 30 * time.Minute
)

// nextVolumeSize is the size a volume of size GB grows to, capped at max.
func nextVolumeSize(size, maxGB int) int {
	return min(maxGB, max(size+size/2, size+growMinGB))
}

// growVolume answers an agent's data-volume-high alert: a grow-volume
// operation, or, at the maximum size, a failed one that says so. The
// operation's id derives from the alert's, so that an alert delivered
// again (after the growth it asked for, even) is answered once. An error
// is a write to the bus that failed: the alert is folded again.
func (s *Server) growVolume(ctx context.Context, instance, alertID string) error {
	in, ok := s.st.instances.view(instance)
	lc, _, _ := s.st.lifecycle.get(instance)
	m, _, _ := s.st.machines.get(instance)
	if !ok || lc.State != stateRunning || m.VolumeID == "" || in.DataVolumeSizeMaxGB == nil {
		return nil
	}
	for _, row := range s.st.ops.rowsOf(api.OpRunning) {
		if op := row.val; op.Kind == opGrowVolume && op.Instance == instance {
			s.log.Debug().Str("instance", instance).Str("op", op.JobID).Msg("data volume already growing")
			return nil
		}
	}
	sum := sha256.Sum256([]byte(instance + "/" + alertID))
	jobID := "op-" + hex.EncodeToString(sum[:8])
	if _, _, err := s.st.ops.fetch(ctx, jobID); err == nil {
		return nil // this alert was answered
	} else if !errors.Is(err, errNotFound) {
		return err
	}
	maxGB := *in.DataVolumeSizeMaxGB
	if m.VolumeSizeGB >= maxGB {
		op := newRunningOp(ctx, opGrowVolume, instance, growDeadline)
		op.JobID = jobID
		now := time.Now().UTC()
		op.State, op.Alive, op.EndedAt = api.OpFailed, false, &now
		op.Error = &api.Error{ErrorType: string(protocol.CodeResourceExhausted), Message: "Data volume at its maximum size",
			DetailedMessage: fmt.Sprintf("the data volume of %s is over 80%% full and already at its maximum size, %d GB "+
				"(dataVolumeSizeMaxGB): free space on it, or raise the maximum", instance, maxGB)}
		op.step(opGrowVolume, string(protocol.StatusFailed), op.Error.DetailedMessage, now)
		if _, err := s.st.ops.create(ctx, op.JobID, op); errors.Is(err, errExists) {
			return nil
		} else if err != nil {
			return fmt.Errorf("record the refused growth of %s: %w", instance, err)
		}
		s.metrics.observeOp(opGrowVolume, op.State, 0)
		s.recordByFM(ctx, "volume.grow", auditInstances, instance,
			newAPIError(protocol.CodeResourceExhausted, op.Error.Message, "%s", op.Error.DetailedMessage))
		s.log.Warn().Str("instance", instance).Int("sizeGB", m.VolumeSizeGB).Msg(op.Error.DetailedMessage)
		return nil
	}
	target := nextVolumeSize(m.VolumeSizeGB, maxGB)
	op := newRunningOp(ctx, opGrowVolume, instance, growDeadline)
	op.JobID = jobID
	op, err := s.recordBesideOpAs(ctx, op, kindInstance, instance,
		protocol.ProvisionRequest{Action: protocol.ProvisionGrowVolume, VolumeSizeGB: target})
	if errors.Is(err, errExists) {
		return nil
	}
	s.recordByFM(ctx, "volume.grow", auditInstances, instance, err)
	if err != nil {
		s.log.Warn().Err(err).Str("instance", instance).Msg("volume growth not recorded; the alert is folded again")
		return err
	}
	s.log.Info().Str("instance", instance).Int("fromGB", m.VolumeSizeGB).Int("toGB", target).Msg("data volume over 80%: growing it")
	s.publishOp(ctx, op)
	return nil
}

// foldGrowVolume moves a grow-volume operation on: once the provisioner
// grew the volume, the agent grows its file system; the agent's answer
// ends the operation. An error means it may fold if tried again.
func (s *Server) foldGrowVolume(ctx context.Context, op opRecord, e protocol.Event) error {
	switch {
	case e.Kind == protocol.EventMachine && e.Step == opGrowVolume && e.Status == protocol.StatusFailed,
		e.Kind == protocol.EventCommand && e.CommandID == op.CommandID && e.Status == protocol.StatusFailed:
		_, err := s.endOp(ctx, op.JobID, nil, apiErrorOf(e.Error, "The data volume was not grown"))
		return err
	case e.Kind == protocol.EventMachine && e.Step == opGrowVolume && op.CommandID == "":
		m, _, _ := s.st.machines.get(op.Instance)
		var req protocol.ProvisionRequest
		_ = json.Unmarshal(op.Request, &req)
		params, _ := json.Marshal(protocol.GrowFilesystemParams{SizeBytes: uint64(req.VolumeSizeGB) << 30})
		c := protocol.Command{ID: op.JobID + "-cmd", Instance: op.Instance, Kind: protocol.CommandGrowFilesystem, OpID: op.JobID,
			Issued: time.Now().UTC(), Expires: op.Deadline, Params: params, CallID: op.CallID}
		data, err := protocol.Encode(&c)
		if err != nil {
			return nil
		}
		next, err := s.st.ops.change(ctx, op.JobID, func(o *opRecord) bool {
			if o.State != api.OpRunning || o.CommandID != "" {
				return false
			}
			// The volume is grown: the request is done, the command is next.
			o.Request, o.CommandID, o.Command = nil, c.ID, data
			o.step("machine: "+e.Step, string(e.Status), e.Message, e.Time)
			return true
		})
		if err != nil {
			return err
		}
		if next.CommandID == c.ID {
			s.log.Info().Str("instance", op.Instance).Str("volume", m.VolumeID).Int("sizeGB", req.VolumeSizeGB).Msg("volume grown; growing the file system")
			// A failed publish is retried by the sweep, which finds the
			// command missing from FM_COMMANDS.
			s.publishOp(ctx, next)
		}
		return nil
	case e.Kind == protocol.EventCommand && e.CommandID == op.CommandID:
		_, err := s.endOp(ctx, op.JobID, map[string]string{"instanceId": op.Instance, "message": e.Message}, nil)
		return err
	case e.Source == protocol.SourceProvisioner:
		return s.addStep(ctx, op.JobID, "machine: "+e.Step, e)
	}
	return nil
}
