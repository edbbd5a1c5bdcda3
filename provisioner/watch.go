package provisioner

import (
	"context"
	"errors"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// watchMachines checks, every CheckInterval, that the machines recorded as
// running still run, and records those that do not as lost. It follows
// fm_machines with a watcher, so that a check reads nothing from the bus,
// and asks the backend about every running machine at once.
func (p *Provisioner) watchMachines(ctx context.Context) {
	known := map[string]protocol.MachineState{}
	tick := time.NewTicker(p.cfg.CheckInterval)
	defer tick.Stop()
	for ctx.Err() == nil {
		w, err := p.machines.WatchAll(ctx)
		if err != nil {
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
				continue
			}
		}
		// A new watcher sends every record again: start from nothing so
		// that records deleted meanwhile are forgotten.
		clear(known)
		synced := p.followMachines(ctx, w, tick.C, known)
		_ = w.Stop()
		if !synced && ctx.Err() == nil {
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}
}

// followMachines applies the watcher's updates to known and checks the
// running machines at every tick, until the watcher or ctx ends. It
// reports whether the watcher had sent its initial values.
func (p *Provisioner) followMachines(ctx context.Context, w jetstream.KeyWatcher, tick <-chan time.Time, known map[string]protocol.MachineState) bool {
	synced := false
	for {
		select {
		case <-ctx.Done():
			return synced
		case e, ok := <-w.Updates():
			if !ok {
				return synced
			}
			if e == nil {
				synced = true
				continue
			}
			var st protocol.MachineState
			if e.Operation() != jetstream.KeyValuePut || protocol.Decode(e.Value(), &st) != nil {
				delete(known, e.Key())
				continue
			}
			known[e.Key()] = st
		case <-tick:
			if synced {
				p.checkMachines(ctx, known)
				p.swapProfiles(ctx, known)
			}
		}
	}
}

// checkMachines asks the backend about the running machines no operation
// is busy with, and records those that stopped as lost.
func (p *Provisioner) checkMachines(ctx context.Context, known map[string]protocol.MachineState) {
	var running []protocol.MachineState
	p.mu.Lock()
	for instance, st := range known {
		if st.Status == protocol.MachineRunning && st.Backend == p.cfg.Backend.Name() && !p.active[instance] {
			running = append(running, st)
		}
	}
	p.mu.Unlock()
	if len(running) == 0 {
		return
	}
	began := time.Now()
	alive, err := p.cfg.Backend.Alive(ctx, running)
	p.metrics.observe(p.cfg.Backend.Name(), "alive", began, err)
	if err != nil {
		// Unknown is not lost: the machines are checked again next time.
		p.log.Warn().Err(err).Int("machines", len(running)).Msg("machine check failed")
	}
	for _, st := range running {
		if up, known := alive[st.Instance]; known && !up {
			p.markLost(ctx, st)
		}
	}
}

// markLost records a machine that stopped on its own as lost, unless its
// record changed since it was checked (an operation began meanwhile).
func (p *Provisioner) markLost(ctx context.Context, checked protocol.MachineState) {
	p.mu.Lock()
	busy := p.active[checked.Instance]
	p.mu.Unlock()
	if busy {
		return
	}
	cur, rev, err := p.machineState(ctx, checked.Instance)
	if err != nil || cur.Status != protocol.MachineRunning || cur.MachineID != checked.MachineID || cur.RequestID != checked.RequestID {
		return
	}
	cur.Status = protocol.MachineLost
	cur.Error = protocol.Errorf(protocol.CodeUnavailable, "the machine stopped on its own (%s)", cur.MachineID)
	if !p.leaseHeld() {
		return // what it checked may be from before another provisioner took over
	}
	if _, err := p.putState(ctx, checked.Instance, cur, rev); err != nil {
		if !errors.Is(err, jetstream.ErrKeyExists) {
			p.log.Warn().Err(err).Str("instance", checked.Instance).Msg("lost machine not recorded; checked again next time")
		}
		return
	}
	p.log.Warn().Str("instance", checked.Instance).Str("machine", cur.MachineID).Msg("machine lost")
	p.event(ctx, protocol.Event{Instance: checked.Instance, Kind: protocol.EventAlert, Step: "machine-lost", Status: protocol.StatusFailed,
		Message: cur.Error.Message, Error: cur.Error}, "")
}
