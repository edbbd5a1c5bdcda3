package agent

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"time"

	"github.com/fleetmanager/fm/internal/transfer"
	"github.com/fleetmanager/fm/protocol"
)

// stepError is a failed step: the code and message go to the operation, the
// output tail to the event.
type stepError struct {
	step   string
	code   protocol.Code
	err    error
	output string
}

func (e *stepError) Error() string { return e.step + ": " + e.err.Error() }

// stepEvent reports a step of the work the machine is held for: one a
// command asked for carries the command's operation, so that FM files it
// under it even before its own copies know the operation began (an agent
// that starts at once).
func (a *Agent) stepEvent(e protocol.Event) {
	if op, _ := a.stepOp.Load().(string); op != "" {
		e.OpID = op
	}
	a.rep.event(e)
}

// step runs fn as a named step of converging to generation gen, reporting
// it started and how it ended.
func (a *Agent) step(gen uint64, name string, fn func() (msg, output string, err error)) error {
	a.stepEvent(protocol.Event{Kind: protocol.EventStep, Generation: gen, Step: name, Status: protocol.StatusStarted})
	a.rep.updateStatus(func(s *protocol.AgentStatus) { s.Step = name })
	a.crash.At("agent/" + name + ":before")
	msg, out, err := fn()
	if err == nil {
		a.crash.At("agent/" + name + ":after")
	}
	if err != nil && a.stopping.Load() {
		// Cut short by the agent's own shutdown: not a failure of the step.
		return err
	}
	if err != nil {
		code := protocol.CodeInternal
		var se *stepError
		if errors.As(err, &se) {
			code, err = se.code, se.err
			if se.output != "" {
				out = se.output
			}
		}
		a.stepEvent(protocol.Event{Kind: protocol.EventStep, Generation: gen, Step: name, Status: protocol.StatusFailed,
			Message: err.Error(), Output: lastBytes(out, 8<<10), Error: &protocol.Error{Code: code, Message: name + ": " + err.Error()}})
		return &stepError{step: name, code: code, err: err, output: out}
	}
	a.stepEvent(protocol.Event{Kind: protocol.EventStep, Generation: gen, Step: name, Status: protocol.StatusOK, Message: msg})
	return nil
}

// untilDeadline runs fn again while it fails in a way that may pass (code
// Unavailable: the bus, the object store or a download server away),
// waiting longer each time, until the desired state's deadline. Each retry
// is an event, so that the operation shows why it waits; only the failure
// that outlives the deadline is the step's.
func (a *Agent) untilDeadline(ctx context.Context, d *protocol.DesiredState, name string, fn func() (string, string, error)) (string, string, error) {
	deadline := a.retryDeadline(d)
	wait := time.Second
	for {
		msg, out, err := fn()
		var se *stepError
		if err == nil || !errors.As(err, &se) || se.code != protocol.CodeUnavailable || ctx.Err() != nil ||
			!time.Now().Add(wait).Before(deadline) {
			return msg, out, err
		}
		a.log.Warn().Err(se.err).Str("step", name).Dur("retry_in", wait).Msg("step failed for now; retrying")
		a.rep.event(protocol.Event{Kind: protocol.EventStep, Generation: d.Generation, Step: name, Status: protocol.StatusRetrying,
			Message: fmt.Sprintf("%v; trying again in %s", se.err, wait)})
		select {
		case <-ctx.Done():
			return msg, out, err
		case <-time.After(wait):
		}
		wait = min(2*wait, 30*time.Second)
	}
}

// retryDeadline is when a generation's transient failures stop being
// retried: the operation's deadline, or an hour after the agent first
// worked on the generation.
func (a *Agent) retryDeadline(d *protocol.DesiredState) time.Time {
	if !d.RetryUntil.IsZero() {
		return d.RetryUntil
	}
	a.firstTryMu.Lock()
	defer a.firstTryMu.Unlock()
	if a.firstTryGen != d.Generation {
		a.firstTryGen, a.firstTry = d.Generation, time.Now()
	}
	return a.firstTry.Add(time.Hour)
}

func lastBytes(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// convergeLoop converges the machine to every new desired state. A failed
// attempt is retried a few times with growing waits (a kit download can
// meet a bus outage), then left failed until the desired state changes.
func (a *Agent) convergeLoop(ctx context.Context) {
	var failedGen uint64
	attempts := 0
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.desired.changed:
		case <-retry.C:
		}
		d := a.desired.latest()
		if d == nil {
			continue
		}
		if d.MachineRequest != "" && a.cfg.MachineRequest != "" && d.MachineRequest != a.cfg.MachineRequest {
			a.log.Info().Uint64("generation", d.Generation).Str("for", d.MachineRequest).Msg("desired state is for another machine; left alone")
			continue
		}
		if d.HeartbeatSeconds > 0 {
			a.rep.setHeartbeat(time.Duration(d.HeartbeatSeconds) * time.Second)
		}
		if d.Generation != failedGen {
			failedGen, attempts = 0, 0
		}
		err := a.convergeTo(ctx, d)
		if err == nil || ctx.Err() != nil {
			continue
		}
		failedGen = d.Generation
		attempts++
		var se *stepError
		if errors.As(err, &se) && se.code == protocol.CodeFailedPrecondition {
			continue // retrying will not help (a refused downgrade)
		}
		if attempts < 4 {
			wait := []time.Duration{5 * time.Second, 30 * time.Second, 2 * time.Minute}[attempts-1]
			a.log.Warn().Err(err).Dur("retry_in", wait).Msg("converging failed; retrying")
			retry.Reset(wait)
		}
	}
}

// converge brings the machine to d.
func (a *Agent) converge(ctx context.Context, d *protocol.DesiredState) error {
	a.machineMu.Lock()
	defer a.machineMu.Unlock()
	// The install lock is held for the whole convergence, and DSS's
	// installer inherits it: an installer left running by an agent that
	// was killed keeps it, and this one waits until that installer has
	// ended before it looks at what is installed.
	lock, err := a.m.lockInstall(ctx)
	if err != nil {
		return a.fail(d, &stepError{step: "inspect", code: protocol.CodeInternal, err: err})
	}
	defer lock.Close()
	a.installLock.Store(lock)
	defer a.installLock.Store(nil)
	mk := a.m.loadMarker()
	want := appliedOf(d)
	installed, err := a.m.installedVersion()
	if err != nil {
		return a.fail(d, &stepError{step: "inspect", code: protocol.CodeInternal, err: err})
	}
	newMachine := mk.Generation == 0
	log := a.log.With().Uint64("generation", d.Generation).Logger()
	if !newMachine && mk.Generation >= d.Generation && installed != "" {
		// Already there (an agent restart, a machine start): make sure DSS
		// runs, unless stopped on purpose.
		if !mk.DSSStopped && !a.m.answers(ctx) {
			log.Info().Msg("starting DSS")
			if out, err := a.m.startDSS(ctx); err != nil {
				log.Warn().Err(err).Str("output", lastBytes(out, 2048)).Msg("DSS did not start; the watchdog will retry")
			}
		}
		// The HTTPS front of the generation reached (restore served it
		// already, unless it was not kept); a port not free yet is tried
		// again by the front itself, and the status says why meanwhile.
		if _, err := a.front.apply(d.DSS.HTTPS, d.DSS.Port); err != nil {
			log.Warn().Err(err).Msg("the HTTPS front is not served yet")
		}
		a.ready(d, mk.Generation)
		return nil
	}
	// From here the convergence does work, and may read and write hundreds
	// of MiB through buffers (a kit unpacked, a snapshot restored): whether
	// it reaches its generation or fails, what the heap no longer holds goes
	// back to the machine when it ends, not over minutes.
	defer debug.FreeOSMemory()
	if !newMachine && installed == want.Version && mk.Applied.Version == want.Version && mk.Applied.NodeType == want.NodeType {
		// Only settings or setup actions changed: no reinstall.
		log.Info().Msg("converging settings without reinstalling")
		a.converging(d)
		if err := a.applySettings(ctx, d, mk); err != nil {
			return a.fail(d, err)
		}
	} else {
		log.Info().Bool("new_machine", newMachine).Str("installed", installed).Str("target", d.DSS.Version).Msg("running the startup sequence")
		a.converging(d)
		if err := a.startupSequence(ctx, d, mk, installed, newMachine); err != nil {
			return a.fail(d, err)
		}
	}
	if err := a.serveHTTPS(ctx, d); err != nil {
		return a.fail(d, err)
	}
	mk.Generation, mk.Applied = d.Generation, want
	if err := a.crash.Around("agent/record-progress", func() error { return a.m.saveMarker(mk) }); err != nil {
		return a.fail(d, &stepError{step: "record-progress", code: protocol.CodeInternal, err: err})
	}
	a.rep.event(protocol.Event{Kind: protocol.EventStep, Generation: d.Generation, Step: "ready", Status: protocol.StatusOK,
		Message: "generation " + fmt.Sprint(d.Generation) + " reached"})
	a.ready(d, d.Generation)
	log.Info().Msg("desired state reached")
	return nil
}

// serveHTTPS puts the desired HTTPS front in place, a step when it
// changes anything (a port not free yet is tried again until the
// deadline).
func (a *Agent) serveHTTPS(ctx context.Context, d *protocol.DesiredState) error {
	if a.front.current(d.DSS.HTTPS, d.DSS.Port) {
		return nil
	}
	return a.step(d.Generation, "https", func() (string, string, error) {
		return a.untilDeadline(ctx, d, "https", func() (string, string, error) {
			msg, err := a.front.apply(d.DSS.HTTPS, d.DSS.Port)
			return msg, "", err
		})
	})
}

func (a *Agent) converging(d *protocol.DesiredState) {
	a.rep.updateStatus(func(s *protocol.AgentStatus) {
		s.Phase, s.Target, s.Error = protocol.PhaseConverging, d.Generation, nil
	})
}

func (a *Agent) ready(d *protocol.DesiredState, gen uint64) {
	a.refreshDSSState(context.Background())
	a.rep.updateStatus(func(s *protocol.AgentStatus) {
		s.Phase, s.Generation, s.Target, s.Step, s.Error = protocol.PhaseReady, gen, d.Generation, "", nil
	})
}

func (a *Agent) fail(d *protocol.DesiredState, err error) error {
	if a.stopping.Load() {
		return err
	}
	var se *stepError
	code := protocol.CodeInternal
	if errors.As(err, &se) {
		code = se.code
	}
	a.refreshDSSState(context.Background())
	a.rep.updateStatus(func(s *protocol.AgentStatus) {
		s.Phase, s.Target, s.Error = protocol.PhaseFailed, d.Generation, &protocol.Error{Code: code, Message: err.Error()}
	})
	a.log.Error().Err(err).Uint64("generation", d.Generation).Msg("converging failed")
	return err
}

// startupSequence is brief §5: setup actions before_install, install or
// upgrade in place, after_install, start DSS, wait until it answers,
// after_dss_startup, then the credentials FM keeps.
func (a *Agent) startupSequence(ctx context.Context, d *protocol.DesiredState, mk marker, installed string, newMachine bool) error {
	gen := d.Generation
	var installer string
	if err := a.step(gen, "fetch-kit", func() (string, string, error) {
		return a.untilDeadline(ctx, d, "fetch-kit", func() (string, string, error) {
			var err error
			progress := func(done, total int64) {
				a.rep.event(protocol.Event{Kind: protocol.EventStep, Generation: gen, Step: "fetch-kit",
					Status: protocol.StatusProgress, Message: transfer.Describe("kit", done, total)})
			}
			if installer, err = a.kits.prepare(ctx, d.DSS.Kit, progress); err != nil {
				return "", "", err
			}
			return "kit ready: " + filepath.Base(filepath.Dir(installer)), "", nil
		})
	}); err != nil {
		return err
	}
	if err := a.m.managedFiles().clear(ctx); err != nil {
		return &stepError{step: "prepare", code: protocol.CodeInternal, err: err}
	}
	facts := a.factsFor(d, false, false)
	if err := a.runStage(ctx, d, protocol.StageBeforeInstall, facts); err != nil {
		return err
	}

	wasInstalled, wasUpgraded := false, false
	cmp := protocol.CompareVersions(installed, d.DSS.Version)
	if run := mk.Install; run.done(gen, d.DSS.Version, installed) {
		// The installer of this generation ran to its end before the agent
		// stopped: what it did stands, and it is not run again.
		wasInstalled, wasUpgraded = run.From == "", run.From != ""
		a.log.Info().Str("from", run.From).Str("to", run.Target).Msg("DSS was installed for this generation before the agent stopped")
		cmp = 0
		newMachine = false
	} else if installed == "" || cmp != 0 || newMachine {
		mk.Install = &installRun{Generation: gen, Target: d.DSS.Version, From: installed}
		if err := a.crash.Around("agent/record-install", func() error { return a.m.saveMarker(mk) }); err != nil {
			return &stepError{step: "record-install", code: protocol.CodeInternal, err: err}
		}
	}
	a.rep.updateStatus(func(s *protocol.AgentStatus) { s.DSS.State = protocol.DSSInstalling })
	switch {
	case wasInstalled || wasUpgraded:
	case installed == "":
		wasInstalled = true
		if err := a.step(gen, "install", func() (string, string, error) {
			return a.install(ctx, installer, d)
		}); err != nil {
			return err
		}
	case cmp > 0 && !d.DSS.AllowDowngrade:
		return a.step(gen, "upgrade", func() (string, string, error) {
			return "", "", &stepError{code: protocol.CodeFailedPrecondition, err: fmt.Errorf(
				"the data directory holds DSS %s, newer than the image's %s: downgrade refused (force it to try)", installed, d.DSS.Version)}
		})
	case cmp != 0 || newMachine:
		wasUpgraded = cmp != 0
		name := "upgrade"
		if cmp == 0 {
			name = "attach-data" // the kit of a new machine takes over the kept data directory
		}
		if err := a.step(gen, name, func() (string, string, error) {
			stopOut, _ := a.m.stopDSS(ctx)
			out, err := a.m.runInstaller(ctx, a.installLock.Load(), nil, installer, "-d", a.m.dssDir, "-u", "-y")
			if err != nil {
				return "", stopOut + out, &stepError{code: protocol.CodeInternal, err: err}
			}
			if cmp == 0 {
				return "DSS " + d.DSS.Version + " data directory attached", out, nil
			}
			return fmt.Sprintf("DSS upgraded from %s to %s", installed, d.DSS.Version), out, nil
		}); err != nil {
			return err
		}
	}
	if err := a.writeLicense(ctx, gen, d); err != nil {
		return err
	}
	if _, err := a.writeAWSCredentials(ctx, gen, d); err != nil {
		return err
	}
	facts = a.factsFor(d, wasInstalled, wasUpgraded)
	if err := a.runStage(ctx, d, protocol.StageAfterInstall, facts); err != nil {
		return err
	}
	if !mk.DSSStopped {
		if err := a.step(gen, "start-dss", func() (string, string, error) {
			start := a.m.startDSS
			if a.m.dssUp(ctx) && !a.m.runsWithInputs("") {
				// DSS runs already (an agent killed after this step),
				// not with what it reads at start now.
				start = a.m.restartDSS
			}
			out, err := start(ctx)
			if err != nil {
				return "", out, &stepError{code: protocol.CodeInternal, err: err}
			}
			port, _ := a.m.port()
			return fmt.Sprintf("DSS answers on port %d", port), out, nil
		}); err != nil {
			return err
		}
	}
	if err := a.ensureCredentials(ctx, gen); err != nil {
		return err
	}
	if err := a.runStage(ctx, d, protocol.StageAfterDSSStartup, a.factsFor(d, wasInstalled, wasUpgraded)); err != nil {
		return err
	}
	// Actions of DSS's running time may change what it takes at start
	// (the Spark integration, the runtime database).
	if !mk.DSSStopped && !a.m.runsWithInputs("") {
		return a.restartForSettings(ctx, gen)
	}
	return nil
}

func (a *Agent) install(ctx context.Context, installer string, d *protocol.DesiredState) (string, string, error) {
	// The installer runs as the DSS account and makes the data directory
	// in a folder that account owns.
	if err := os.MkdirAll(filepath.Dir(a.m.dssDir), 0o755); err != nil {
		return "", "", err
	}
	if err := a.m.giveToDSS(ctx, filepath.Dir(a.m.dssDir)); err != nil {
		return "", "", err
	}
	kept, err := a.m.keepIncompleteDataDir()
	if err != nil {
		return "", "", err
	}
	args := []string{"-d", a.m.dssDir, "-p", fmt.Sprint(d.DSS.Port), "-t", d.NodeType}
	var ended func()
	if d.DSS.License != "" {
		lic, err := os.CreateTemp("", "fm-license-*.json")
		if err != nil {
			return "", "", err
		}
		_, err = lic.WriteString(d.DSS.License)
		if err == nil {
			// The installer reads it as the DSS account.
			err = a.m.giveFileToDSS(ctx, lic)
		}
		lic.Close()
		if err != nil {
			os.Remove(lic.Name())
			return "", "", err
		}
		// Removed once the installer has ended: an agent that stops
		// returns from here while the installer runs on, still to read it.
		ended = func() { os.Remove(lic.Name()) }
		args = append(args, "-l", lic.Name())
	}
	out, err := a.m.runInstaller(ctx, a.installLock.Load(), ended, installer, args...)
	if err != nil {
		return "", out, &stepError{code: protocol.CodeInternal, err: err}
	}
	msg := fmt.Sprintf("DSS %s installed (%s node, port %d)", d.DSS.Version, d.NodeType, d.DSS.Port)
	if kept != "" {
		msg += "; the data directory an interrupted install left was kept as " + kept
	}
	return msg, out, nil
}

// writeLicense puts the desired license in DSS's config, if it changed.
func (a *Agent) writeLicense(ctx context.Context, gen uint64, d *protocol.DesiredState) error {
	if d.DSS.License == "" {
		return nil
	}
	cur, _ := a.m.readFile(ctx, a.m.licensePath())
	if string(cur) == d.DSS.License {
		return nil
	}
	return a.step(gen, "license", func() (string, string, error) {
		if err := a.m.writeFile(ctx, a.m.licensePath(), []byte(d.DSS.License), 0o600); err != nil {
			return "", "", err
		}
		return "license installed", "", nil
	})
}

// awsCredentialsHeader opens the AWS credentials file the agent writes: it
// is the agent's, whole.
const awsCredentialsHeader = "# Written by the Fleet Manager agent: the AWS key pair of the instance's template\n" +
	"# (dataikuAwsAPIAccessMode KEYPAIR). Changes made here are replaced.\n"

// writeAWSCredentials gives the DSS account the desired AWS key pair as its
// default profile (.aws/credentials in its home, 0600, written as the
// account), if it changed, and says whether it did. A file there the agent
// did not write (the image's) is kept beside it, as credentials.before-fm;
// one it cannot read is left as it is and the step fails, rather than be
// lost. Without a key pair it leaves the file alone: one it wrote is on an
// OS disk a reprovision replaces.
//
// A key pair kept in AWS Secrets Manager (c.SecretName) is read there as
// the machine's instance profile, at each convergence (a rotated secret is
// then written), what may pass (the service away, throttling) tried again
// until the desired state's deadline. Once the agent has written one, a
// secret it can no longer read (the runtime profile, swapped in after DSS
// was set up, may not be allowed to) keeps the key written, with a warning
// event, rather than fail the convergence.
func (a *Agent) writeAWSCredentials(ctx context.Context, gen uint64, d *protocol.DesiredState) (bool, error) {
	c := d.DSS.AWSCredentials
	if c == nil {
		return false, nil
	}
	files, home, err := a.m.dssHomeFiles(ctx)
	if err != nil {
		return false, &stepError{step: "aws-credentials", code: protocol.CodeInternal, err: err}
	}
	dir := filepath.Join(home, ".aws")
	path := filepath.Join(dir, "credentials")
	cur, readErr := files.readFile(ctx, path)
	keyID, secret := c.AccessKeyID, c.SecretAccessKey
	if c.SecretName != "" {
		var err error
		_, _, err = a.untilDeadline(ctx, d, "aws-credentials", func() (string, string, error) {
			keyID, secret, err = a.awsSecretKey(ctx, c)
			return "", "", err
		})
		var se *stepError
		if err != nil && errors.As(err, &se) && se.code == protocol.CodeFailedPrecondition && readErr == nil && strings.HasPrefix(string(cur), awsCredentialsHeader) {
			a.rep.event(protocol.Event{Kind: protocol.EventStep, Generation: gen, Step: "aws-credentials", Status: protocol.StatusOK,
				Message: fmt.Sprintf("%v; the key written before is kept", se.err)})
			return false, nil
		}
		if err != nil {
			return false, a.step(gen, "aws-credentials", func() (string, string, error) { return "", "", err })
		}
	}
	want := awsCredentialsHeader + "[default]\naws_access_key_id = " + keyID + "\naws_secret_access_key = " + secret + "\n"
	if readErr == nil && string(cur) == want {
		return false, nil
	}
	return true, a.step(gen, "aws-credentials", func() (string, string, error) {
		if readErr != nil && !errors.Is(readErr, os.ErrNotExist) {
			return "", "", fmt.Errorf("%s is there and cannot be read (%w): it is left as it is", path, readErr)
		}
		if err := files.mkdirAll(ctx, dir, 0o700); err != nil {
			return "", "", err
		}
		kept := ""
		if readErr == nil && !strings.HasPrefix(string(cur), awsCredentialsHeader) {
			aside := path + ".before-fm"
			_, err := files.readFile(ctx, aside)
			switch {
			case errors.Is(err, os.ErrNotExist):
				if err := files.writeFile(ctx, aside, cur, 0o600); err != nil {
					return "", "", err
				}
				kept = "; the file that was there is kept as " + aside
			case err != nil:
				return "", "", fmt.Errorf("%s: %w", aside, err)
			}
		}
		if err := files.writeFile(ctx, path, []byte(want), 0o600); err != nil {
			return "", "", err
		}
		return fmt.Sprintf("AWS key pair %s written as %s (default profile)%s", keyID, path, kept), "", nil
	})
}

// runStage carries out the enabled actions of a stage, in template order,
// each reported as a step; the first failure stops the sequence.
func (a *Agent) runStage(ctx context.Context, d *protocol.DesiredState, stage protocol.Stage, facts ansibleFacts) error {
	for i, act := range d.SetupActions {
		if stageOf(act) != stage {
			continue
		}
		name := fmt.Sprintf("setup-action[%d] %s (%s)", i, act.Type, stage)
		a.stepEvent(protocol.Event{Kind: protocol.EventStep, Generation: d.Generation, Step: name, Status: protocol.StatusStarted})
		a.crash.At("agent/" + name + ":before")
		res := a.actions.run(ctx, act, i, facts, d.DSS.Tools)
		if res.status != protocol.StatusFailed {
			a.crash.At("agent/" + name + ":after")
		}
		if res.status == protocol.StatusFailed && a.stopping.Load() {
			return &stepError{step: name, code: protocol.CodeAborted, err: res.err}
		}
		e := protocol.Event{Kind: protocol.EventStep, Generation: d.Generation, Step: name, Status: res.status,
			Message: res.message, Output: lastBytes(res.output, 8<<10)}
		if res.status == protocol.StatusFailed {
			e.Error = &protocol.Error{Code: protocol.CodeFailedPrecondition, Message: name + ": " + res.message}
			a.stepEvent(e)
			return &stepError{step: name, code: protocol.CodeFailedPrecondition, err: res.err, output: res.output}
		}
		a.stepEvent(e)
	}
	return nil
}

// applySettings converges a generation whose DSS version and node type are
// already installed: the actions run again, and DSS restarts if what it reads
// at start changed.
func (a *Agent) applySettings(ctx context.Context, d *protocol.DesiredState, mk marker) error {
	before := a.m.dssInputs()
	if err := a.m.managedFiles().clear(ctx); err != nil {
		return &stepError{step: "prepare", code: protocol.CodeInternal, err: err}
	}
	facts := a.factsFor(d, false, false)
	for _, stage := range protocol.Stages {
		if stage == protocol.StageAfterDSSStartup && !mk.DSSStopped && !a.m.dssUp(ctx) {
			// DSS down (an agent killed while an action had it stopped):
			// the actions of its running time need it.
			if err := a.step(d.Generation, "start-dss", func() (string, string, error) {
				out, err := a.m.startDSS(ctx)
				if err != nil {
					return "", out, &stepError{code: protocol.CodeInternal, err: err}
				}
				return "DSS started for the actions of its running time", out, nil
			}); err != nil {
				return err
			}
		}
		if err := a.runStage(ctx, d, stage, facts); err != nil {
			return err
		}
	}
	if err := a.writeLicense(ctx, d.Generation, d); err != nil {
		return err
	}
	credsChanged, err := a.writeAWSCredentials(ctx, d.Generation, d)
	if err != nil {
		return err
	}
	// DSS restarts when what it reads at start is not what it started
	// with: changed by this run, or by one a kill cut short between the
	// change and the restart.
	if a.m.runsWithInputs(before) && !credsChanged || mk.DSSStopped {
		return nil
	}
	return a.restartForSettings(ctx, d.Generation)
}

func (a *Agent) restartForSettings(ctx context.Context, gen uint64) error {
	return a.step(gen, "restart-dss", func() (string, string, error) {
		changed := a.m.changedInputs()
		out, err := a.m.restartDSS(ctx)
		if err != nil {
			return "", out, &stepError{code: protocol.CodeInternal, err: err}
		}
		msg := "DSS restarted to take the new settings"
		if len(changed) > 0 {
			if len(changed) > 8 {
				changed = append(changed[:8], fmt.Sprintf("%d more", len(changed)-8))
			}
			msg += " (changed: " + strings.Join(changed, ", ") + ")"
		}
		return msg, out, nil
	})
}

// replayActions is the replay-setup-actions command (machine lock held).
func (a *Agent) replayActions(ctx context.Context, d *protocol.DesiredState) *protocol.Error {
	mk := a.m.loadMarker()
	if err := a.applySettings(ctx, d, mk); err != nil {
		var se *stepError
		if errors.As(err, &se) {
			return &protocol.Error{Code: se.code, Message: err.Error()}
		}
		return &protocol.Error{Code: protocol.CodeInternal, Message: err.Error()}
	}
	a.refreshDSSState(ctx)
	return nil
}

// ensureCredentials sets, once per data directory, the initial password of
// DSS's admin user and an admin API key, which FM hands out through
// get-initial-password and admin-api-key; the key first, since the password
// is set with it. Each is kept (dss-credentials.json)
// as soon as it is made, and a crash between the making and the keeping is
// undone on the next try: a password set but not kept is set again to a
// new one; a key made but not kept is found by the label recorded before
// it was made, and deleted before another is made, so that exactly one key
// of FM's exists.
func (a *Agent) ensureCredentials(ctx context.Context, gen uint64) error {
	var s dssSecrets
	if _, err := loadJSON(a.m.secretsPath(), &s); err != nil {
		return &stepError{step: "credentials", code: protocol.CodeInternal, err: err}
	}
	if s.InitialPassword != "" && s.AdminAPIKey != "" {
		return nil
	}
	save := func(what string) error {
		return a.crash.Around("agent/credentials/"+what, func() error { return saveJSON(a.m.secretsPath(), s, 0o600) })
	}
	return a.step(gen, "credentials", func() (string, string, error) {
		if s.AdminAPIKey == "" {
			if s.KeyLabel != "" {
				// A key may have been made under this label and lost.
				if out, err := a.m.deleteAPIKeys(ctx, s.KeyLabel); err != nil {
					return "", out, err
				}
			} else {
				s.KeyLabel = "fleet-manager-" + strings.ToLower(randomPassword(8))
				if err := save("keep-key-label"); err != nil {
					return "", "", err
				}
			}
			// What api-key-create prints holds the key: it is shown nowhere.
			out, err := a.m.dsscli(ctx, "api-key-create", "--admin=true", "--label", s.KeyLabel, "--output", "json")
			if err != nil {
				return "", "", err
			}
			a.crash.At("agent/credentials/key-made")
			key, err := parseAPIKey(out)
			if err != nil {
				return "", "", err
			}
			s.AdminAPIKey = key
			if err := save("keep-key"); err != nil {
				return "", "", err
			}
		}
		if s.InitialPassword == "" {
			// Set with the key, through DSS's admin API: on no command line.
			pw := randomPassword(20)
			if err := a.m.setUserPassword(ctx, s.AdminAPIKey, "admin", pw); err != nil {
				return "", "", err
			}
			a.crash.At("agent/credentials/password-set")
			s.InitialPassword = pw
			if err := save("keep-password"); err != nil {
				return "", "", err
			}
		}
		return "initial admin password set; admin API key created", "", nil
	})
}

// parseAPIKey reads the key from dsscli api-key-create --output json, which
// prints an object or a one-element array with "key".
func parseAPIKey(out string) (string, error) {
	out = strings.TrimSpace(out)
	var list []map[string]any
	var one map[string]any
	if json.Unmarshal([]byte(out), &list) == nil && len(list) > 0 {
		one = list[0]
	} else if json.Unmarshal([]byte(out), &one) != nil {
		return "", fmt.Errorf("dsscli api-key-create printed no JSON key")
	}
	if k, ok := one["key"].(string); ok && k != "" {
		return k, nil
	}
	return "", fmt.Errorf("dsscli api-key-create printed no key")
}

func randomPassword(n int) string {
	const alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789"
	b := make([]byte, n)
	for i := range b {
		k, _ := rand.Int(rand.Reader, big.NewInt(int64(len(alphabet))))
		b[i] = alphabet[k.Int64()]
	}
	return string(b)
}

// factsFor are the dataiku.dss facts of RUN_ANSIBLE_TASKS.
func (a *Agent) factsFor(d *protocol.DesiredState, installed, upgraded bool) ansibleFacts {
	port, err := a.m.port()
	if err != nil {
		port = d.DSS.Port
	}
	var s dssSecrets
	_, _ = loadJSON(a.m.secretsPath(), &s)
	return ansibleFacts{
		Port: port, Datadir: a.m.dssDir, Version: d.DSS.Version, NodeID: d.Instance, NodeType: d.NodeType,
		LogicalInstanceID: d.Instance, WasInstalled: installed, WasUpgraded: upgraded, APIKey: s.AdminAPIKey,
	}
}
