package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/fleetmanager/fm/internal/atomicfile"
	"github.com/fleetmanager/fm/internal/buildinfo"
	"github.com/fleetmanager/fm/protocol"
)

// The agent upgrades itself on FM's request (protocol.CommandUpgradeAgent):
//
//  1. it downloads the binary FM serves, checks its digest, runs its
//     `version` and has it check this agent's command line and config
//     (`agent … --check`): a binary that does not run here stops there,
//     nothing changed;
//  2. it links its running binary to <binary>.previous, writes the upgrade
//     marker (the command, both digests, a deadline), and renames the new
//     binary over its own: each step leaves either binary whole;
//  3. it stops and its command line (agentcmd) executes the new binary in
//     its place: same process, same machine, DSS untouched. The command is
//     left unanswered, recorded as running, so the new agent runs it again;
//  4. the new agent, finding the marker with its own digest, is on trial:
//     when it runs the command again (it reached FM through the bus, which
//     is what an agent is for), it keeps itself (removes the marker and the
//     previous binary) and answers "upgraded";
//  5. if it has not by the deadline, or was started maxTrialStarts times
//     (it keeps dying: systemd restarts it), it puts the previous binary
//     back and executes it; the old agent, running the command again,
//     answers that the upgrade was rolled back, and why.
//
// Killed anywhere, the restart finds a marker that says where it stood, or
// none (nothing was changed yet); a redelivered command is answered from
// the marker or the binary's digest, never downloaded twice once done.

// CheckOK is what `agent … --check` prints when the command line and
// config would run: an upgrade asks it of the new binary.
const CheckOK = "fm agent: check ok"

// ErrRestart is returned by Run when the agent must be executed again
// from its binary (Config.Binary): a new one was put in place, or the
// previous one put back. Its command line does so (the same process id,
// as a service manager expects).
var ErrRestart = errors.New("agent: restart on the binary put in place")

const (
	// maxTrialStarts is how many times a new agent may start before it
	// reports: one that keeps dying is rolled back.
	maxTrialStarts = 3
	// defaultReportWithin is how long a new agent has to report when the
	// command does not say.
	defaultReportWithin = 5 * time.Minute
	maxReportWithin     = time.Hour
	// deadlineMargin keeps a trial's deadline this far before the command's
	// expiry: a keep answered at the deadline must reach FM before FM
	// gives the operation up.
	deadlineMargin = 30 * time.Second
	// minDownloadTime is the least time left before a command's expiry,
	// beyond the report window, for the agent to begin an upgrade.
	minDownloadTime = 2 * time.Minute
	// maxAgentBinary bounds the download.
	maxAgentBinary = 512 << 20
	// downloadAttempts bounds the tries of a download that fails for a
	// reason that may pass (about 4 minutes of them).
	downloadAttempts = 10
	// versionCheckTime bounds the new binary's `version`.
	versionCheckTime = 30 * time.Second
)

// The states of an upgrade marker.
const (
	upgradeTrial      = "trial"       // the new binary is in place, not yet kept
	upgradeRolledBack = "rolled-back" // the previous binary is (being) put back
	upgradeStuck      = "stuck"       // the new binary failed, and the previous one is gone
)

// upgradeMarker is the upgrade under way, in the agent's state folder on
// the OS disk (a reprovision, which gives the machine FM's binary, forgets
// it with the disk).
type upgradeMarker struct {
	Command     string    `json:"command"`
	State       string    `json:"state"`
	FromVersion string    `json:"fromVersion"`
	FromSHA256  string    `json:"fromSha256"`
	ToVersion   string    `json:"toVersion"`
	ToSHA256    string    `json:"toSha256"`
	Deadline    time.Time `json:"deadline"`
	Starts      int       `json:"starts"`
	Reason      string    `json:"reason,omitempty"`
	// Swaps counts the times this command put a new binary in place; with
	// the command it makes the trial's token (Trial), written in the trial
	// file, which the service manager's watchdog of this very trial checks
	// (one armed for an earlier trial does nothing).
	Swaps int    `json:"swaps"`
	Trial string `json:"trial"`
}

func (m *machine) upgradePath() string { return filepath.Join(m.stateDir, "agent-upgrade.json") }

// trialPath is where a service manager learns that a new binary is on
// trial: fm-agent.service (deploy/cloudinit) counts the failed exits of
// the agent in it, and puts the previous binary back after three, even
// when the new one dies before it can read its own marker.
func (m *machine) trialPath() string { return filepath.Join(m.stateDir, "upgrade-trial") }

func (a *Agent) dropTrial() {
	if err := os.Remove(a.m.trialPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
		a.log.Warn().Err(err).Msg("upgrade trial file not removed")
	}
}

func previousBinary(bin string) string { return bin + ".previous" }

var reSHA256 = regexp.MustCompile(`^[0-9a-f]{64}$`)

// packagedDirs hold the binaries a package manager installs (the fm
// package's /usr/bin/fm): an agent run from one is upgraded with its
// package, not by replacing a file the package database names.
var packagedDirs = []string{"/usr/bin", "/usr/sbin", "/bin", "/sbin"}

// binaryDigest is the hex SHA-256 of the agent's binary, "" when it does
// not know it.
func binaryDigest(bin string) (string, error) {
	if bin == "" {
		return "", nil
	}
	sum, err := fileSHA256(bin)
	if err != nil {
		return "", err
	}
	return hex.EncodeToString(sum), nil
}

func (a *Agent) loadUpgrade() (*upgradeMarker, error) {
	var mk upgradeMarker
	ok, err := loadJSON(a.m.upgradePath(), &mk)
	if err != nil || !ok {
		return nil, err
	}
	return &mk, nil
}

func (a *Agent) saveUpgrade(mk *upgradeMarker) error {
	return saveJSON(a.m.upgradePath(), mk, 0o600)
}

func (a *Agent) dropUpgrade() {
	if err := os.Remove(a.m.upgradePath()); err != nil && !errors.Is(err, os.ErrNotExist) {
		a.log.Warn().Err(err).Msg("upgrade marker not removed")
	}
}

// startUpgradeTrial is the first thing Run does: a new binary on trial
// counts its start and gets its deadline (returned, zero when not on
// trial); one past them, or a rollback a kill cut short, is rolled back
// (ErrRestart).
func (a *Agent) startUpgradeTrial() (time.Time, error) {
	if a.cfg.Binary == "" {
		return time.Time{}, nil
	}
	a.upgradeMu.Lock()
	defer a.upgradeMu.Unlock()
	mk, err := a.loadUpgrade()
	if err != nil {
		a.log.Error().Err(err).Msg("upgrade marker unreadable; the binary in place is kept")
		return time.Time{}, nil
	}
	if mk == nil || a.selfSHA != mk.ToSHA256 {
		return time.Time{}, nil // none, or the old binary runs: the command says how it ended
	}
	switch mk.State {
	case upgradeTrial:
		mk.Starts++
		if err := a.saveUpgrade(mk); err != nil {
			a.log.Error().Err(err).Msg("upgrade marker not saved")
		}
		switch {
		case mk.Starts > maxTrialStarts:
			return time.Time{}, a.rollBack(mk, fmt.Sprintf("the new agent started %d times without reporting", mk.Starts-1))
		case !time.Now().Before(mk.Deadline):
			return time.Time{}, a.rollBack(mk, fmt.Sprintf("the new agent did not report by %s", mk.Deadline.Format(time.RFC3339)))
		}
		a.log.Info().Str("from", mk.FromVersion).Time("deadline", mk.Deadline).Int("start", mk.Starts).Msg("new agent binary on trial: it is kept once it reports")
		return mk.Deadline, nil
	case upgradeRolledBack:
		// Killed between the marker and the rename: finish.
		return time.Time{}, a.rollBack(mk, mk.Reason)
	}
	return time.Time{}, nil
}

// watchUpgradeTrial rolls a new binary back if it has not reported by
// deadline.
func (a *Agent) watchUpgradeTrial(ctx context.Context, deadline time.Time) {
	if deadline.IsZero() {
		return
	}
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-ctx.Done():
		return
	case <-t.C:
	}
	a.upgradeMu.Lock()
	defer a.upgradeMu.Unlock()
	mk, err := a.loadUpgrade()
	if err != nil || mk == nil || mk.State != upgradeTrial || mk.ToSHA256 != a.selfSHA {
		return // kept meanwhile
	}
	if err := a.rollBack(mk, fmt.Sprintf("the new agent did not report by %s", mk.Deadline.Format(time.RFC3339))); errors.Is(err, ErrRestart) {
		a.restart(ErrRestart)
	}
}

// rollBack puts the previous binary back, the marker saying so first
// (upgradeMu held). ErrRestart means it is in place, to be executed; nil,
// that it is gone and this binary keeps running (said to the command).
func (a *Agent) rollBack(mk *upgradeMarker, reason string) error {
	mk.State, mk.Reason = upgradeRolledBack, reason
	if err := a.saveUpgrade(mk); err != nil {
		a.log.Error().Err(err).Msg("upgrade marker not saved")
	}
	a.crash.At("agent/upgrade:rollback-recorded")
	prev := previousBinary(a.cfg.Binary)
	if err := os.Rename(prev, a.cfg.Binary); err != nil {
		if onDisk, derr := binaryDigest(a.cfg.Binary); derr == nil && onDisk == mk.FromSHA256 {
			// Put back already (a rollback cut short after its rename).
			a.dropTrial()
			return ErrRestart
		}
		// Nothing to go back to: this binary stays rather than loop.
		mk.State, mk.Reason = upgradeStuck, reason+"; the previous binary could not be put back ("+err.Error()+"), so the new one runs"
		_ = a.saveUpgrade(mk)
		a.log.Error().Err(err).Str("reason", reason).Msg("the new agent binary should be rolled back, but the previous one cannot be put back; it keeps running")
		return nil
	}
	syncDir(filepath.Dir(a.cfg.Binary))
	a.dropTrial()
	a.log.Warn().Str("reason", reason).Str("version", mk.FromVersion).Msg("new agent binary rolled back; running the previous one again")
	return ErrRestart
}

// upgradeAgent carries out CommandUpgradeAgent (the machine held).
func (a *Agent) upgradeAgent(ctx context.Context, cmd protocol.Command) commandResult {
	var p protocol.UpgradeAgentParams
	if err := json.Unmarshal(cmd.Params, &p); err != nil || !reSHA256.MatchString(p.SHA256) {
		return commandResult{err: protocol.Errorf(protocol.CodeInvalidArgument, "upgrade-agent needs the binary's url and its sha256 (64 lower-case hex digits)")}
	}
	within := time.Duration(p.ReportWithinSeconds) * time.Second
	switch {
	case p.ReportWithinSeconds == 0:
		within = defaultReportWithin
	case p.ReportWithinSeconds < 0 || within > maxReportWithin:
		return commandResult{err: protocol.Errorf(protocol.CodeInvalidArgument, "upgrade-agent: reportWithinSeconds must be between 1 and %d", int(maxReportWithin.Seconds()))}
	}
	a.upgradeMu.Lock()
	defer a.upgradeMu.Unlock()
	mk, err := a.loadUpgrade()
	if err != nil {
		a.log.Warn().Err(err).Msg("upgrade marker unreadable; starting over")
	}
	swaps := 0
	if mk != nil && mk.Command == cmd.ID {
		// The marker decides, whatever the binary's digest says: the
		// binary on disk may have been put back under this process.
		if res, done := a.upgradeOutcome(mk); done {
			return res
		}
		swaps = mk.Swaps
	} else if mk != nil && mk.State == upgradeTrial && a.selfSHA == mk.ToSHA256 {
		// Another command's binary is on trial (this one): its previous
		// binary is the one known to work, and must not be replaced.
		return commandResult{err: protocol.Errorf(protocol.CodeUnavailable,
			"upgrade-agent %s is under way (its binary on trial until %s); ask again once it has ended", mk.Command, mk.Deadline.Format(time.RFC3339))}
	}
	// A refusal from here on leaves nothing of an attempt a kill cut short
	// before its swap (this command's marker, the old binary running).
	refuse := func(res commandResult) commandResult {
		if mk != nil && mk.Command == cmd.ID {
			a.abandonTrial()
		}
		return res
	}
	if a.selfSHA != "" && a.selfSHA == p.SHA256 {
		a.dropTrial()
		a.dropUpgrade()
		return commandResult{message: fmt.Sprintf("the agent already runs this binary (version %s)", a.cfg.Version)}
	}
	if perr := a.canUpgrade(p.URL); perr != nil {
		return refuse(commandResult{err: perr})
	}
	// The new agent must have the time to report before FM gives up on
	// the command: started later, it would be rolled back for nothing.
	tooSoon := func(what string) commandResult {
		return refuse(commandResult{err: protocol.Errorf(protocol.CodeDeadlineExceeded,
			"upgrade-agent %s expires at %s: too soon %s and give the new agent %s to report; nothing was changed, ask again", cmd.ID, cmd.Expires.Format(time.RFC3339), what, within)})
	}
	if !cmd.Expires.IsZero() && time.Until(cmd.Expires) < within+a.deadlineMargin+a.upgradeLead {
		return tooSoon("to download the binary")
	}
	staged, toVersion, perr := a.stageBinary(ctx, p)
	if perr != nil {
		return refuse(commandResult{err: perr, output: toVersion})
	}
	defer os.Remove(staged) // after the rename, there is nothing to remove
	if !cmd.Expires.IsZero() && time.Until(cmd.Expires) < within+a.deadlineMargin {
		return tooSoon("after the download")
	}
	prev := previousBinary(a.cfg.Binary)
	if err := os.Remove(prev); err != nil && !errors.Is(err, os.ErrNotExist) {
		return commandResult{err: protocol.Errorf(protocol.CodeInternal, "the previous binary could not be kept: %v", err)}
	}
	if err := os.Link(a.cfg.Binary, prev); err != nil {
		return commandResult{err: protocol.Errorf(protocol.CodeInternal, "the previous binary could not be kept: %v", err)}
	}
	mk = &upgradeMarker{Command: cmd.ID, State: upgradeTrial, FromVersion: a.cfg.Version, FromSHA256: a.selfSHA,
		ToVersion: toVersion, ToSHA256: p.SHA256, Deadline: time.Now().Add(within).UTC(), Swaps: swaps + 1}
	mk.Trial = fmt.Sprintf("%s-%d", cmd.ID, mk.Swaps)
	if !cmd.Expires.IsZero() && cmd.Expires.Add(-a.deadlineMargin).Before(mk.Deadline) {
		mk.Deadline = cmd.Expires.Add(-a.deadlineMargin).UTC()
	}
	if err := a.saveUpgrade(mk); err != nil {
		return commandResult{err: protocol.Errorf(protocol.CodeInternal, "upgrade marker: %v", err)}
	}
	a.crash.At("agent/upgrade:marker-saved")
	if err := atomicfile.WriteFile(a.m.trialPath(), []byte(mk.Trial+"\n"), 0o600); err != nil {
		a.dropUpgrade()
		return commandResult{err: protocol.Errorf(protocol.CodeInternal, "upgrade trial file: %v", err)}
	}
	// Both on disk before the binary they speak of: a power cut must not
	// leave a new binary with no trial.
	syncDir(a.m.stateDir)
	a.armWatchdog(ctx, mk.Trial, mk.Deadline)
	if err := os.Rename(staged, a.cfg.Binary); err != nil {
		a.dropTrial()
		a.dropUpgrade()
		return commandResult{err: protocol.Errorf(protocol.CodeInternal, "the new binary could not be put in place: %v", err)}
	}
	syncDir(filepath.Dir(a.cfg.Binary))
	a.crash.At("agent/upgrade:swapped")
	// The restart is the upgrade, not a crash: the new agent's run of the
	// command is its first.
	if r := a.cursor.Running; r != nil && r.ID == cmd.ID {
		r.Attempts = 0
		a.saveCursor()
	}
	a.log.Info().Str("to", toVersion).Str("sha256", p.SHA256).Time("deadline", mk.Deadline).Msg("new agent binary in place; restarting on it")
	a.restart(ErrRestart)
	return commandResult{restart: true}
}

// agentUnit is the agent's systemd unit on a machine FM made
// (deploy/cloudinit).
const agentUnit = "fm-agent.service"

// watchdogGrace is how long past its deadline a new binary that never
// acted on it (it hangs before it reads its marker, or exits 0 and is not
// restarted) is put back by systemd.
const watchdogGrace = 2 * time.Minute

var reUnitPart = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,80}$`)

// armWatchdog asks systemd, on a machine it runs, to put the previous
// binary back and restart the agent's unit watchdogGrace after deadline,
// unless the trial file is gone by then (kept, or rolled back): a safety
// net that needs nothing of the new binary. Without systemd there is none
// (a local machine); a failure to arm it is logged, the agent's own
// rollback and fm-agent.service's ExecStopPost remaining.
func (a *Agent) armWatchdog(ctx context.Context, trial string, deadline time.Time) {
	if !a.m.useSystemd() {
		return
	}
	if !reUnitPart.MatchString(trial) {
		a.log.Warn().Str("trial", trial).Msg("systemd's watchdog of the upgrade not armed: the command's id cannot name a unit")
		return
	}
	after := max(int(time.Until(deadline.Add(watchdogGrace)).Seconds())+1, 1)
	args := []string{"--unit", "fm-agent-upgrade-" + trial, "--collect", "--on-active", fmt.Sprintf("%ds", after), "--timer-property=AccuracySec=1s",
		"/bin/sh", "-c", watchdogScript(trial, a.m.trialPath(), a.cfg.Binary, previousBinary(a.cfg.Binary), agentUnit)}
	if out, err := a.systemdRun(ctx, args...); err != nil {
		a.log.Warn().Err(err).Str("output", lastBytes(out, 500)).Msg("systemd's watchdog of the upgrade not armed; the agent's own rollback remains")
	}
}

// watchdogScript puts prev back over bin and restarts unit if the trial
// file still names trial (this very trial: not kept, not rolled back, and
// no later one since).
func watchdogScript(trial, trialFile, bin, prev, unit string) string {
	return fmt.Sprintf("grep -qxF %s %s 2>/dev/null || exit 0; mv -f %s %s && rm -f %s && systemctl restart %s",
		shellQuote(trial), shellQuote(trialFile), shellQuote(prev), shellQuote(bin), shellQuote(trialFile), shellQuote(unit))
}

// abandonTrial forgets an upgrade a kill cut short before its swap (the
// old binary runs): its marker, trial file (which disarms the watchdogs)
// and the link to the previous binary, which is this one.
func (a *Agent) abandonTrial() {
	if err := os.Remove(previousBinary(a.cfg.Binary)); err != nil && !errors.Is(err, os.ErrNotExist) {
		a.log.Warn().Err(err).Msg("previous agent binary not removed")
	}
	a.dropTrial()
	a.dropUpgrade()
}

// upgradeUnderWay says whether cmd is an upgrade-agent whose marker is on
// the machine.
func (a *Agent) upgradeUnderWay(cmd protocol.Command) bool {
	if cmd.Kind != protocol.CommandUpgradeAgent || a.cfg.Binary == "" {
		return false
	}
	a.upgradeMu.Lock()
	defer a.upgradeMu.Unlock()
	mk, err := a.loadUpgrade()
	return err == nil && mk != nil && mk.Command == cmd.ID
}

// upgradeOutcome is the answer to the command of marker mk, when the
// marker says the upgrade ended (upgradeMu held): kept by this new agent,
// rolled back (said by the old one), or put back by the service manager.
// done is false when it has not: the command is carried out (again).
func (a *Agent) upgradeOutcome(mk *upgradeMarker) (res commandResult, done bool) {
	running := a.selfSHA
	switch {
	case mk.State == upgradeTrial && running == mk.ToSHA256 && time.Now().After(mk.Deadline):
		// Too late: the watchdogs act on the deadline, so this does too.
		if err := a.rollBack(mk, fmt.Sprintf("the new agent did not report by %s", mk.Deadline.Format(time.RFC3339))); errors.Is(err, ErrRestart) {
			a.restart(ErrRestart)
			return commandResult{restart: true}, true
		}
		return commandResult{err: protocol.Errorf(protocol.CodeDataLoss, "%s", mk.Reason)}, true
	case mk.State == upgradeTrial && running == mk.ToSHA256:
		// The new agent got here: it reports. It keeps itself.
		if err := os.Remove(previousBinary(a.cfg.Binary)); err != nil && !errors.Is(err, os.ErrNotExist) {
			a.log.Warn().Err(err).Msg("previous agent binary not removed")
		}
		a.dropTrial()
		a.dropUpgrade()
		a.crash.At("agent/upgrade:kept")
		return commandResult{message: fmt.Sprintf("agent upgraded from %s to %s (sha256 %s)", mk.FromVersion, a.cfg.Version, running)}, true
	case mk.State == upgradeRolledBack && running == mk.FromSHA256:
		a.dropUpgrade()
		return commandResult{err: protocol.Errorf(protocol.CodeAborted, "the agent was not upgraded to %s: %s; version %s runs again", mk.ToVersion, mk.Reason, a.cfg.Version)}, true
	case mk.State == upgradeRolledBack:
		// The new agent, its rollback done under it (the deadline passed
		// as it reached the command): the old one answers, once executed.
		if err := a.rollBack(mk, mk.Reason); errors.Is(err, ErrRestart) {
			a.restart(ErrRestart)
			return commandResult{restart: true}, true
		}
		return commandResult{err: protocol.Errorf(protocol.CodeDataLoss, "%s", mk.Reason)}, true
	case mk.State == upgradeStuck:
		a.dropTrial()
		a.dropUpgrade()
		return commandResult{err: protocol.Errorf(protocol.CodeDataLoss, "%s", mk.Reason)}, true
	case mk.State == upgradeTrial && running == mk.FromSHA256 && !fileExists(previousBinary(a.cfg.Binary)):
		// The service manager put the previous binary back: the new one
		// kept dying before it could report (fm-agent.service).
		a.dropTrial()
		a.dropUpgrade()
		return commandResult{err: protocol.Errorf(protocol.CodeAborted,
			"the agent was not upgraded to %s: the new binary failed to start or to report (it exited three times, or hung past its deadline), and the service manager put the previous one back; version %s runs again", mk.ToVersion, a.cfg.Version)}, true
	}
	// On trial with the old binary and the previous one kept: killed before
	// the swap. Carried out again.
	return commandResult{}, false
}

// canUpgrade says why the agent cannot replace its binary from rawURL, if
// it cannot: Unimplemented when this agent does not upgrade itself at all
// (a rollout skips it), InvalidArgument for a URL not FM's.
func (a *Agent) canUpgrade(rawURL string) *protocol.Error {
	if a.cfg.Binary == "" || a.selfSHA == "" {
		return protocol.Errorf(protocol.CodeUnimplemented, "this agent does not know its own binary, so it cannot replace it; reprovision the machine to give it FM's agent")
	}
	// Only a binary on the machine's own disk: a local machine's agent
	// that runs FM's shared binary must not replace it for every machine.
	// The binary's path has its links resolved (agentcmd): the root's too.
	root := filepath.Clean(a.cfg.RootDir)
	if resolved, err := filepath.EvalSymlinks(root); err == nil {
		root = resolved
	}
	if rel, err := filepath.Rel(root, a.cfg.Binary); err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
		return protocol.Errorf(protocol.CodeUnimplemented, "the agent's binary %s is not on this machine's disk (%s); reprovision the machine to give it FM's agent", a.cfg.Binary, root)
	}
	if slices.Contains(packagedDirs, filepath.Dir(a.cfg.Binary)) {
		return protocol.Errorf(protocol.CodeUnimplemented, "the agent's binary %s belongs to the system's package manager: upgrade the fm package instead", a.cfg.Binary)
	}
	u, err := url.Parse(rawURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return protocol.Errorf(protocol.CodeInvalidArgument, "upgrade-agent: %q is not an http(s) URL", rawURL)
	}
	// From FM only: the host the agent joined through.
	if a.cfg.Join != nil {
		if j, err := url.Parse(a.cfg.Join.URL); err == nil && (j.Scheme != u.Scheme || j.Host != u.Host) {
			return protocol.Errorf(protocol.CodeInvalidArgument, "upgrade-agent: %s is not Fleet Manager's (%s://%s)", rawURL, j.Scheme, j.Host)
		}
	}
	return nil
}

// stageBinary downloads the new binary beside the agent's, checks its
// digest and runs its `version`: the staged file's path, and that output.
func (a *Agent) stageBinary(ctx context.Context, p protocol.UpgradeAgentParams) (string, string, *protocol.Error) {
	tlsConf, err := a.cfg.clientTLS()
	if err != nil {
		return "", "", protocol.Errorf(protocol.CodeInternal, "%v", err)
	}
	client := &http.Client{Timeout: 10 * time.Minute, Transport: &http.Transport{TLSClientConfig: tlsConf, Proxy: http.ProxyFromEnvironment}}
	defer client.CloseIdleConnections()
	// FM out of reach, or answering 5xx, is tried again for a while: a
	// transient failure must not fail the upgrade.
	var resp *http.Response
	backoff := time.Second
	for attempt := 1; ; attempt++ {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.URL, nil)
		if err != nil {
			return "", "", protocol.Errorf(protocol.CodeInvalidArgument, "upgrade-agent: %v", err)
		}
		resp, err = client.Do(req)
		if err == nil && resp.StatusCode == http.StatusOK {
			break
		}
		why := ""
		if err != nil {
			why = err.Error()
		} else {
			why = fmt.Sprintf("%s answered %s", p.URL, resp.Status)
			resp.Body.Close()
			if resp.StatusCode < 500 {
				return "", "", protocol.Errorf(protocol.CodeFailedPrecondition, "the new agent binary could not be downloaded: %s", why)
			}
		}
		if attempt >= downloadAttempts || ctx.Err() != nil {
			return "", "", protocol.Errorf(protocol.CodeUnavailable, "the new agent binary could not be downloaded (%d tries): %s", attempt, why)
		}
		a.log.Warn().Str("error", why).Dur("retry_in", backoff).Msg("agent binary download failed; trying again")
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
	defer resp.Body.Close()
	a.sweepStaged()
	f, err := os.CreateTemp(filepath.Dir(a.cfg.Binary), "."+filepath.Base(a.cfg.Binary)+".new-*")
	if err != nil {
		return "", "", protocol.Errorf(protocol.CodeInternal, "%v", err)
	}
	staged := f.Name()
	fail := func(perr *protocol.Error, out string) (string, string, *protocol.Error) {
		f.Close()
		os.Remove(staged)
		return "", out, perr
	}
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(f, h), io.LimitReader(resp.Body, maxAgentBinary+1))
	switch {
	case err != nil:
		return fail(protocol.Errorf(protocol.CodeUnavailable, "the new agent binary could not be downloaded: %v", err), "")
	case n > maxAgentBinary:
		return fail(protocol.Errorf(protocol.CodeInvalidArgument, "the new agent binary is larger than %d MiB", maxAgentBinary>>20), "")
	case hex.EncodeToString(h.Sum(nil)) != p.SHA256:
		return fail(protocol.Errorf(protocol.CodeInvalidArgument, "the binary downloaded from %s is not the one asked for (sha256 %s, not %s)", p.URL, hex.EncodeToString(h.Sum(nil)), p.SHA256), "")
	}
	if err := f.Chmod(0o755); err != nil {
		return fail(protocol.Errorf(protocol.CodeInternal, "%v", err), "")
	}
	if err := f.Sync(); err != nil {
		return fail(protocol.Errorf(protocol.CodeInternal, "%v", err), "")
	}
	if err := f.Close(); err != nil {
		return fail(protocol.Errorf(protocol.CodeInternal, "%v", err), "")
	}
	a.crash.At("agent/upgrade:downloaded")
	out, err := a.runStaged(ctx, staged, "version")
	version, ok := buildinfo.VersionOf(out)
	if err != nil || !ok {
		os.Remove(staged)
		return "", lastBytes(out, 2000), protocol.Errorf(protocol.CodeFailedPrecondition, "the new agent binary does not run on this machine (its version: %v); nothing was changed", errOr(err, "not an fm binary"))
	}
	if len(a.cfg.CheckArgs) > 0 {
		if cout, err := a.runStaged(ctx, staged, a.cfg.CheckArgs...); err != nil || !strings.Contains(cout, CheckOK) {
			if err == nil {
				err = errors.New("it did not say " + CheckOK)
			}
			os.Remove(staged)
			return "", lastBytes(cout, 2000), protocol.Errorf(protocol.CodeFailedPrecondition, "the new agent binary refuses this machine's agent command line or config (%v); nothing was changed", err)
		}
	}
	return staged, version, nil
}

// runStaged runs the staged binary with args, for at most
// versionCheckTime: its output, and its error. A start refused as "text
// file busy" (another goroutine forked while the file was open for
// writing, a known race of exec after a write) is tried again.
func (a *Agent) runStaged(ctx context.Context, staged string, args ...string) (string, error) {
	for attempt := 1; ; attempt++ {
		vctx, cancel := context.WithTimeout(ctx, versionCheckTime)
		var out bytes.Buffer
		cmd := exec.CommandContext(vctx, staged, args...)
		cmd.Stdout, cmd.Stderr = &out, &out
		err := cmd.Run()
		cancel()
		if !errors.Is(err, syscall.ETXTBSY) || attempt >= 5 {
			return out.String(), err
		}
		time.Sleep(time.Duration(attempt) * 100 * time.Millisecond)
	}
}

// sweepStaged removes the downloads a killed agent left beside its binary.
func (a *Agent) sweepStaged() {
	left, _ := filepath.Glob(filepath.Join(filepath.Dir(a.cfg.Binary), "."+filepath.Base(a.cfg.Binary)+".new-*"))
	for _, f := range left {
		if err := os.Remove(f); err == nil {
			a.log.Info().Str("file", f).Msg("download of an upgrade cut short removed")
		}
	}
}

func errOr(err error, otherwise string) string {
	if err != nil {
		return err.Error()
	}
	return otherwise
}

// syncDir makes a rename in dir durable.
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
}
