package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"regexp"
	"strconv"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// commandResult is what a command handler gives back.
type commandResult struct {
	message string
	output  string
	result  any
	secret  bool // result holds a credential
	// restart: the agent restarts on a new binary, which answers (the
	// command stays recorded as running).
	restart bool
	err     *protocol.Error
}

// runCommands runs the instance's commands until ctx ends. FM_COMMANDS
// republishes each command as it is stored on the instance's live subject,
// with its stream sequence; the agent listens there, and asks FM for the
// commands stored after those it knows it has handled
// (protocol.CommandsAfterRequest, from the cursor's Verified) when it
// starts, after every reconnection, when its subscription dropped some
// that came faster than they ran, and every commandsRecheck. A live
// command runs at once only when the agent is in step with the stream (a
// catch-up ended with nothing after it, on this connection, and none is
// due); otherwise it is left to the catch-up, which runs the commands in
// stream order. A catch-up also runs a command stored before the last one
// run that the agent never ran (its live copy was lost on the way: a
// failed route between bus nodes). A command seen twice runs once. No
// per-agent state exists on the bus.
func (a *Agent) runCommands(ctx context.Context) {
	live := make(chan *nats.Msg, a.liveCommands)
	sub, err := a.nc.ChanSubscribe(protocol.CommandLiveSubject(a.cfg.Instance), live)
	for err != nil {
		// Only a closed connection refuses a subscription: the agent is
		// stopping.
		a.log.Error().Err(err).Msg("commands cannot be received")
		select {
		case <-ctx.Done():
			return
		case <-time.After(15 * time.Second):
		}
		sub, err = a.nc.ChanSubscribe(protocol.CommandLiveSubject(a.cfg.Instance), live)
	}
	defer func() { _ = sub.Unsubscribe() }()
	recheck := time.NewTimer(a.commandsRecheck/2 + randomDuration(a.commandsRecheck))
	defer recheck.Stop()
	wake := time.NewTimer(0) // at due
	defer wake.Stop()
	// The agent is in step with the stream while no catch-up is due (due
	// is zero only once one ended with nothing after it) and the
	// connection has not been re-made since it began (syncedAt).
	var (
		due      = time.Now() // of the next page of a catch-up; zero when none is due
		backoff  = time.Second
		from     = a.cursor.Verified // where the catch-up under way reads from
		syncedAt uint64
		dropped  int
	)
	catchUp := func(in time.Duration) {
		if due.IsZero() {
			due, from = time.Now().Add(in), a.cursor.Verified
		}
	}
	for ctx.Err() == nil {
		if !due.IsZero() && !time.Now().Before(due) {
			reconnects := a.nc.Stats().Reconnects
			last, resp, err := a.catchUpCommands(ctx, from)
			switch {
			case ctx.Err() != nil:
				return
			case isPaced(err):
				// Asked again within FM's pace (drops come in bursts).
				due = time.Now().Add(commandsPageWait)
			case err != nil:
				a.log.Debug().Err(err).Dur("retry_in", backoff).Msg("commands not caught up")
				due, backoff = time.Now().Add(backoff), min(2*backoff, 15*time.Second)
			case resp.Reset:
				a.log.Warn().Uint64("after", from).Msg("FM_COMMANDS holds no command that far (a bus restored or replaced): catching up from its first, running only commands not run yet")
				a.cursor.LastSeq, a.cursor.Verified, a.cursor.Unverified = 0, 0, 0
				a.saveCursor()
				due, from, backoff = time.Now(), 0, time.Second
			default:
				// Every command up to the page's last has been seen.
				if last > a.cursor.Verified {
					save := a.cursor.Unverified >= verifiedSaveAfter
					a.cursor.Verified, a.cursor.Unverified = last, 0
					if save {
						a.saveCursor()
					}
				}
				if resp.More {
					due, from, backoff = time.Now().Add(commandsPageWait), last, time.Second
				} else {
					due, backoff, syncedAt = time.Time{}, time.Second, reconnects
				}
			}
		}
		var wait <-chan time.Time
		if !due.IsZero() {
			wake.Reset(time.Until(due))
			wait = wake.C
		}
		select {
		case <-ctx.Done():
			return
		case <-wait:
		case <-a.commandsReconnected:
			// A fleet's agents reconnect together after a bus restart: each
			// catches up at a random moment of the next commandsJitter.
			if a.nc.Stats().Reconnects != syncedAt {
				catchUp(randomDuration(commandsJitter))
			}
		case <-recheck.C:
			recheck.Reset(a.commandsRecheck/2 + randomDuration(a.commandsRecheck))
			catchUp(0)
		case m := <-live:
			// Before anything else: what filled the queue may not be
			// commands (answers another agent has sent here).
			if n, _ := sub.Dropped(); n > dropped {
				a.log.Info().Int("dropped", n-dropped).Msg("commands came faster than they ran; catching up")
				a.commandsDropped.Add(uint64(n - dropped))
				dropped = n
				catchUp(0)
			}
			seq, ok := a.liveCommand(m)
			if !ok {
				continue
			}
			switch {
			case !due.IsZero():
				// The catch-up under way or due runs it, in order.
			case a.nc.Stats().Reconnects != syncedAt:
				// Commands stored while the connection was down were not
				// received: this one waits for them.
				catchUp(randomDuration(commandsJitter))
			case seq > a.cursor.LastSeq:
				a.handleCommand(ctx, m.Data, seq)
				if a.cursor.Unverified >= verifiedSaveAfter {
					// Before those run since the last catch-up outnumber
					// the ids the cursor keeps.
					catchUp(0)
				}
			case a.neverRan(m.Data):
				// Behind the last one run, and never run (a stream that
				// was replaced): a catch-up looks.
				catchUp(0)
			}
		}
	}
}

const (
	// liveCommands is how many commands received wait while one runs;
	// beyond, they are dropped and caught up with.
	liveCommands = 64
	// commandsJitter spreads the catch-ups of agents that reconnect
	// together.
	commandsJitter = 2 * time.Second
	// commandsRecheck is about how often an agent catches up without
	// reason (between half of it and one and a half).
	commandsRecheck = 5 * time.Minute
	// commandsPageWait is the wait between pages of a catch-up: FM answers
	// an instance at most every protocol.CommandsAfterPace.
	commandsPageWait = protocol.CommandsAfterPace + 50*time.Millisecond
)

// randomDuration is a random duration in [0, span).
func randomDuration(span time.Duration) time.Duration {
	return time.Duration(mrand.Int64N(int64(span)))
}

// liveCommand is the stream sequence of a command republished by
// FM_COMMANDS on the instance's live subject, and false for anything else
// that arrives there: NATS does not check the reply subject a client
// names, so another agent may have an answer to its own request sent to
// this subject (a direct get's, which carries a Nats-Sequence too). Only
// FM_COMMANDS, which no agent can read, republishes with its own name and
// the command's subject of this instance.
func (a *Agent) liveCommand(m *nats.Msg) (uint64, bool) {
	if m.Header.Get(jetstream.StreamHeader) != protocol.StreamCommands ||
		protocol.InstanceOfCommandSubject(m.Header.Get(jetstream.SubjectHeader)) != a.cfg.Instance {
		return 0, false
	}
	seq, err := strconv.ParseUint(m.Header.Get(jetstream.SequenceHeader), 10, 64)
	return seq, err == nil && seq > 0
}

// catchUpCommands asks FM for the commands stored after sequence after and
// handles them: those after the last one run, and those before it that
// were never run (lost on the way). last is the sequence of the last one
// in the answer (after if none).
func (a *Agent) catchUpCommands(ctx context.Context, after uint64) (last uint64, resp protocol.CommandsAfterResponse, err error) {
	data, err := protocol.Encode(&protocol.CommandsAfterRequest{After: after})
	if err != nil {
		return after, resp, err
	}
	askCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	msg, err := a.nc.RequestWithContext(askCtx, protocol.CommandsAfterSubject(a.cfg.Instance), data)
	if err != nil {
		return after, resp, fmt.Errorf("commands catch-up: %w", err)
	}
	if err := protocol.Decode(msg.Data, &resp); err != nil {
		return after, resp, fmt.Errorf("commands catch-up: FM's answer: %w", err)
	}
	if resp.Error != nil {
		return after, resp, fmt.Errorf("commands catch-up: %w", resp.Error)
	}
	last = after
	for _, c := range resp.Commands {
		if ctx.Err() != nil {
			return last, resp, ctx.Err()
		}
		switch {
		case c.Seq <= after:
			// Not asked for: FM's answer is checked to be in order only.
			continue
		case c.Seq > a.cursor.LastSeq:
			a.handleCommand(ctx, c.Command, c.Seq)
		case a.neverRan(c.Command):
			a.log.Warn().Uint64("seq", c.Seq).Msg("a command stored before the last one run was never received; running it now")
			a.handleCommand(ctx, c.Command, c.Seq)
		}
		last = c.Seq
	}
	return last, resp, nil
}

// neverRan says whether data is a command of this instance the agent has
// not finished (by id). Past as many commands since the last catch-up as
// the cursor keeps ids of, it cannot tell, and says no: a command is not
// run twice.
func (a *Agent) neverRan(data []byte) bool {
	var cmd protocol.Command
	if protocol.Decode(data, &cmd) != nil || cmd.Instance != a.cfg.Instance {
		return false
	}
	if a.cursor.Unverified >= recentCommands {
		a.log.Warn().Str("command", cmd.ID).Msg("too many commands since the last catch-up to tell whether this one ran; it is not run")
		return false
	}
	return !a.cursor.seen(cmd.ID)
}

// isPaced says whether FM refused a request for coming too soon.
func isPaced(err error) bool {
	var perr *protocol.Error
	return errors.As(err, &perr) && perr.Code == protocol.CodeResourceExhausted
}

func (a *Agent) saveCursor() {
	if err := saveJSON(a.m.cursorPath(), a.cursor, 0o600); err != nil {
		a.log.Error().Err(err).Msg("command cursor not saved")
	}
}

// handleCommand runs one command message and answers it. A command already
// answered is not run again; one the agent was running when it stopped is
// run again, up to maxCommandAttempts starts. A malformed, unknown or
// expired command gets an error result and nothing else happens.
func (a *Agent) handleCommand(ctx context.Context, data []byte, seq uint64) {
	var cmd protocol.Command
	if err := protocol.Decode(data, &cmd); err != nil {
		a.log.Warn().Err(err).Uint64("seq", seq).Msg("malformed command rejected")
		a.rep.event(protocol.Event{Kind: protocol.EventRejected, Status: protocol.StatusFailed,
			Message: fmt.Sprintf("command at sequence %d rejected", seq),
			Error:   protocol.Errorf(protocol.CodeInvalidArgument, "%v", err)})
		a.commandDone("", seq)
		return
	}
	if cmd.Instance != a.cfg.Instance {
		a.finish(ctx, cmd, commandResult{err: protocol.Errorf(protocol.CodeInvalidArgument, "command for instance %q", cmd.Instance)}, seq)
		return
	}
	if perr := a.openParams(&cmd); perr != nil {
		a.finish(ctx, cmd, commandResult{err: perr}, seq)
		return
	}
	if a.cursor.seen(cmd.ID) {
		a.log.Debug().Str("command", cmd.ID).Msg("command already run; delivered again, ignored")
		if seq > a.cursor.LastSeq {
			a.commandDone(cmd.ID, seq)
		}
		return
	}
	// An upgrade whose new binary is in place is decided even past the
	// command's expiry: kept by the new agent, or answered by the old one
	// after a rollback, rather than a good binary rolled back at its
	// deadline for want of an answer.
	if !cmd.Expires.IsZero() && time.Now().After(cmd.Expires) && !a.upgradeUnderWay(cmd) {
		a.finish(ctx, cmd, commandResult{err: protocol.Errorf(protocol.CodeDeadlineExceeded,
			"command %s expired at %s before the agent could run it", cmd.Kind, cmd.Expires.Format(time.RFC3339))}, seq)
		return
	}
	log := a.log.With().Str("command", cmd.ID).Str("kind", string(cmd.Kind)).Str("op", cmd.OpID).Str("call_id", cmd.CallID).Logger()
	attempt := 1
	if r := a.cursor.Running; r != nil && r.ID == cmd.ID {
		// The agent stopped while running it: every command is safe to run
		// again (restarting, setting a password, growing a file system to
		// a size, …), so it is, and its result, whose event id derives from
		// the command's, is reported once. A command that keeps killing the
		// agent is given up on.
		attempt = r.Attempts + 1
		if attempt > maxCommandAttempts {
			a.finish(ctx, cmd, commandResult{err: protocol.Errorf(protocol.CodeAborted,
				"the agent stopped %d times while running %s (first started %s); it is not run again", r.Attempts, cmd.Kind, r.Started.Format(time.RFC3339))}, seq)
			return
		}
		log.Warn().Int("attempt", attempt).Msg("the agent stopped while running this command; running it again")
	}
	started := time.Now().UTC()
	if r := a.cursor.Running; r != nil && r.ID == cmd.ID {
		started = r.Started
	}
	a.cursor.Running = &runningCommand{ID: cmd.ID, Seq: seq, Kind: cmd.Kind, OpID: cmd.OpID, Started: started, Attempts: attempt}
	point := "agent/command " + string(cmd.Kind)
	if err := a.crash.Around(point+"/running-recorded", func() error { return saveJSON(a.m.cursorPath(), a.cursor, 0o600) }); err != nil {
		a.log.Error().Err(err).Msg("command cursor not saved")
	}
	log.Info().Msg("running a command")
	res := a.execute(ctx, cmd)
	if res.err != nil {
		log.Warn().Str("error", res.err.Message).Msg("command failed")
	}
	if res.restart {
		log.Info().Msg("the agent restarts to finish the command")
		return
	}
	a.crash.At(point + ":done")
	a.finish(ctx, cmd, res, seq)
}

// maxCommandAttempts is how many times a command is started before the
// agent gives up on one it keeps dying in.
const maxCommandAttempts = 3

// finish answers a command and then records it done. An answer the bus has
// not taken when the agent stops leaves the command undone: it runs again
// and is answered then, under the same event id.
func (a *Agent) finish(ctx context.Context, cmd protocol.Command, res commandResult, seq uint64) {
	if err := a.answer(ctx, cmd, res); err != nil {
		a.log.Warn().Err(err).Str("command", cmd.ID).Msg("the agent stopped before the bus had the command's result; it runs again at start")
		return
	}
	a.crash.At("agent/command " + string(cmd.Kind) + "/answered")
	a.commandDone(cmd.ID, seq)
}

func (a *Agent) commandDone(id string, seq uint64) {
	if id == "" {
		a.cursor.Running, a.cursor.LastSeq = nil, max(a.cursor.LastSeq, seq)
	} else {
		a.cursor.done(id, seq)
	}
	a.saveCursor()
}

func (a *Agent) answer(ctx context.Context, cmd protocol.Command, res commandResult) error {
	e := protocol.Event{ID: resultEventID(cmd.ID), Kind: protocol.EventCommand, CommandID: cmd.ID, OpID: cmd.OpID, Step: string(cmd.Kind),
		Status: protocol.StatusOK, Message: res.message, Output: res.output}
	if res.err != nil {
		e.Status, e.Error = protocol.StatusFailed, res.err
		if e.Message == "" {
			e.Message = res.err.Message
		}
	}
	if res.result != nil {
		if b, err := json.Marshal(res.result); err == nil {
			e.Result = b
			// A secret goes out sealed when the agent has an instance key.
			if res.secret && a.box != nil {
				e.Result, e.SealedResult = nil, a.box.Seal(string(b), protocol.SealedResultPlace(a.cfg.Instance, cmd.ID))
			}
		}
	}
	return a.rep.deliver(ctx, e)
}

var reUserName = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,127}$`)

// runCommand carries a command out, holding the machine so that it does not
// overlap with the startup sequence (and, for a command that touches DSS,
// the install lock: holdMachine).
func (a *Agent) runCommand(ctx context.Context, cmd protocol.Command) commandResult {
	if !cmd.Kind.Known() {
		return commandResult{err: protocol.Errorf(protocol.CodeUnimplemented, "unknown command %q", cmd.Kind)}
	}
	if cmd.Kind == protocol.CommandReplaySetupActions {
		// Right after a restart the desired state is still being read: it
		// is waited for (until the command expires) before the machine is
		// held, which would stop the watchdog and every other command.
		wctx, cancel := ctx, context.CancelFunc(func() {})
		if !cmd.Expires.IsZero() {
			wctx, cancel = context.WithDeadline(ctx, cmd.Expires)
		}
		a.desired.whenLoaded(wctx)
		cancel()
	}
	release, perr := a.holdMachine(ctx, cmd)
	if perr != nil {
		return commandResult{err: perr}
	}
	defer release()
	installed, _ := a.m.installedVersion()
	needsDSS := func() *protocol.Error {
		if installed == "" {
			return protocol.Errorf(protocol.CodeFailedPrecondition, "DSS is not installed on this machine yet")
		}
		return nil
	}
	switch cmd.Kind {
	case protocol.CommandRestartDSS, protocol.CommandStartDSS:
		if err := needsDSS(); err != nil {
			return commandResult{err: err}
		}
		a.setDSSStopped(false)
		start := a.m.startDSS
		if cmd.Kind == protocol.CommandRestartDSS {
			start = a.m.restartDSS
		}
		out, err := start(ctx)
		a.refreshDSSState(ctx)
		if err != nil {
			return commandResult{output: out, err: protocol.Errorf(protocol.CodeInternal, "DSS did not start: %v", err)}
		}
		return commandResult{message: "DSS is running", output: out}
	case protocol.CommandStopDSS:
		if err := needsDSS(); err != nil {
			return commandResult{err: err}
		}
		a.setDSSStopped(true)
		out, _ := a.m.stopDSS(ctx)
		a.refreshDSSState(ctx)
		return commandResult{message: "DSS is stopped; the agent will not restart it until start-dss or restart-dss", output: out}
	case protocol.CommandReplaySetupActions:
		d := a.desired.latest() // read before the machine was held
		if d == nil {
			return commandResult{err: protocol.Errorf(protocol.CodeFailedPrecondition, "no desired state yet")}
		}
		if err := needsDSS(); err != nil {
			return commandResult{err: err}
		}
		// The machine is held: no convergence reports steps meanwhile.
		a.stepOp.Store(cmd.OpID)
		err := a.replayActions(ctx, d)
		a.stepOp.Store("")
		if err != nil {
			return commandResult{err: err}
		}
		return commandResult{message: fmt.Sprintf("%d setup actions replayed", len(d.SetupActions))}
	case protocol.CommandResetUserPassword:
		var p protocol.ResetUserPasswordParams
		if err := json.Unmarshal(cmd.Params, &p); err != nil || !reUserName.MatchString(p.UserName) || p.Password == "" {
			return commandResult{err: protocol.Errorf(protocol.CodeInvalidArgument, "reset-user-password needs a userName and a non-empty password")}
		}
		if err := needsDSS(); err != nil {
			return commandResult{err: err}
		}
		var s dssSecrets
		if _, err := loadJSON(a.m.secretsPath(), &s); err != nil || s.AdminAPIKey == "" {
			return commandResult{err: protocol.Errorf(protocol.CodeFailedPrecondition, "the password of %s was not changed: DSS is not set up yet (no admin API key)", p.UserName)}
		}
		if err := a.m.setUserPassword(ctx, s.AdminAPIKey, p.UserName, p.Password); err != nil {
			return commandResult{err: protocol.Errorf(protocol.CodeFailedPrecondition, "the password of %s was not changed: %v", p.UserName, err)}
		}
		return commandResult{message: "password of " + p.UserName + " changed"}
	case protocol.CommandGetInitialPassword, protocol.CommandGetAdminAPIKey:
		return a.dssSecret(cmd.Kind)
	case protocol.CommandGrowFilesystem:
		return a.growFilesystem(ctx, cmd)
	case protocol.CommandUpgradeAgent:
		return a.upgradeAgent(ctx, cmd)
	case protocol.CommandCollectDiagnosis:
		res, err := a.collectDiagnosis(ctx, cmd.ID)
		if err != nil {
			return commandResult{err: protocol.Errorf(protocol.CodeUnavailable, "%v", err)}
		}
		return commandResult{message: "diagnosis uploaded", result: res}
	}
	return commandResult{err: protocol.Errorf(protocol.CodeUnimplemented, "command %q is not carried out by this agent", cmd.Kind)}
}

// dssSecret answers get-initial-password and get-admin-api-key from the
// credentials the agent made when it set DSS up.
func (a *Agent) dssSecret(kind protocol.CommandKind) commandResult {
	var s dssSecrets
	if _, err := loadJSON(a.m.secretsPath(), &s); err != nil {
		return commandResult{err: protocol.Errorf(protocol.CodeInternal, "%v", err)}
	}
	if kind == protocol.CommandGetInitialPassword {
		if s.InitialPassword == "" {
			return commandResult{err: protocol.Errorf(protocol.CodeFailedPrecondition, "no initial password: DSS is not set up yet")}
		}
		return commandResult{result: protocol.InitialPasswordResult{UserName: "admin", Password: s.InitialPassword}, secret: true}
	}
	if s.AdminAPIKey == "" {
		return commandResult{err: protocol.Errorf(protocol.CodeFailedPrecondition, "no admin API key: DSS is not set up yet")}
	}
	return commandResult{result: protocol.AdminAPIKeyResult{AdminAPIKey: s.AdminAPIKey}, secret: true}
}

// touchesDSS reports whether a command runs DSS's programs or restarts DSS,
// which must not happen beside DSS's installer.
func touchesDSS(kind protocol.CommandKind) bool {
	switch kind {
	case protocol.CommandRestartDSS, protocol.CommandStartDSS, protocol.CommandStopDSS,
		protocol.CommandReplaySetupActions, protocol.CommandResetUserPassword:
		return true
	}
	return false
}

// commandInstallerWait is how long a command without an expiry waits for an
// installer to end.
const commandInstallerWait = 10 * time.Minute

// holdMachine takes the machine for a command and, if it touches DSS, the
// install lock as well, which the convergence holds while DSS's installer
// runs, and an installer left running by an agent that stopped or died
// holds until it ends: stopping or starting DSS then would kill the
// installer (its command line names the data directory) or start DSS on a
// half-upgraded data directory. While such an installer runs, the command
// waits, letting go of the machine between tries so that the convergence
// can take it, until the command expires (commandInstallerWait without an
// expiry); then it is answered Unavailable, to be sent again.
func (a *Agent) holdMachine(ctx context.Context, cmd protocol.Command) (release func(), perr *protocol.Error) {
	if !touchesDSS(cmd.Kind) {
		a.machineMu.Lock()
		return a.machineMu.Unlock, nil
	}
	until := cmd.Expires
	if until.IsZero() {
		until = time.Now().Add(commandInstallerWait)
	}
	logged := false
	for {
		a.machineMu.Lock()
		if !logged && !cmd.Expires.IsZero() && time.Now().After(cmd.Expires) {
			// It waited for the machine (a convergence) past its expiry:
			// the server has given up on it. (One that waited for an
			// installer is answered so, below.)
			a.machineMu.Unlock()
			return nil, protocol.Errorf(protocol.CodeDeadlineExceeded, "%s expired at %s while it waited for the machine", cmd.Kind, cmd.Expires.Format(time.RFC3339))
		}
		lock, err := a.m.tryLockInstall()
		if err == nil {
			a.installLock.Store(lock)
			return func() { a.installLock.Store(nil); lock.Close(); a.machineMu.Unlock() }, nil
		}
		a.machineMu.Unlock()
		if !errors.Is(err, errInstallerRuns) {
			return nil, protocol.Errorf(protocol.CodeInternal, "%v", err)
		}
		pids := a.m.installerProcesses()
		if !time.Now().Before(until) {
			return nil, protocol.Errorf(protocol.CodeUnavailable,
				"DSS's installer still runs on the data directory (processes %v), so %s was not run: send it again once the install or upgrade has ended", pids, cmd.Kind)
		}
		if !logged {
			a.log.Info().Ints("pids", pids).Str("command", cmd.ID).Msg("DSS's installer runs; the command waits for it to end")
			logged = true
		}
		select {
		case <-ctx.Done():
			return nil, protocol.Errorf(protocol.CodeAborted, "the agent stopped while %s waited for DSS's installer to end", cmd.Kind)
		case <-time.After(time.Second):
		}
	}
}

// resultEventID is the id of a command's result event: the same for every
// answer to the command, so that the bus keeps the first.
func resultEventID(commandID string) string {
	if protocol.ValidToken(commandID + "-result") {
		return commandID + "-result"
	}
	return protocol.NewID("ev")
}
