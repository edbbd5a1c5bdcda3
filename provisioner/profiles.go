package provisioner

import (
	"context"
	"errors"
	"maps"
	"time"

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
		if !p.setUp(ctx, st) || p.busy(st.Instance) {
			continue
		}
		log := p.log.With().Str("instance", st.Instance).Str("machine", st.MachineID).Str("profile", st.Details[protocol.DetailRuntimeProfile]).Logger()
		// Bounded: the machine watch waits for it.
		cctx, cancel := context.WithTimeout(ctx, time.Minute)
		err := rp.UseRuntimeProfile(cctx, st)
		cancel()
		if err != nil {
			log.Warn().Err(err).Msg("runtime instance profile not given yet; tried again at the next check")
			continue
		}
		recorded, err := p.recordRuntimeProfile(ctx, st)
		if err != nil {
			log.Warn().Err(err).Msg("runtime instance profile given, not recorded yet; tried again at the next check")
			continue
		}
		if !recorded {
			continue // recorded already, or a request has the machine now: looked at again from its record
		}
		log.Info().Msg("startup instance profile replaced by the runtime one")
		// One event per machine, however many times this runs.
		p.event(ctx, protocol.Event{Instance: st.Instance, Kind: protocol.EventStep, Step: "runtime-profile", Status: protocol.StatusOK,
			Message: "the startup instance profile was replaced by the runtime one, " + st.Details[protocol.DetailRuntimeProfile]},
			"ev-runtime-profile-"+st.MachineID)
	}
}

// busy reports whether a request is being carried out for instance.
func (p *Provisioner) busy(instance string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.active[instance]
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
// and says whether it did: not when its record changed since it was looked
// at (another machine, the swap recorded already, or a request under way,
// whose own writes must find the record as it left it), nor while a request
// is being carried out for the instance. The write is revision-checked: a
// request's write in between makes it fail, and it is tried again from the
// new record at the next check.
func (p *Provisioner) recordRuntimeProfile(ctx context.Context, st protocol.MachineState) (bool, error) {
	cur, rev, err := p.machineState(ctx, st.Instance)
	if err != nil {
		return false, err
	}
	arn := st.Details[protocol.DetailRuntimeProfile]
	if cur.MachineID != st.MachineID || cur.RequestID != st.RequestID || cur.Status != protocol.MachineRunning ||
		cur.Details[protocol.DetailRuntimeProfile] != arn || p.busy(st.Instance) {
		return false, nil
	}
	cur.Details = maps.Clone(cur.Details)
	delete(cur.Details, protocol.DetailRuntimeProfile)
	cur.Details[protocol.DetailInstanceProfile] = arn
	if _, err := p.putState(ctx, st.Instance, cur, rev); err != nil {
		return false, err
	}
	return true, nil
}
