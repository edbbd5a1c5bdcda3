package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/internal/crashpoint"
	"github.com/fleetmanager/fm/internal/objects"
	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// Agent is the daemon of one machine. Create it with New, run it with Run,
// release it with Close.
type Agent struct {
	cfg     Config
	log     zerolog.Logger
	m       *machine
	kits    *kits
	actions *actionRunner
	ship    *logShipper
	logFile *rotatingFile
	front   *httpsFront // DSS over HTTPS (not in a simulated agent)

	// Set by Run.
	box *seal.Box // the instance key, which seals secrets FM and the agent exchange
	// instanceKey is box's key, which also seals diagnosis bundles as
	// streams (seal.NewStreamWriter).
	instanceKey []byte
	credsMu     sync.Mutex
	creds       []byte // the NATS credentials a join gave (in memory), renewed
	// credsRefused tells renewCredentials that NATS refused the
	// credentials before their time (renew.go); refusedRenewals counts the
	// renewals that followed since the connection last came up.
	credsRefused    chan struct{}
	refusedRenewals atomic.Int32
	// presented is the credentials the connection last connected (or
	// tried to) with: a refusal of older ones is no news.
	presented atomic.Pointer[[]byte]
	nc        *nats.Conn
	js        jetstream.JetStream
	rep       *reporter
	desired   *desiredWatch
	cursor    commandCursor
	// stepOp is the operation of the command the machine is held for, if
	// any: its steps carry it (stepEvent).
	stepOp atomic.Value

	// stopping is set when Run's context ends: what fails from then on was
	// cut short, not broken.
	stopping atomic.Bool
	// nominalVolume is the data volume's nominal size (cfg.DataVolumeBytes
	// until a grow-filesystem command changes it).
	nominalVolume atomic.Uint64

	// machineMu is held by whatever changes the machine (the startup
	// sequence, a command, the watchdog's restart), so that they never
	// overlap.
	machineMu sync.Mutex
	// installLock is the install lock while the agent holds it (a
	// convergence, a command that touches DSS, the watchdog; machineMu
	// held), for the installer to inherit, and for a crash test to drop
	// with the process it kills.
	installLock atomic.Pointer[os.File]

	// firstTry is when the agent first worked on generation firstTryGen:
	// without a deadline in the desired state, transient failures are
	// retried for an hour from then.
	firstTryMu  sync.Mutex
	firstTry    time.Time
	firstTryGen uint64

	crash crashpoint.Hook

	// selfSHA is the digest of cfg.Binary as it started; upgradeMu orders
	// what reads and writes the upgrade marker (selfupgrade.go); restart
	// ends Run with ErrRestart.
	selfSHA   string
	upgradeMu sync.Mutex
	restart   context.CancelCauseFunc
	// upgradeLead and deadlineMargin are minDownloadTime and
	// deadlineMargin (tests shorten them); systemdRun runs systemd-run
	// (tests record it).
	upgradeLead, deadlineMargin time.Duration
	systemdRun                  func(ctx context.Context, args ...string) (string, error)

	// commandsReconnected tells runCommands that the connection came back:
	// commands stored meanwhile were not received.
	commandsReconnected chan struct{}
	// liveCommands and commandsRecheck are the constants of those names
	// (tests shrink them).
	liveCommands    int
	commandsRecheck time.Duration
	// commandsDropped counts the commands received while liveCommands
	// waited, caught up with instead.
	commandsDropped atomic.Uint64
	// conn is nc, for BusStatistics from other goroutines.
	conn atomic.Pointer[nats.Conn]

	// convergeTo and execute do the machine's work: a.converge and
	// a.runCommand, or a simulated machine's (Config.Simulated).
	convergeTo func(ctx context.Context, d *protocol.DesiredState) error
	execute    func(ctx context.Context, cmd protocol.Command) commandResult
}

// New checks the configuration and prepares the agent's folders. It does
// not touch the network.
func New(cfg Config) (*Agent, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	a := &Agent{cfg: cfg, crash: cfg.Crash, liveCommands: liveCommands, commandsRecheck: commandsRecheck, upgradeLead: minDownloadTime, deadlineMargin: deadlineMargin}
	a.convergeTo, a.execute = a.converge, a.runCommand
	a.systemdRun = func(ctx context.Context, args ...string) (string, error) {
		out, err := exec.CommandContext(ctx, "systemd-run", args...).CombinedOutput()
		return string(out), err
	}
	if cfg.Simulated {
		a.convergeTo, a.execute = a.simulateConverge, a.simulateCommand
	}
	a.nominalVolume.Store(cfg.DataVolumeBytes)
	a.ship = newLogShipper(cfg.Instance, cfg.Logger)
	a.m = newMachine(cfg, zerolog.Nop())
	for _, dir := range []string{a.m.stateDir, a.m.agentData} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("agent: %w", err)
		}
	}
	// The agent's own log goes where the caller's logger writes, to a
	// rotating file on the machine (for diagnosis bundles) and to FM_LOGS.
	log := cfg.Logger
	if !cfg.Simulated {
		logFile, err := openRotating(a.m.agentLogPath(), 10<<20)
		if err != nil {
			return nil, fmt.Errorf("agent: log file: %w", err)
		}
		a.logFile = logFile
		if cfg.LogOutput != nil {
			log = log.Output(io.MultiWriter(cfg.LogOutput, logFile, sourceWriter{a.ship, protocol.LogSourceAgent}))
		}
	}
	a.log = log.With().Str("component", "agent").Str("instance", cfg.Instance).Logger()
	a.m.log = a.log
	var hostnames []string
	for _, h := range cfg.Hostnames {
		if validHostname(h) {
			hostnames = append(hostnames, h)
		} else {
			a.log.Warn().Str("hostname", h).Msg("a hostname of the config is not a DNS name; the HTTPS front's certificates leave it out")
		}
	}
	a.front = newHTTPSFront(filepath.Join(a.m.agentData, "https"), func() []string { return hostnames }, cfg.HTTPSAddress, a.log)
	a.actions = &actionRunner{m: a.m, http: &http.Client{Timeout: 10 * time.Minute}, lookPath: exec.LookPath}
	if _, err := loadJSON(a.m.cursorPath(), &a.cursor); err != nil {
		a.log.Warn().Err(err).Msg("command cursor unreadable; starting from the first command not yet seen")
		a.cursor = commandCursor{}
	}
	var err error
	if a.selfSHA, err = binaryDigest(cfg.Binary); err != nil {
		// It cannot be replaced either: upgrade-agent says so.
		a.log.Warn().Err(err).Str("binary", cfg.Binary).Msg("the agent's binary cannot be read")
	}
	if a.cursor.Version == 0 {
		// A cursor from before catch-ups were verified (or none): what it
		// ran, it ran in order.
		a.cursor.Version, a.cursor.Verified = cursorVersion, a.cursor.LastSeq
	}
	return a, nil
}

// Run connects to the bus (retrying until it answers) and does the agent's
// work until ctx ends. Bus outages are ridden out: the connection retries
// forever, and each part resumes when it comes back.
//
// It returns ErrRestart when the agent must be executed again from its
// binary (an upgrade of itself, or its rollback), whenever that was asked.
func (a *Agent) Run(ctx context.Context) error {
	ctx, a.restart = context.WithCancelCause(ctx)
	defer a.restart(nil)
	err := a.run(ctx)
	if errors.Is(context.Cause(ctx), ErrRestart) {
		return ErrRestart
	}
	return err
}

func (a *Agent) run(ctx context.Context) error {
	// What the HTTPS front served is served again first: it needs only the
	// machine's files, and DSS stays on HTTPS while FM or the bus is away.
	// It is closed once every part has stopped.
	defer a.front.stop()
	trialUntil, err := a.startUpgradeTrial()
	if err != nil {
		return err
	}
	trialCtx, endTrial := context.WithCancel(ctx)
	defer endTrial()
	go a.watchUpgradeTrial(trialCtx, trialUntil)
	if !a.cfg.Simulated {
		a.front.restore()
		var frontDone sync.WaitGroup
		frontDone.Add(1)
		go func() { defer frontDone.Done(); a.front.run(ctx) }()
		defer frontDone.Wait()
	}
	tlsConf, err := a.cfg.clientTLS()
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	if err := a.join(ctx, tlsConf); err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	if err := a.renewExpired(ctx, tlsConf); err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	var current func() []byte
	if a.currentCreds() != nil {
		current = func() []byte {
			creds := a.currentCreds()
			a.presented.Store(&creds)
			return creds
		}
	}
	reconnected := make(chan struct{}, 1)
	a.commandsReconnected = make(chan struct{}, 1)
	a.credsRefused = make(chan struct{}, 1)
	beatAgain := make(chan struct{}, 1)
	nc, err := bus.Connect(bus.ConnectConfig{
		URL: a.cfg.NATSURL, CredsFile: a.cfg.CredsFile, CurrentCreds: current, TLS: tlsConf, Name: "fm-agent " + a.cfg.Instance,
		InboxPrefix: protocol.InboxPrefix(a.cfg.Instance), RetryOnFailedConnect: true,
		OnConnect: func() {
			a.refusedRenewals.Store(0)
			for _, ch := range []chan struct{}{reconnected, a.commandsReconnected, beatAgain} {
				select {
				case ch <- struct{}{}:
				default:
				}
			}
		},
		OnRefused: func(error) {
			if !a.refusedAreCurrent() {
				return // credentials already renewed: the next try has the new ones
			}
			select {
			case a.credsRefused <- struct{}{}:
			default:
			}
		},
		Logger: a.log,
	})
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	a.nc = nc
	a.conn.Store(nc)
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	a.js = js
	a.rep = newReporter(a.cfg.Instance, a.cfg.Version, nc, js, a.cfg.StatusRefresh, a.log)
	a.rep.reconnected = beatAgain
	a.rep.updateStatus(func(s *protocol.AgentStatus) { s.MachineRequest, s.AgentSHA256 = a.cfg.MachineRequest, a.selfSHA })
	a.kits = &kits{m: a.m, http: &http.Client{}, progressEvery: 5 * time.Second, open: func(ctx context.Context, name string) (kitObject, error) {
		r, err := objects.Open(ctx, js, protocol.ObjectStoreKits, name, kitChunkWait)
		if err != nil {
			return nil, err
		}
		return r, nil
	}}
	a.desired = newDesiredWatch(a.cfg.Instance, nc, a.log, func(err error, rev uint64) {
		a.log.Warn().Err(err).Uint64("revision", rev).Msg("desired state rejected; keeping the last good one")
		a.rep.event(protocol.Event{Kind: protocol.EventRejected, Step: "desired-state", Status: protocol.StatusFailed,
			Message: fmt.Sprintf("desired state at revision %d rejected", rev), Error: protocol.Errorf(protocol.CodeInvalidArgument, "%v", err)})
	})
	a.desired.open = a.openDesired
	sub, err := a.desired.subscribe()
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	defer func() { _ = sub.Unsubscribe() }()

	a.log.Info().Str("version", a.cfg.Version).Str("root", a.cfg.RootDir).Str("data", a.cfg.DataDir).Msg("agent started")
	parts := []func(context.Context){
		func(ctx context.Context) { a.desired.run(ctx, reconnected) },
		a.convergeLoop,
		a.runCommands,
		func(ctx context.Context) { a.renewCredentials(ctx, tlsConf) },
		a.rep.run,
		a.rep.heartbeats,
		a.measure,
	}
	if !a.cfg.Simulated {
		rep := a.rep
		a.front.setChanged(func() {
			st := a.front.status()
			rep.updateStatus(func(s *protocol.AgentStatus) { s.DSS.HTTPS = st })
		})
		a.refreshDSSState(ctx)
		parts = append(parts,
			a.watchdog,
			func(ctx context.Context) { a.ship.run(ctx, a.js) },
			func(ctx context.Context) {
				a.ship.tail(ctx, protocol.LogSourceDSS, a.m.dssLogPath(), filepath.Join(a.m.stateDir, "log-offsets.json"), a.m.openDSSLog)
			})
	}
	var wg sync.WaitGroup
	for _, fn := range parts {
		wg.Add(1)
		go func() { defer wg.Done(); fn(ctx) }()
	}
	<-ctx.Done()
	a.stopping.Store(true)
	wg.Wait()
	// Send what is still queued, for a moment.
	flushCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	a.rep.flush(flushCtx)
	a.log.Info().Msg("agent stopped")
	if errors.Is(ctx.Err(), context.Canceled) {
		return nil
	}
	return ctx.Err()
}

// BusStatistics are the messages and bytes the agent's bus connection has
// sent and received (zero before Run connects).
func (a *Agent) BusStatistics() nats.Statistics {
	if nc := a.conn.Load(); nc != nil {
		return nc.Stats()
	}
	return nats.Statistics{}
}

// Close releases the connection and the log file.
func (a *Agent) Close() {
	if a.nc != nil {
		_ = a.nc.Drain()
		a.nc.Close()
	}
	if a.logFile != nil {
		_ = a.logFile.Close()
	}
}
