package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"regexp"
	"sync/atomic"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// commandResult is what a command handler gives back.
type commandResult struct {
	message string
	output  string
	result  any
	secret  bool // result holds a credential
	err     *protocol.Error
}

// runCommands consumes the instance's commands until ctx ends, through the
// one consumer FM makes for it on request (protocol.CommandsFromRequest):
// in memory, one replica, gone after a few idle minutes, and made again
// from the last command handled after a bus outage or a gap. No durable
// per-agent state exists on the bus.
func (a *Agent) runCommands(ctx context.Context) {
	backoff := time.Second
	for ctx.Err() == nil {
		err := a.consumeCommands(ctx)
		if ctx.Err() != nil {
			return
		}
		wait := backoff
		if errors.Is(err, errReconnected) {
			// A fleet's agents reconnect together after a bus restart:
			// each asks for its consumer at a random moment of the next
			// commandsJitter, so that FM makes them spread out.
			wait, backoff = randomDuration(commandsJitter), time.Second
		} else {
			backoff = min(2*backoff, 15*time.Second)
		}
		a.log.Debug().Err(err).Dur("retry_in", wait).Msg("command consumer stopped")
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// commandsJitter spreads the consumer requests of agents that reconnect
// together.
const commandsJitter = 2 * time.Second

// randomDuration is a random duration in [0, span).
func randomDuration(span time.Duration) time.Duration {
	return time.Duration(mrand.Int64N(int64(span)))
}

// errReconnected stops the command consumer when the connection comes
// back: an in-memory consumer does not outlive a bus restart, and a pull
// on one that is gone is answered by nothing until heartbeats are missed.
var errReconnected = errors.New("reconnected to the bus: the command consumer is asked for again")

// errCommandGap says a command was lost between the bus and the agent.
var errCommandGap = errors.New("a command was lost on the way: consuming again from the last one handled")

func (a *Agent) consumeCommands(ctx context.Context) error {
	// Only a reconnection after the consumer is asked for is news to it
	// (not the first connection, whose signal may come late).
	reconnects := a.nc.Stats().Reconnects
	name, err := a.askCommandsFrom(ctx, a.cursor.LastSeq)
	if err != nil {
		return fmt.Errorf("command consumer: %w", err)
	}
	cons, err := a.js.Consumer(ctx, protocol.StreamCommands, name)
	if err != nil {
		return fmt.Errorf("command consumer: %w", err)
	}
	// Pulls of a minute with heartbeats every 30 s: a fleet's idle agents
	// cost the bus half what the defaults do (30 s, 15 s). A consumer lost
	// with a bus restart is asked for again at the reconnection; one lost
	// otherwise shows in two missed heartbeats. (Pulls of 90 s were never
	// answered through the agents' account's import of JetStream's API:
	// TestCommandsRunOnceAndAfterAnOutage.)
	msgs, err := cons.Messages(jetstream.PullExpiry(60*time.Second), jetstream.PullHeartbeat(30*time.Second))
	if err != nil {
		return fmt.Errorf("command consumer: %w", err)
	}
	defer msgs.Stop()
	var reconnected atomic.Bool
	stopped := make(chan struct{})
	defer close(stopped)
	go func() {
		for {
			select {
			case <-ctx.Done():
			case <-a.commandsReconnected:
				if a.nc.Stats().Reconnects == reconnects {
					continue
				}
				reconnected.Store(true)
			case <-stopped:
				return
			}
			msgs.Stop()
			return
		}
	}()
	var delivered uint64
	for {
		msg, err := msgs.Next()
		if err != nil {
			if reconnected.Load() {
				return errReconnected
			}
			return err
		}
		md, err := msg.Metadata()
		if err != nil {
			continue
		}
		// Nothing acknowledges: a command delivered while the connection
		// was down is lost to this consumer, and seen as a gap.
		if delivered++; md.Sequence.Consumer != delivered {
			return errCommandGap
		}
		a.handleCommand(ctx, msg.Data(), md.Sequence.Stream)
	}
}

// askCommandsFrom asks FM to make the command consumer anew, delivering
// commands after stream sequence after, and returns its name.
func (a *Agent) askCommandsFrom(ctx context.Context, after uint64) (string, error) {
	data, err := protocol.Encode(&protocol.CommandsFromRequest{After: after})
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	msg, err := a.nc.RequestWithContext(ctx, protocol.CommandsFromSubject(a.cfg.Instance), data)
	if err != nil {
		return "", err
	}
	var resp protocol.CommandsFromResponse
	if err := protocol.Decode(msg.Data, &resp); err != nil {
		return "", fmt.Errorf("FM's answer: %w", err)
	}
	if resp.Error != nil {
		return "", resp.Error
	}
	if resp.Consumer != protocol.CommandConsumer(a.cfg.Instance) {
		return "", fmt.Errorf("FM made consumer %q, not the instance's", resp.Consumer)
	}
	return resp.Consumer, nil
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
		a.commandDone(cmd.ID, seq)
		return
	}
	if !cmd.Expires.IsZero() && time.Now().After(cmd.Expires) {
		a.finish(ctx, cmd, commandResult{err: protocol.Errorf(protocol.CodeDeadlineExceeded,
			"command %s expired at %s before the agent could run it", cmd.Kind, cmd.Expires.Format(time.RFC3339))}, seq)
		return
	}
	log := a.log.With().Str("command", cmd.ID).Str("kind", string(cmd.Kind)).Logger()
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
	if err := saveJSON(a.m.cursorPath(), a.cursor, 0o600); err != nil {
		a.log.Error().Err(err).Msg("command cursor not saved")
	}
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
		d := a.desired.latest()
		if d == nil {
			return commandResult{err: protocol.Errorf(protocol.CodeFailedPrecondition, "no desired state yet")}
		}
		if err := needsDSS(); err != nil {
			return commandResult{err: err}
		}
		if err := a.replayActions(ctx, d); err != nil {
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
