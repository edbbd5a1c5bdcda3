package fleetsim

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"github.com/fleetmanager/fm/agent"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
	"github.com/rs/zerolog"
)

// backend is the provisioner's backend of a simulated fleet: a machine is
// a simulated agent (agent.Config.Simulated) running in this process, with
// its OS disk and data volume as small folders under dir. Like every
// backend it adopts what it made when asked again for the same request.
type backend struct {
	dir     string // machines/<instance>/<request> and volumes/<instance>
	natsURL string
	version string
	log     zerolog.Logger
	// life is what the agents run under: they outlive the request that
	// started them, and end with the fleet.
	life context.Context

	mu     sync.Mutex
	agents map[string]*simAgent          // by instance
	joins  map[string]*protocol.JoinSpec // by instance: how its machine joined
	wg     sync.WaitGroup
}

var _ provisioner.Backend = (*backend)(nil)

type simAgent struct {
	request string
	a       *agent.Agent
	cancel  context.CancelFunc
	done    chan struct{}
	failed  atomic.Pointer[error] // Run's error, if it returned one
}

func newBackend(life context.Context, dir, natsURL, version string, log zerolog.Logger) *backend {
	return &backend{dir: dir, natsURL: natsURL, version: version, log: log, life: life, agents: map[string]*simAgent{}, joins: map[string]*protocol.JoinSpec{}}
}

func (b *backend) Name() string { return "simulated" }

func (b *backend) rootDir(inst, request string) string {
	return filepath.Join(b.dir, "machines", inst, request)
}
func (b *backend) volumeDir(inst string) string { return filepath.Join(b.dir, "volumes", inst) }

func (b *backend) Reprovision(_ context.Context, req provisioner.Request, cur protocol.MachineState) (protocol.MachineState, error) {
	inst := req.Instance
	if req.Spec == nil {
		return cur, protocol.Errorf(protocol.CodeInvalidArgument, "a reprovision request needs a machine spec")
	}
	b.mu.Lock()
	running := b.agents[inst]
	b.mu.Unlock()
	if running != nil && running.request == req.ID {
		return b.state(inst, req.ID, provisioner.VolumeSizeGB(req.Spec, cur)), nil
	}
	b.stop(inst)
	if err := os.RemoveAll(filepath.Join(b.dir, "machines", inst)); err != nil {
		return cur, fmt.Errorf("remove the previous machine: %w", err)
	}
	if err := b.start(inst, req.ID, req.Spec.Join, uint64(provisioner.VolumeSizeGB(req.Spec, cur))<<30); err != nil {
		return cur, err
	}
	req.Progress("boot", "simulated machine started")
	return b.state(inst, req.ID, provisioner.VolumeSizeGB(req.Spec, cur)), nil
}

func (b *backend) Start(_ context.Context, req provisioner.Request, cur protocol.MachineState) (protocol.MachineState, error) {
	inst := req.Instance
	request := cur.Details["request"]
	if _, err := os.Stat(b.rootDir(inst, request)); request == "" || err != nil {
		return cur, protocol.Errorf(protocol.CodeFailedPrecondition, "the machine has no OS disk; reprovision the instance")
	}
	b.mu.Lock()
	running := b.agents[inst]
	b.mu.Unlock()
	if running == nil {
		// The OS disk keeps the agent's identity: it does not join again.
		b.mu.Lock()
		join := b.joins[inst]
		b.mu.Unlock()
		if err := b.start(inst, request, join, uint64(provisioner.VolumeSizeGB(req.Spec, cur))<<30); err != nil {
			return cur, err
		}
	}
	return b.state(inst, request, provisioner.VolumeSizeGB(req.Spec, cur)), nil
}

func (b *backend) Stop(_ context.Context, req provisioner.Request, cur protocol.MachineState) (protocol.MachineState, error) {
	b.stop(req.Instance)
	next := cur
	next.Status, next.MachineID = protocol.MachineStopped, ""
	return next, nil
}

func (b *backend) Deprovision(_ context.Context, req provisioner.Request, cur protocol.MachineState) (protocol.MachineState, error) {
	b.stop(req.Instance)
	if err := os.RemoveAll(filepath.Join(b.dir, "machines", req.Instance)); err != nil {
		return cur, fmt.Errorf("remove the machine: %w", err)
	}
	next := cur
	next.Status, next.MachineID = protocol.MachineDeprovisioned, ""
	return next, nil
}

func (b *backend) Delete(ctx context.Context, req provisioner.Request, cur protocol.MachineState) (protocol.MachineState, error) {
	next, err := b.Deprovision(ctx, req, cur)
	if err != nil {
		return next, err
	}
	if !req.KeepVolume {
		if err := os.RemoveAll(b.volumeDir(req.Instance)); err != nil {
			return next, fmt.Errorf("remove the data volume: %w", err)
		}
		next.VolumeID = ""
	}
	next.Status = protocol.MachineDeleted
	return next, nil
}

// Alive answers from the agents this process runs: one map lookup each.
func (b *backend) Alive(_ context.Context, machines []protocol.MachineState) (map[string]bool, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make(map[string]bool, len(machines))
	for _, m := range machines {
		sa := b.agents[m.Instance]
		out[m.Instance] = sa != nil && sa.failed.Load() == nil
	}
	return out, nil
}

// errNoSnapshots answers what a simulated machine cannot do: it has no data
// to keep.
var errNoSnapshots = protocol.Errorf(protocol.CodeUnimplemented, "a simulated machine has no data volume to snapshot")

func (b *backend) Snapshot(context.Context, provisioner.Request, protocol.MachineState, protocol.SnapshotRef) (protocol.SnapshotRef, error) {
	return protocol.SnapshotRef{}, provisioner.Untouched(errNoSnapshots)
}

func (b *backend) DeleteSnapshot(context.Context, provisioner.Request, protocol.SnapshotRef) error {
	return nil // none was ever taken
}

func (b *backend) GrowVolume(_ context.Context, _ provisioner.Request, cur protocol.MachineState, sizeGB int) (protocol.MachineState, error) {
	next := cur
	next.VolumeSizeGB = sizeGB
	return next, nil
}

func (b *backend) state(inst, request string, sizeGB int) protocol.MachineState {
	return protocol.MachineState{
		Instance: inst, Backend: b.Name(), Status: protocol.MachineRunning,
		MachineID: "sim-" + request, VolumeID: b.volumeDir(inst), VolumeSizeGB: sizeGB,
		PrivateIP: "127.0.0.1", PrivateDNS: "localhost",
		Details: map[string]string{"request": request},
	}
}

// start runs a simulated agent for the instance's machine made by request.
func (b *backend) start(inst, request string, join *protocol.JoinSpec, volumeBytes uint64) error {
	a, err := agent.New(agent.Config{
		Instance: inst, MachineRequest: request, NATSURL: b.natsURL, Join: join,
		RootDir: b.rootDir(inst, request), DataDir: b.volumeDir(inst), DataVolumeBytes: volumeBytes,
		PackageManager: "none", ServiceManager: "none", Simulated: true, Version: b.version,
		Logger: b.log.With().Str("instance", inst).Logger(),
	})
	if err != nil {
		return fmt.Errorf("simulated agent: %w", err)
	}
	ctx, cancel := context.WithCancel(b.life)
	sa := &simAgent{request: request, a: a, cancel: cancel, done: make(chan struct{})}
	b.mu.Lock()
	b.agents[inst], b.joins[inst] = sa, join
	b.mu.Unlock()
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		defer close(sa.done)
		defer a.Close()
		if err := a.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
			sa.failed.Store(&err)
			b.log.Error().Err(err).Str("instance", inst).Msg("simulated agent ended")
		}
	}()
	return nil
}

// stop ends the instance's agent, if one runs, and waits for it.
func (b *backend) stop(inst string) {
	b.mu.Lock()
	sa := b.agents[inst]
	delete(b.agents, inst)
	b.mu.Unlock()
	if sa != nil {
		sa.cancel()
		<-sa.done
	}
}

// each calls fn for every running agent.
func (b *backend) each(fn func(inst string, a *agent.Agent)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for inst, sa := range b.agents {
		fn(inst, sa.a)
	}
}

// close stops every agent.
func (b *backend) close() {
	b.mu.Lock()
	for _, sa := range b.agents {
		sa.cancel()
	}
	b.mu.Unlock()
	b.wg.Wait()
}
