// Package local is the provisioner's local backend, the embedded default.
// A machine is an `fm agent` process on this host, with a root folder that
// stands for its OS disk (made anew by every reprovision) and a folder that
// stands for its data volume (kept by deprovision). Machines are their own
// sessions: they outlive the process that started them, and a provisioner
// started again adopts them.
//
// cmd/fm and tests import it. It imports protocol, provisioner (whose
// Backend it is), provisioner/archive (the snapshot stores), agent (for the
// agent's config file) and the internal atomicfile, cmdline, crashpoint and
// tarball.
package local

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/fleetmanager/fm/agent"
	"github.com/fleetmanager/fm/internal/atomicfile"
	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/fleetmanager/fm/internal/crashpoint"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
	"github.com/rs/zerolog"
)

// Config configures the local backend.
type Config struct {
	// Dir holds machines/<instance> (root folders), volumes/<instance>,
	// snapshots/<snapshot> (work folders) and paused/<instance> (pause
	// markers).
	Dir string
	// AgentBinary is the agent binary machines run: the slim fm-agent build,
	// or fm itself (both take `agent --config …`).
	AgentBinary string
	// NATSURL is the bus as the agents reach it.
	NATSURL string
	// Archives is the snapshot store; without one, snapshots are refused.
	Archives Archives
	// SecretKey is FM's secret key (DATA/secrets.key), which seals snapshot
	// archives: they hold the whole data volume, DSS's own secrets (its
	// license, the admin API key the agent made) included. Without it,
	// snapshots are refused; restores of archives taken before sealing
	// still work.
	SecretKey []byte
	// ProgressEvery is how often a snapshot archive's upload says how far
	// it got (default 5 s).
	ProgressEvery time.Duration
	// Crash is passed every crash point of a machine operation (tests).
	Crash  crashpoint.Hook
	Logger zerolog.Logger
}

// Backend is the local backend.
type Backend struct {
	cfg   Config
	log   zerolog.Logger
	crash crashpoint.Hook
	lbs   *proxies // the load balancers served (balancer.go)
}

var (
	_ provisioner.Backend    = (*Backend)(nil)
	_ provisioner.TakingOver = (*Backend)(nil)
)

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
	if cfg.ProgressEvery == 0 {
		cfg.ProgressEvery = 5 * time.Second
	}
	return &Backend{cfg: cfg, crash: cfg.Crash, lbs: &proxies{}, log: cfg.Logger.With().Str("component", "local-backend").Logger()}, nil
}

// TakeOver implements provisioner.TakingOver: it resumes the machines a
// snapshot left paused (SIGSTOP), each marked by its pause marker
// (pauseMarker), because the provisioner pausing it was killed before it
// resumed it; machines must keep running while FM is away, and no request
// resumes them. Only the lease holder pauses machines, and it has just
// taken the lease, so no marker is a pause under way. A process already
// running takes no notice. It serves the load balancers again too.
func (b *Backend) TakeOver(context.Context) {
	b.serveBalancers()
	markers, err := os.ReadDir(b.pausedDir())
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		b.log.Error().Err(err).Msg("machines a snapshot may have left paused not looked for")
	}
	for _, e := range markers {
		inst := e.Name()
		for _, pid := range b.machineProcesses(inst) {
			_ = syscall.Kill(pid, syscall.SIGCONT)
		}
		if err := os.Remove(b.pauseMarker(inst)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			b.log.Warn().Err(err).Str("instance", inst).Msg("pause marker not removed")
		}
		b.log.Info().Str("instance", inst).Msg("machine a snapshot left paused resumed")
	}
}

// machineProcesses are the processes of an instance's machine: its agent
// and DSS's.
func (b *Backend) machineProcesses(inst string) []int {
	return append(cmdline.Find(b.configPath(inst), "agent"), cmdline.Find(b.dssDir(inst))...)
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
// (or a new) volume folder, and a new agent process. Asked again for the
// same request (a redelivery), it adopts the machine that request made,
// and only that one, and finishes a restore where it stopped.
func (b *Backend) Reprovision(ctx context.Context, req provisioner.Request, cur protocol.MachineState) (protocol.MachineState, error) {
	inst := req.Instance
	if pid, ok := b.agentOf(inst, req.ID); ok {
		req.Progress("adopt", fmt.Sprintf("the machine of this request runs (agent pid %d)", pid))
		st := b.state(inst, pid)
		st.VolumeSizeGB = provisioner.VolumeSizeGB(req.Spec, cur)
		return st, nil
	}
	vol := b.volumeDir(inst)
	pending := b.restoreJournal(inst) // a restore whose move a crash cut short
	if pending != req.ID {
		// Another request's restore, which ended without it (refused past
		// its deadline, failed, or superseded): its volume is not this
		// request's to put in place.
		abandoned, err := b.abandonRestore(inst, pending, req.ID)
		if err != nil {
			return cur, err
		}
		if abandoned {
			req.Progress("abandon-restore", fmt.Sprintf("the restore of request %s, which did not finish, was abandoned; the data volume was kept as it was", pending))
			pending = ""
		}
	}
	if snap := req.FromSnapshot; snap != nil && pending != req.ID && !b.restoredBy(inst, req.ID) {
		// The snapshot is checked in full before anything is replaced.
		staging := b.stagingDir(inst)
		err := b.crash.Around("local/reprovision/extract-snapshot", func() error {
			_ = os.RemoveAll(staging)
			if err := b.restoreArchive(ctx, *snap, staging); err != nil {
				_ = os.RemoveAll(staging)
				return err
			}
			return nil
		})
		if err != nil {
			return cur, provisioner.Untouched(err)
		}
		req.Progress("verify-snapshot", fmt.Sprintf("the archive of snapshot %s matches its SHA-256 %s", snap.ID, snap.SHA256))
		if err := b.crash.Around("local/reprovision/restore-journal", func() error {
			return atomicfile.WriteFile(b.journalPath(inst), []byte(req.ID), 0o600)
		}); err != nil {
			return cur, fmt.Errorf("record the restore: %w", err)
		}
		pending = req.ID
	}
	var n int
	b.crash.Around("local/reprovision/stop-old-machine", func() error { n = b.stopMachine(ctx, inst); return nil })
	if n > 0 {
		req.Progress("end-old-machine", fmt.Sprintf("the previous machine was stopped (%d processes)", n))
	}
	if err := b.crash.Around("local/reprovision/remove-os-disk", func() error { return os.RemoveAll(b.machineDir(inst)) }); err != nil {
		return cur, fmt.Errorf("remove the old OS disk: %w", err)
	}
	switch _, err := os.Stat(vol); {
	case pending != "":
		if err := b.swapVolume(inst, pending); err != nil {
			return cur, err
		}
		req.Progress("data-volume", fmt.Sprintf("data volume restored from a snapshot; the previous one is kept at %s", b.previousVolumeDir(inst)))
	case errors.Is(err, os.ErrNotExist):
		if err := b.crash.Around("local/reprovision/create-volume", func() error { return os.MkdirAll(vol, 0o700) }); err != nil {
			return cur, err
		}
		req.Progress("data-volume", fmt.Sprintf("data volume created (%d GB)", req.Spec.DataVolume.SizeGB))
	default:
		req.Progress("data-volume", "data volume kept")
	}
	sizeGB := provisioner.VolumeSizeGB(req.Spec, cur)
	if err := b.crash.Around("local/reprovision/write-agent-config", func() error {
		return agent.WriteConfigFile(b.configPath(inst), agent.Config{
			Instance: inst, MachineRequest: req.ID, NATSURL: b.cfg.NATSURL, Join: req.Spec.Join, RootDir: b.rootDir(inst), DataDir: vol,
			DataVolumeBytes: uint64(sizeGB) << 30,
			// The machine is a folder on the FM host: its system packages are
			// the host's, and DSS runs as the user FM runs as.
			PackageManager: "none", DSSUser: hostUser(),
			// Its machines' addresses are the FM host's loopback one.
			HTTPSAddress: "127.0.0.1",
		})
	}); err != nil {
		return cur, fmt.Errorf("write the agent's config: %w", err)
	}
	if err := b.crash.Around("local/reprovision/install-agent", func() error { return b.installAgent(inst) }); err != nil {
		return cur, fmt.Errorf("install the agent: %w", err)
	}
	pid, err := b.startAgent(inst, req.ID)
	if err != nil {
		return cur, err
	}
	req.Progress("boot", fmt.Sprintf("machine up: agent pid %d", pid))
	st := b.state(inst, pid)
	st.VolumeSizeGB = sizeGB
	return st, nil
}

// stagingDir is where a restore extracts a snapshot before it replaces the
// volume; journalPath names the restore whose move is under way.
func (b *Backend) stagingDir(inst string) string  { return b.volumeDir(inst) + ".restore" }
func (b *Backend) journalPath(inst string) string { return b.volumeDir(inst) + ".restoring" }

// restoreJournal is the request of a restore whose extracted volume is to
// replace the current one ("" if none).
func (b *Backend) restoreJournal(inst string) string {
	by, err := os.ReadFile(b.journalPath(inst))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(by))
}

// abandonRestore drops what the restore of request other left when
// request, another one, comes: the extracted volume and the journal of a
// restore whose move has not begun (the volume in place is still the
// current one), and an extracted volume that no journal names (a restore
// killed while it extracted). It reports whether it dropped a journal. A
// move under way (the current volume already kept aside, or the restored
// one in place) is not undone: it is finished, by whatever request comes,
// since the volume in place must be whole.
func (b *Backend) abandonRestore(inst, other, request string) (bool, error) {
	vol, staging := b.volumeDir(inst), b.stagingDir(inst)
	exists := func(p string) bool { _, err := os.Stat(p); return err == nil }
	if !exists(staging) {
		return false, nil
	}
	if other == "" {
		err := b.crash.Around("local/reprovision/drop-unrecorded-restore", func() error { return os.RemoveAll(staging) })
		if err != nil {
			return false, fmt.Errorf("remove the volume of an unfinished restore: %w", err)
		}
		return false, nil
	}
	if !exists(vol) {
		return false, nil
	}
	b.log.Warn().Str("instance", inst).Str("restore", other).Str("request", request).
		Msg("a restore that did not finish is abandoned: the data volume stays as it is")
	// The journal goes first: while it names the restore, its extracted
	// volume is known to be waiting, not in place.
	if err := b.crash.Around("local/reprovision/abandon-restore", func() error {
		if err := os.Remove(b.journalPath(inst)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return os.RemoveAll(staging)
	}); err != nil {
		return false, fmt.Errorf("abandon the unfinished restore of request %s: %w", other, err)
	}
	return true, nil
}

// swapVolume puts a restored volume in place, keeping the current one
// aside (replacing what an earlier restore kept). Each step is a rename,
// and which ones are done shows in what is where, so that a retry after a
// crash finishes the move and never mistakes the restored volume for the
// current one: while the extracted volume waits beside, the one in place is
// the current one.
func (b *Backend) swapVolume(inst, requestID string) error {
	vol, prev, staging := b.volumeDir(inst), b.previousVolumeDir(inst), b.stagingDir(inst)
	if _, err := os.Stat(staging); err == nil {
		if _, err := os.Stat(vol); err == nil {
			if err := b.crash.Around("local/reprovision/drop-earlier-kept-volume", func() error { return os.RemoveAll(prev) }); err != nil {
				return fmt.Errorf("remove the volume an earlier restore kept: %w", err)
			}
			if err := b.crash.Around("local/reprovision/keep-volume-aside", func() error { return os.Rename(vol, prev) }); err != nil {
				return fmt.Errorf("keep the current volume aside: %w", err)
			}
		}
		if err := b.crash.Around("local/reprovision/put-restored-volume", func() error { return os.Rename(staging, vol) }); err != nil {
			return fmt.Errorf("put the restored volume in place: %w", err)
		}
	}
	if err := b.crash.Around("local/reprovision/mark-restored", func() error {
		return atomicfile.WriteFile(vol+".restored-by", []byte(requestID), 0o600)
	}); err != nil {
		return fmt.Errorf("record the restore: %w", err)
	}
	if err := os.Remove(b.journalPath(inst)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("record the restore: %w", err)
	}
	return nil
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
	cfg, err := agent.LoadConfigFile(b.configPath(inst))
	if err != nil {
		return cur, protocol.Errorf(protocol.CodeFailedPrecondition, "the machine has no OS disk; reprovision the instance")
	}
	if pid, ok := b.agentOf(inst, cfg.MachineRequest); ok {
		st := b.state(inst, pid)
		st.VolumeSizeGB = provisioner.VolumeSizeGB(req.Spec, cur)
		return st, nil
	}
	// What is left of a machine that stopped on its own goes first.
	b.crash.Around("local/start/stop-leftovers", func() error { b.stopMachine(ctx, inst); return nil })
	pid, err := b.startAgent(inst, cfg.MachineRequest)
	if err != nil {
		return cur, err
	}
	req.Progress("boot", fmt.Sprintf("machine started: agent pid %d", pid))
	st := b.state(inst, pid)
	st.VolumeSizeGB = provisioner.VolumeSizeGB(req.Spec, cur)
	return st, nil
}

// Stop implements provisioner.Backend: the agent and DSS are stopped, both
// disks kept.
func (b *Backend) Stop(ctx context.Context, req provisioner.Request, cur protocol.MachineState) (protocol.MachineState, error) {
	var n int
	b.crash.Around("local/stop/shutdown", func() error { n = b.stopMachine(ctx, req.Instance); return nil })
	req.Progress("shutdown", fmt.Sprintf("machine stopped (%d processes)", n))
	next := cur
	next.Status, next.MachineID = protocol.MachineStopped, ""
	return next, nil
}

// Deprovision implements provisioner.Backend: the machine and its OS disk
// go, the data volume stays.
func (b *Backend) Deprovision(ctx context.Context, req provisioner.Request, cur protocol.MachineState) (protocol.MachineState, error) {
	point := "local/" + string(req.Action)
	b.crash.Around(point+"/shutdown", func() error { b.stopMachine(ctx, req.Instance); return nil })
	if err := b.crash.Around(point+"/remove-os-disk", func() error { return os.RemoveAll(b.machineDir(req.Instance)) }); err != nil {
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
		// The volume goes last: while it is there, a retry knows there is
		// something left to delete.
		for _, f := range []struct{ what, path string }{{"kept-aside-volume", b.previousVolumeDir(req.Instance)},
			{"restore-staging", b.stagingDir(req.Instance)}, {"restore-journal", b.journalPath(req.Instance)},
			{"restore-mark", b.volumeDir(req.Instance) + ".restored-by"}, {"volume", b.volumeDir(req.Instance)}} {
			if err := b.crash.Around("local/delete/remove-"+f.what, func() error { return os.RemoveAll(f.path) }); err != nil {
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
		if err := b.crash.Around("local/grow-volume/write-agent-config", func() error {
			return agent.WriteConfigFile(b.configPath(req.Instance), cfg)
		}); err != nil {
			return cur, fmt.Errorf("write the agent's config: %w", err)
		}
	}
	req.Progress("resize", fmt.Sprintf("data volume grown from %d to %d GB", cur.VolumeSizeGB, sizeGB))
	next := cur
	next.VolumeSizeGB = sizeGB
	return next, nil
}

// Alive implements provisioner.Backend: the agent process of each machine
// still runs. The pid its start recorded is looked at, one process each,
// rather than every process of the host for every machine.
func (b *Backend) Alive(ctx context.Context, machines []protocol.MachineState) (map[string]bool, error) {
	out := make(map[string]bool, len(machines))
	for _, m := range machines {
		if ctx.Err() != nil {
			return out, ctx.Err()
		}
		out[m.Instance] = b.agentRuns(m.Instance)
	}
	return out, nil
}

// agentRuns reports whether the instance's agent runs: the one its pid file
// names, or, without a pid file (a crash right after the start), one found
// by its command line, whose pid is then recorded.
func (b *Backend) agentRuns(inst string) bool {
	cfg := b.configPath(inst)
	if raw, err := os.ReadFile(b.pidPath(inst)); err == nil {
		pid, err := strconv.Atoi(strings.TrimSpace(string(raw)))
		return err == nil && cmdline.Matches(pid, cfg, "agent")
	}
	pids := cmdline.Find(cfg, "agent")
	if len(pids) == 0 {
		return false
	}
	_ = atomicfile.WriteFile(b.pidPath(inst), []byte(strconv.Itoa(pids[0])), 0o600)
	return true
}

func (b *Backend) pidPath(inst string) string { return filepath.Join(b.machineDir(inst), "agent.pid") }

func (b *Backend) state(inst string, pid int) protocol.MachineState {
	st := protocol.MachineState{
		Instance: inst, Backend: b.Name(), Status: protocol.MachineRunning,
		MachineID: "pid-" + strconv.Itoa(pid), VolumeID: b.volumeDir(inst),
		PrivateIP: "127.0.0.1", PublicIP: "127.0.0.1", PrivateDNS: "localhost", PublicDNS: "localhost",
		Details: map[string]string{"root": b.rootDir(inst), "agentLog": filepath.Join(b.rootDir(inst), "var", "log", "fm-agent.log")},
	}
	if _, err := os.Stat(b.previousVolumeDir(inst)); err == nil {
		st.Details["previousVolume"] = b.previousVolumeDir(inst)
	}
	return st
}

// agentOf finds the running agent of an instance's machine made by
// request, by its command line, which names the instance's config file and
// the request: an agent of an earlier machine is not this request's.
func (b *Backend) agentOf(inst, request string) (int, bool) {
	if request == "" {
		return 0, false
	}
	pids := cmdline.Find(b.configPath(inst), "agent", "--machine-request="+request)
	if len(pids) == 0 {
		return 0, false
	}
	return pids[0], true
}

// machineBinary is the agent binary on a machine's OS disk, as a cloud
// machine's user data installs FM's: the agent replaces it when it
// upgrades itself, so each machine has its own.
func (b *Backend) machineBinary(inst string) string {
	return filepath.Join(b.rootDir(inst), "usr", "local", "bin", "fm")
}

// installAgent puts the agent binary on a new machine's OS disk: a hard
// link to AgentBinary (an upgrade renames another file over it, never
// writes into it), or a copy across file systems.
func (b *Backend) installAgent(inst string) error {
	dst := b.machineBinary(inst)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	if err := os.Remove(dst); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err := os.Link(b.cfg.AgentBinary, dst); err == nil {
		return nil
	}
	src, err := os.Open(b.cfg.AgentBinary)
	if err != nil {
		return err
	}
	defer src.Close()
	tmp, err := os.CreateTemp(filepath.Dir(dst), ".fm.*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // after the rename, there is nothing to remove
	if _, err := io.Copy(tmp, src); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o755); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), dst)
}

// startAgent starts the instance's agent for the machine made by request,
// in a session of its own, its output appended to the machine's log, and
// records its pid.
func (b *Backend) startAgent(inst, request string) (int, error) {
	logPath := filepath.Join(b.rootDir(inst), "var", "log", "fm-agent.log")
	if err := os.MkdirAll(filepath.Dir(logPath), 0o755); err != nil {
		return 0, err
	}
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return 0, err
	}
	defer logf.Close()
	// A machine made before machines had their own binary runs FM's.
	bin := b.machineBinary(inst)
	if _, err := os.Stat(bin); err != nil {
		bin = b.cfg.AgentBinary
	}
	cmd := exec.Command(bin, "agent", "--config", b.configPath(inst), "--machine-request="+request, "--log-format", "json")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = b.rootDir(inst)
	cmd.Env = agentEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	b.crash.At("local/start-agent:before")
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start the agent: %w", err)
	}
	// Reap it if it exits while this process lives.
	go func() { _ = cmd.Wait() }()
	pid := cmd.Process.Pid
	b.crash.At("local/start-agent:after")
	if err := atomicfile.WriteFile(b.pidPath(inst), []byte(strconv.Itoa(pid)), 0o600); err != nil {
		return 0, fmt.Errorf("record the agent's pid: %w", err)
	}
	return pid, nil
}

// hostUser is the user this process runs as: a local machine's DSS runs as
// it, since the machine is a folder of its files.
func hostUser() string {
	if u, err := user.Current(); err == nil {
		return u.Username
	}
	return ""
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
