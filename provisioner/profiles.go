package provisioner

import (
	"context"
	"errors"
	"maps"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// RuntimeProfiles is what a Backend whose machines start with a startup
// identity also does (EC2's startupInstanceProfileArn, as Dataiku's FM):
// give a machine its runtime identity once DSS is set up. Such a backend
// names the runtime profile in the machine's details
// (protocol.DetailRuntimeProfile) when it makes the machine with the
// startup one, and the machine that made it (protocol.DetailMadeBy).
type RuntimeProfiles interface {
	// UseRuntimeProfile gives st's machine the runtime profile its details
	// name. A machine that has it already is left as it is, so that a
	// provisioner that dies after the change and before recording it does
	// it again harmlessly.
	UseRuntimeProfile(ctx context.Context, st protocol.MachineState) error
}

// swapProfiles gives the running machines whose details name a runtime
// profile still to give, and no operation is busy with, that profile once
// their agent (of that machine) reports DSS running at the generation the
// machine was made for, and records it. Only the machines waiting for it
// are looked at: no call for the rest of the fleet.
//
// An agent that lies about being set up only has its own machine's
// identity changed early, to the runtime one the template gives it anyway.
func (p *Provisioner) swapProfiles(ctx context.Context, known map[string]protocol.MachineState) {
	rp, ok := p.cfg.Backend.(RuntimeProfiles)
	if !ok {
		return
	}
	var waiting []protocol.MachineState
	p.mu.Lock()
	for instance, st := range known {
		if st.Status == protocol.MachineRunning && st.Backend == p.cfg.Backend.Name() && !p.active[instance] && st.Details[protocol.DetailRuntimeProfile] != "" {
			waiting = append(waiting, st)
		}
	}
	p.mu.Unlock()
	if len(waiting) == 0 {
		return
	}
	if p.agents == nil {
		kv, err := p.js.KeyValue(ctx, protocol.BucketAgents)
		if err != nil {
			p.log.Warn().Err(err).Msg("agents bucket unreadable; runtime profiles given later")
			return
		}
		p.agents = kv
	}
	for _, st := range waiting {
		if ctx.Err() != nil || !p.leaseHeld() {
			return
		}
		if !p.setUp(ctx, st) {
			continue
		}
		log := p.log.With().Str("instance", st.Instance).Str("machine", st.MachineID).Str("profile", st.Details[protocol.DetailRuntimeProfile]).Logger()
		if err := rp.UseRuntimeProfile(ctx, st); err != nil {
			log.Warn().Err(err).Msg("runtime instance profile not given yet; tried again at the next check")
			continue
		}
		if err := p.recordRuntimeProfile(ctx, st); err != nil {
			log.Warn().Err(err).Msg("runtime instance profile given, not recorded yet; tried again at the next check")
			continue
		}
		log.Info().Msg("startup instance profile replaced by the runtime one")
		p.event(ctx, protocol.Event{Instance: st.Instance, Kind: protocol.EventStep, Step: "runtime-profile", Status: protocol.StatusOK,
			Message: "the startup instance profile was replaced by the runtime one, " + st.Details[protocol.DetailRuntimeProfile]}, "")
	}
}

// setUp reports whether the agent of st's machine says DSS runs at the
// generation the machine was made for.
func (p *Provisioner) setUp(ctx context.Context, st protocol.MachineState) bool {
	e, err := p.agents.Get(ctx, st.Instance)
	if err != nil {
		if !errors.Is(err, jetstream.ErrKeyNotFound) {
			p.log.Warn().Err(err).Str("instance", st.Instance).Msg("agent status unreadable")
		}
		return false
	}
	var ag protocol.AgentStatus
	if protocol.Decode(e.Value(), &ag) != nil {
		return false
	}
	madeBy := st.Details[protocol.DetailMadeBy]
	return madeBy != "" && ag.MachineRequest == madeBy && ag.Generation >= st.Generation &&
		ag.Phase == protocol.PhaseReady && ag.DSS.State == protocol.DSSRunning
}

// recordRuntimeProfile records that st's machine has its runtime profile,
// unless its record changed since it was looked at (another machine, or the
// swap recorded already).
func (p *Provisioner) recordRuntimeProfile(ctx context.Context, st protocol.MachineState) error {
	cur, rev, err := p.machineState(ctx, st.Instance)
	if err != nil {
		return err
	}
	arn := st.Details[protocol.DetailRuntimeProfile]
	if cur.MachineID != st.MachineID || cur.Details[protocol.DetailRuntimeProfile] != arn {
		return nil
	}
	cur.Details = maps.Clone(cur.Details)
	delete(cur.Details, protocol.DetailRuntimeProfile)
	cur.Details[protocol.DetailInstanceProfile] = arn
	_, err = p.putState(ctx, st.Instance, cur, rev)
	return err
}
