// Package local is the provisioner's local backend, the embedded default.
// A machine is an `fm agent` process on this host, with a root folder that
// stands for its OS disk (made anew by every reprovision) and a folder that
// stands for its data volume (kept by deprovision). Machines are their own
// sessions: they outlive the process that started them, and a provisioner
// started again adopts them.
//
// cmd/fm and tests import it. It imports protocol, agent (for the agent's
// config file) and cmdline.
package local

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/fleetmanager/fm/agent"
	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
	"github.com/rs/zerolog"
)

// Config configures the local backend.
type Config struct {
	// Dir holds machines/<instance> (root folders) and volumes/<instance>.
	Dir string
	// AgentBinary is the fm binary machines run.
	AgentBinary string
	// NATSURL is the bus as the agents reach it.
	NATSURL string
	// Archives is the snapshot store; without one, snapshots are refused.
	Archives Archives
	Logger   zerolog.Logger
}

// Backend is the local backend.
type Backend struct {
	cfg Config
	log zerolog.Logger
}

var _ provisioner.Backend = (*Backend)(nil)

// New checks the configuration.
func New(cfg Config) (*Backend, error) {
	if !filepath.IsAbs(cfg.Dir) {
		return nil, fmt.Errorf("local backend: the machines folder must be an absolute path (got %q)", cfg.Dir)
	}
	if cfg.AgentBinary == "" || cfg.NATSURL == "" {
		return nil, errors.New("local backend: the agent binary and the bus URL are required")
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("local backend: %w", err)
	}
	return &Backend{cfg: cfg, log: cfg.Logger.With().Str("component", "local-backend").Logger()}, nil
}

// Name implements provisioner.Backend.
func (b *Backend) Name() string { return "local" }

func (b *Backend) machineDir(instance string) string {
	return filepath.Join(b.cfg.Dir, "machines", instance)
}
func (b *Backend) rootDir(instance string) string {
	return filepath.Join(b.machineDir(instance), "root")
}
func (b *Backend) volumeDir(instance string) string {
	return filepath.Join(b.cfg.Dir, "volumes", instance)
}

// previousVolumeDir is where a restore keeps the volume it replaced.
func (b *Backend) previousVolumeDir(instance string) string {
	return b.volumeDir(instance) + ".previous"
}
func (b *Backend) configPath(instance string) string {
	return filepath.Join(b.rootDir(instance), "etc", "fm-agent.json")
}
func (b *Backend) dssDir(instance string) string {
	return filepath.Join(b.volumeDir(instance), "dataiku", "dss_data")
}

// Reprovision implements provisioner.Backend: a new root folder, the kept
// (or a new) volume folder, and a new agent process.
func (b *Backend) Reprovision(ctx context.Context, req provisioner.Request, cur protocol.MachineState) (protocol.MachineState, error) {
	inst := req.Instance
	if pid, ok := b.agentPID(inst); ok && cur.RequestID == req.ID {
		req.Progress("adopt", fmt.Sprintf("the machine of this request runs (agent pid %d)", pid))
		return b.state(inst, req.Spec, pid), nil
	}
	vol := b.volumeDir(inst)
	staging := vol + ".restore"
	// A redelivered restore whose volume is already in place keeps it.
	restore := req.FromSnapshot != nil && !b.restoredBy(inst, req.ID)
	if snap := req.FromSnapshot; restore {
		// The snapshot is checked in full before anything is replaced.
		_ = os.RemoveAll(staging)
		if err := b.restoreArchive(ctx, *snap, staging); err != nil {
			_ = os.RemoveAll(staging)
			return cur, provisioner.Untouched(err)
		}
		req.Progress("verify-snapshot", fmt.Sprintf("the archive of snapshot %s matches its SHA-256 %s", snap.ID, snap.SHA256))
	}
	if n := b.stopMachine(ctx, inst); n > 0 {
		req.Progress("end-old-machine", fmt.Sprintf("the previous machine was stopped (%d processes)", n))
	}
	if err := os.RemoveAll(b.rootDir(inst)); err != nil {
		return cur, fmt.Errorf("remove the old OS disk: %w", err)
	}
	if snap := req.FromSnapshot; restore {
		if err := b.swapVolume(inst, staging, req.ID); err != nil {
			return cur, err
		}
		req.Progress("data-volume", fmt.Sprintf("data volume made from snapshot %s; the previous one is kept at %s", snap.ID, b.previousVolumeDir(inst)))
	} else if _, err := os.Stat(vol); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(vol, 0o700); err != nil {
			return cur, err
		}
		req.Progress("data-volume", fmt.Sprintf("data volume created (%d GB)", req.Spec.DataVolume.SizeGB))
	} else {
		req.Progress("data-volume", "data volume kept")
	}
	if err := agent.WriteConfigFile(b.configPath(inst), agent.Config{
		Instance: inst, MachineRequest: req.ID, NATSURL: b.cfg.NATSURL, Join: req.Spec.Join, RootDir: b.rootDir(inst), DataDir: vol,
		DataVolumeBytes: uint64(req.Spec.DataVolume.SizeGB) << 30,
		// The machine is a folder on the FM host: its system packages are
		// the host's.
		PackageManager: "none",
	}); err != nil {
		return cur, fmt.Errorf("write the agent's config: %w", err)
	}
	pid, err := b.startAgent(inst)
	if err != nil {
		return cur, err
	}
	req.Progress("boot", fmt.Sprintf("machine up: agent pid %d", pid))
	return b.state(inst, req.Spec, pid), nil
}

// swapVolume puts a restored volume in place, keeping the current one
// aside (replacing what an earlier restore kept). After a crash half-way,
// when the current one is already aside, it only finishes the move.
func (b *Backend) swapVolume(inst, restored, requestID string) error {
	vol, prev := b.volumeDir(inst), b.previousVolumeDir(inst)
	if _, err := os.Stat(vol); err == nil {
		if err := os.RemoveAll(prev); err != nil {
			return fmt.Errorf("remove the volume an earlier restore kept: %w", err)
		}
		if err := os.Rename(vol, prev); err != nil {
			return fmt.Errorf("keep the current volume aside: %w", err)
		}
	}
	if err := os.Rename(restored, vol); err != nil {
		return fmt.Errorf("put the restored volume in place: %w", err)
	}
	return os.WriteFile(vol+".restored-by", []byte(requestID), 0o600)
}

// restoredBy reports whether the volume in place is the one the request
// restored.
func (b *Backend) restoredBy(inst, requestID string) bool {
	by, err := os.ReadFile(b.volumeDir(inst) + ".restored-by")
	return err == nil && string(by) == requestID
}

// Start implements provisioner.Backend.
func (b *Backend) Start(ctx context.Context, req provisioner.Request, cur protocol.MachineState) (protocol.MachineState, error) {
	inst := req.Instance
	if _, err := os.Stat(b.configPath(inst)); err != nil {
		return cur, protocol.Errorf(protocol.CodeFailedPrecondition, "the machine has no OS disk; reprovision the instance")
	}
	if pid, ok := b.agentPID(inst); ok {
		return b.state(inst, req.Spec, pid), nil
	}
	// What is left of a machine that stopped on its own goes first.
	b.stopMachine(ctx, inst)
	pid, err := b.startAgent(inst)
	if err != nil {
		return cur, err
	}
	req.Progress("boot", fmt.Sprintf("machine started: agent pid %d", pid))
	return b.state(inst, req.Spec, pid), nil
}

// Stop implements provisioner.Backend: the agent and DSS are stopped, both
// disks kept.
func (b *Backend) Stop(ctx context.Context, req provisioner.Request, cur protocol.MachineState) (protocol.MachineState, error) {
	n := b.stopMachine(ctx, req.Instance)
	req.Progress("shutdown", fmt.Sprintf("machine stopped (%d processes)", n))
	next := cur
	next.Status, next.MachineID = protocol.MachineStopped, ""
	return next, nil
}

// Deprovision implements provisioner.Backend: the machine and its OS disk
// go, the data volume stays.
func (b *Backend) Deprovision(ctx context.Context, req provisioner.Request, cur protocol.MachineState) (protocol.MachineState, error) {
	b.stopMachine(ctx, req.Instance)
	if err := os.RemoveAll(b.machineDir(req.Instance)); err != nil {
		return cur, fmt.Errorf("remove the machine: %w", err)
	}
	req.Progress("terminate", "machine removed; data volume kept")
	next := cur
	next.Status, next.MachineID = protocol.MachineDeprovisioned, ""
	next.PrivateIP, next.PublicIP, next.PrivateDNS, next.PublicDNS = "", "", "", ""
	return next, nil
}

// Delete implements provisioner.Backend.
func (b *Backend) Delete(ctx context.Context, req provisioner.Request, cur protocol.MachineState) (protocol.MachineState, error) {
	next, err := b.Deprovision(ctx, req, cur)
	if err != nil {
		return next, err
	}
	if req.KeepVolume {
		req.Progress("data-volume", "data volume kept at "+b.volumeDir(req.Instance))
	} else {
		for _, dir := range []string{b.volumeDir(req.Instance), b.previousVolumeDir(req.Instance),
			b.volumeDir(req.Instance) + ".restore", b.volumeDir(req.Instance) + ".restored-by"} {
			if err := os.RemoveAll(dir); err != nil {
				return next, fmt.Errorf("remove the data volume: %w", err)
			}
		}
		req.Progress("data-volume", "data volume deleted")
		next.VolumeID = ""
	}
	next.Status = protocol.MachineDeleted
	return next, nil
}

// GrowVolume implements provisioner.Backend: a folder has no size, so the
// nominal size the agent measures against grows, in its config (for its
// next start) and, through the grow-filesystem command, in the running
// agent.
func (b *Backend) GrowVolume(ctx context.Context, req provisioner.Request, cur protocol.MachineState, sizeGB int) (protocol.MachineState, error) {
	if cfg, err := agent.LoadConfigFile(b.configPath(req.Instance)); err == nil {
		cfg.DataVolumeBytes = uint64(sizeGB) << 30
		if err := agent.WriteConfigFile(b.configPath(req.Instance), cfg); err != nil {
			return cur, fmt.Errorf("write the agent's config: %w", err)
		}
	}
	req.Progress("resize", fmt.Sprintf("data volume grown from %d to %d GB", cur.VolumeSizeGB, sizeGB))
	next := cur
	next.VolumeSizeGB = sizeGB
	return next, nil
}

// Alive implements provisioner.Backend: the agent process of the machine
// still runs.
func (b *Backend) Alive(ctx context.Context, cur protocol.MachineState) (bool, error) {
	_, ok := b.agentPID(cur.Instance)
	return ok, nil
}

func (b *Backend) state(inst string, spec *protocol.MachineSpec, pid int) protocol.MachineState {
	st := protocol.MachineState{
		Instance: inst, Backend: b.Name(), Status: protocol.MachineRunning,
		MachineID: "pid-" + strconv.Itoa(pid), VolumeID: b.volumeDir(inst),
		PrivateIP: "127.0.0.1", PublicIP: "127.0.0.1", PrivateDNS: "localhost", PublicDNS: "localhost",
		Details: map[string]string{"root": b.rootDir(inst), "agentLog": filepath.Join(b.rootDir(inst), "var", "log", "fm-agent.log")},
	}
	if spec != nil {
		st.VolumeSizeGB = spec.DataVolume.SizeGB
	}
	if _, err := os.Stat(b.previousVolumeDir(inst)); err == nil {
		st.Details["previousVolume"] = b.previousVolumeDir(inst)
	}
	return st
}

// agentPID finds the running agent of an instance by its command line,
// which names the instance's config file.
func (b *Backend) agentPID(inst string) (int, bool) {
	pids := cmdline.Find(b.configPath(inst), "agent")
	if len(pids) == 0 {
		return 0, false
	}
	return pids[0], true
}

// startAgent starts the instance's agent in a session of its own, its output
// appended to the machine's log.
func (b *Backend) startAgent(inst string) (int, error) {
	logPath := filepath.Join(b.rootDir(inst), "var", "log", "fm-agent.log")
	if err := os.MkdirAll(filepath.Dir(logPath), 0o755); err != nil {
		return 0, err
	}
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return 0, err
	}
	defer logf.Close()
	cmd := exec.Command(b.cfg.AgentBinary, "agent", "--config", b.configPath(inst), "--log-format", "json")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = b.rootDir(inst)
	cmd.Env = agentEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start the agent: %w", err)
	}
	// Reap it if it exits while this process lives.
	go func() { _ = cmd.Wait() }()
	return cmd.Process.Pid, nil
}

// agentEnv is this process's environment without FM_* variables, which
// would otherwise become the agent's flags.
func agentEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "FM_") {
			env = append(env, kv)
		}
	}
	return env
}

// stopMachine stops the instance's agent, then DSS (as a shutdown would),
// killing what does not stop in time. It returns how many processes it found.
func (b *Backend) stopMachine(ctx context.Context, inst string) int {
	agents := cmdline.Find(b.configPath(inst), "agent")
	cmdline.Stop(agents, 10*time.Second)
	n := len(agents)
	dss := filepath.Join(b.dssDir(inst), "bin", "dss")
	if _, err := os.Stat(dss); err == nil {
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_ = exec.CommandContext(sctx, dss, "stop").Run()
		cancel()
	}
	rest := cmdline.Find(b.dssDir(inst))
	cmdline.Stop(rest, 5*time.Second)
	return n + len(rest)
}
