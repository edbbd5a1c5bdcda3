package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/rs/zerolog"
)

// machine is this machine as the agent sees it: where things are, and DSS
// driven only through the interface of Dataiku's install kit, so that a real
// DSS kit works as the stand-in does.
type machine struct {
	cfg Config
	log zerolog.Logger

	dssDir    string // DSS data directory, on the data volume
	agentData string // the agent's files on the data volume (secrets, command cursor)
	stateDir  string // the agent's files on the OS disk (progress marker)
	kitCache  string // downloaded kit archives
	kitRoot   string // extracted kits

	// unitLoaded is set once systemd was asked to read DSS's unit by this
	// agent (ensureUnit).
	unitLoaded atomic.Bool
}

func newMachine(cfg Config, log zerolog.Logger) *machine {
	return &machine{
		cfg: cfg, log: log,
		dssDir:    filepath.Join(cfg.DataDir, "dataiku", "dss_data"),
		agentData: filepath.Join(cfg.DataDir, "fm-agent"),
		stateDir:  filepath.Join(cfg.RootDir, "var", "lib", "fm-agent"),
		kitCache:  filepath.Join(cfg.RootDir, "var", "cache", "fm-agent", "kits"),
		kitRoot:   filepath.Join(cfg.RootDir, "opt", "dataiku"),
	}
}

// rooted returns path p inside the machine's root (the OS disk).
func (m *machine) rooted(p ...string) string {
	return filepath.Join(append([]string{m.cfg.RootDir}, p...)...)
}

// isRealRoot reports whether the agent manages the machine it runs on ("/"),
// as opposed to a folder standing for one (local backend, tests).
func (m *machine) isRealRoot() bool { return filepath.Clean(m.cfg.RootDir) == "/" }

// installedVersion is the DSS version of the data directory, "" if none.
func (m *machine) installedVersion() (string, error) {
	b, err := m.readDSSFile(filepath.Join(m.dssDir, "dss-version.json"), maxDSSFileBytes)
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	var v struct {
		ProductVersion string `json:"product_version"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return "", fmt.Errorf("dss-version.json: %w", err)
	}
	return v.ProductVersion, nil
}

// port is the DSS base port of install.ini.
func (m *machine) port() (int, error) {
	ini, err := m.readINI()
	if err != nil {
		return 0, err
	}
	p, err := strconv.Atoi(ini["server.port"])
	if err != nil || p < 1 || p > 65535 {
		return 0, fmt.Errorf("install.ini: server.port %q is not a port", ini["server.port"])
	}
	return p, nil
}

// dssInputs summarises what DSS reads when it starts and setup actions
// change (dssInputFiles): if it changed, DSS must restart to see it.
func (m *machine) dssInputs() string { return inputsDigest(m.dssInputFiles()) }

// inputsDigest is one digest of what dssInputFiles gives.
func inputsDigest(files map[string]string) string {
	h := sha256.New()
	for _, k := range slices.Sorted(maps.Keys(files)) {
		fmt.Fprintf(h, "%s\x00%s\x00", k, files[k])
	}
	return hex.EncodeToString(h.Sum(nil))
}

// dssInputFiles are what DSS reads when it starts and setup actions change,
// each with a digest of its content ("-" when absent): its environment and
// properties, install.ini and what regenerate-config makes of it, the
// license, the CA certificates FM installed, the JDBC drivers, and what FM
// gave DSS that no file shows (the record's). The files of the DSS folder
// are read the way openDSSFile says, each up to maxDriverBytes: what cannot
// be read so counts as absent. Names are relative to the data directory,
// or absolute on the machine.
func (m *machine) dssInputFiles() map[string]string {
	out := map[string]string{}
	add := func(p string) {
		name := p
		if rel, err := filepath.Rel(m.dssDir, p); err == nil && within(m.dssDir, p) {
			name = rel
		} else if rel, err := filepath.Rel(m.rooted(), p); err == nil && within(m.rooted(), p) {
			name = "/" + rel
		}
		var f *os.File
		var err error
		if within(m.dssFolder(), p) {
			f, _, err = m.openDSSFile(p)
		} else {
			f, err = os.Open(p) // the agent's own (the CA anchors)
		}
		if err != nil {
			out[name] = "-"
			return
		}
		defer f.Close()
		h := sha256.New()
		n, _ := io.Copy(h, io.LimitReader(f, maxDriverBytes))
		out[name] = fmt.Sprintf("%x:%d", h.Sum(nil), n)
	}
	// env-default.sh is what regenerate-config makes of install.ini: a
	// regeneration a killed agent left undone changes it at the replay.
	for _, p := range []string{
		filepath.Join(m.dssDir, "bin", "env-site.sh"), filepath.Join(m.dssDir, "config", "dip.properties"),
		filepath.Join(m.dssDir, "install.ini"), filepath.Join(m.dssDir, "bin", "env-default.sh"), m.licensePath(),
		filepath.Join(m.dssDir, "bin", "env-spark.sh"), // dssadmin install-spark-integration's
	} {
		add(p)
	}
	for k, v := range m.loadRecord().AtStart {
		out["fm:"+k] = v
	}
	cas, _ := filepath.Glob(m.rooted("etc", "pki", "ca-trust", "source", "anchors", "fm-*.pem"))
	for _, p := range cas {
		add(p)
	}
	// The drivers' folder, a few levels deep (subpathInDatadir), without
	// following links.
	var walk func(dir string, depth int)
	walk = func(dir string, depth int) {
		entries, _ := m.readDSSDir(dir, maxDirEntries)
		for _, e := range entries {
			p := filepath.Join(dir, e.Name())
			switch {
			case e.IsDir() && depth < 8:
				walk(p, depth+1)
			case e.Type().IsRegular():
				add(p)
			}
		}
	}
	walk(filepath.Join(m.dssDir, "lib", "jdbc"), 0)
	return out
}

// answers reports whether DSS answers HTTP on its base port. Any answer
// below 500 counts: DSS's home page redirects to its login.
func (m *machine) answers(ctx context.Context) bool {
	port, err := m.port()
	if err != nil {
		return false
	}
	return m.answersOn(ctx, port)
}

// answersOn reports whether DSS answers HTTP on port.
func (m *machine) answersOn(ctx context.Context, port int) bool {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/", port), nil)
	resp, err := noRedirectClient.Do(req)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode < 500
}

var noRedirectClient = &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

// waitAnswers polls until DSS answers, for at most timeout.
func (m *machine) waitAnswers(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if m.answers(ctx) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("DSS did not answer on its base port within %s", timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// dss runs DATA_DIR/bin/dss with action (start, stop, status, restart).
func (m *machine) dss(ctx context.Context, action string, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if m.useSystemd() {
		return m.dssByUnit(ctx, action)
	}
	return m.run(ctx, filepath.Join(m.dssDir, "bin", "dss"), action)
}

// startDSS runs bin/dss start and waits until DSS answers, both within the
// start timeout. The error says which part failed.
func (m *machine) startDSS(ctx context.Context) (string, error) {
	// Starting a DSS that runs starts nothing: what it runs with is not
	// what the files say now, and is not noted as such. One that does not
	// run reads its files and port as it starts: they are noted before,
	// so that an agent killed while DSS comes up leaves them right.
	if !m.dssUp(ctx) {
		port, _ := m.port()
		m.noteStarted(m.dssInputFiles(), port)
	}
	out, err := m.dss(ctx, "start", m.cfg.DSSStartTimeout)
	if err != nil {
		return out, err
	}
	return out, m.waitAnswers(ctx, m.cfg.DSSStartTimeout)
}

// dssUp reports whether DSS runs: its processes, or an answer (a DSS run
// by a service manager this agent cannot see the processes of).
func (m *machine) dssUp(ctx context.Context) bool {
	return len(m.dssProcesses()) > 0 || m.answers(ctx)
}

// runsWithInputs reports whether DSS was last started with what it reads
// at start now; unknown (DSS started by an older agent) counts as yes when
// before, what the caller saw when it began, is what it sees now.
func (m *machine) runsWithInputs(before string) bool {
	now := m.dssInputs()
	if started := m.startedInputs(); started != "" {
		return started == now
	}
	return before == now
}

// restartDSS stops DSS (killing it if it will not stop) and starts it again.
func (m *machine) restartDSS(ctx context.Context) (string, error) {
	out, _ := m.stopDSS(ctx)
	startOut, err := m.startDSS(ctx)
	return out + startOut, err
}

// dsscli runs DATA_DIR/bin/dsscli.
func (m *machine) dsscli(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	return m.run(ctx, filepath.Join(m.dssDir, "bin", "dsscli"), args...)
}

// stopDSS stops DSS through bin/dss stop and, if that does not finish within
// the stop timeout or DSS still runs, kills every process of the data
// directory: restart-dss must work on a DSS that does not answer.
func (m *machine) stopDSS(ctx context.Context) (string, error) {
	out, err := m.dss(ctx, "stop", m.cfg.DSSStopTimeout)
	if err == nil && len(m.dssProcesses()) == 0 {
		return out, nil
	}
	n := m.killDSS()
	m.log.Warn().Err(err).Int("killed", n).Msg("DSS did not stop cleanly; its processes were killed")
	return out + fmt.Sprintf("\n(bin/dss stop: %v; killed %d processes)", err, n), nil
}

// dssProcesses lists the processes whose command line names the data
// directory: DSS's. DSS's installer names it too (-d): the processes that
// hold the install lock (installerProcesses) are not DSS, and are left out,
// so that stopping DSS never kills an installer at work.
func (m *machine) dssProcesses() []int {
	pids := cmdline.Find(m.dssDir)
	if len(pids) == 0 {
		return nil
	}
	installer := m.installerProcesses()
	return slices.DeleteFunc(pids, func(pid int) bool { return slices.Contains(installer, pid) })
}

func (m *machine) killDSS() int { return cmdline.Stop(m.dssProcesses(), 0) }

// installerProcesses are the processes other than the agent that hold the
// install lock: an installer (and what it started), perhaps left running by
// an agent that stopped or died.
func (m *machine) installerProcesses() []int {
	path, err := m.installLockPath()
	if err != nil {
		return nil
	}
	return lockHolders(path)
}

// maxOutput bounds the output kept of a command; its tail is what explains a
// failure.
const maxOutput = 64 << 10

// errInstallerRuns is the install lock held by another process: DSS's
// installer, which nothing else may work beside.
var errInstallerRuns = errors.New("DSS's installer runs on the data directory")

func (m *machine) installLockPath() (string, error) {
	path, err := filepath.Abs(filepath.Join(m.agentData, "install.lock"))
	if err != nil {
		return "", fmt.Errorf("install lock: %w", err)
	}
	return path, nil
}

// openInstallLock opens the install lock's file, a descriptor of its own:
// flock locks belong to an open file, so that this one conflicts with any
// other holder, in this process too.
func (m *machine) openInstallLock() (*os.File, error) {
	path, err := m.installLockPath()
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("install lock: %w", err)
	}
	return f, nil
}

// tryLockInstall takes the install lock if nobody holds it, and returns
// errInstallerRuns if someone does. What checks on or restarts DSS outside
// a convergence (the watchdog, commands) takes it so, and keeps away from
// DSS while an installer runs.
func (m *machine) tryLockInstall() (*os.File, error) {
	f, err := m.openInstallLock()
	if err != nil {
		return nil, err
	}
	err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	if err == nil {
		return f, nil
	}
	f.Close()
	if errors.Is(err, syscall.EWOULDBLOCK) {
		return nil, errInstallerRuns
	}
	return nil, fmt.Errorf("install lock: %w", err)
}

// lockInstall takes the install lock of the data volume, which the
// installer inherits (runInstaller) and holds as long as it runs, even
// after the agent that started it stopped or died. An installer left
// running so is waited for, up to the install timeout, then killed, with
// whatever else holds the lock: two installers never work on one data
// directory, and what the first did is seen before anything else is
// decided. The holders are killed again every second (one may have forked
// before it died, or something starts another); if the lock is still
// taken after a grace of its own (the install timeout, at most a minute),
// the step fails saying who holds it, rather than waiting for ever with
// the machine held.
func (m *machine) lockInstall(ctx context.Context) (*os.File, error) {
	path, err := m.installLockPath()
	if err != nil {
		return nil, err
	}
	f, err := m.openInstallLock()
	if err != nil {
		return nil, err
	}
	grace := min(time.Minute, m.cfg.InstallTimeout)
	start, logged := time.Now(), false
	var killing time.Time
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("install lock: %w", err)
		}
		if !logged {
			m.log.Warn().Ints("pids", lockHolders(path)).Msg("an installer started by an earlier agent still runs; waiting for it to end")
			logged = true
		}
		if time.Since(start) > m.cfg.InstallTimeout {
			if killing.IsZero() {
				killing = time.Now()
			}
			pids := lockHolders(path)
			if time.Since(killing) > grace {
				f.Close()
				return nil, fmt.Errorf("install lock: processes %v still hold %s after the install timeout (%s) and %s of killing them: something keeps starting them; stop it, then change the desired state (or restart the agent) to try again",
					pids, path, m.cfg.InstallTimeout, grace.Round(time.Second))
			}
			for _, pid := range pids {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
			if len(pids) > 0 {
				m.log.Warn().Ints("killed", pids).Dur("waited", time.Since(start)).Msg("the earlier installer outlived the install timeout; killed")
			}
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// keepIncompleteDataDir moves aside a data directory that holds files but
// no DSS version (an installer that was cut short: the machine stopped, or
// the installer outlived the install timeout), which DSS's installer would
// refuse to install into. Nothing is deleted; the folder moved aside is
// named in the install step's message. Called under the install lock.
func (m *machine) keepIncompleteDataDir() (string, error) {
	entries, err := m.readDSSDir(m.dssDir, 1)
	if errors.Is(err, os.ErrNotExist) || err == nil && len(entries) == 0 {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	kept := m.dssDir + ".incomplete-" + time.Now().UTC().Format("20060102T150405Z")
	// A rename moves what is at the path, a link included, without
	// following it.
	if err := os.Rename(m.dssDir, kept); err != nil {
		return "", fmt.Errorf("move aside the incomplete data directory: %w", err)
	}
	m.log.Warn().Str("kept", kept).Msg("a data directory without a DSS version (an interrupted install) was moved aside")
	return filepath.Base(kept), nil
}

// lockHolders are the processes that have path open.
func lockHolders(path string) []int {
	fds, _ := filepath.Glob("/proc/[0-9]*/fd/*")
	var pids []int
	for _, fd := range fds {
		if target, err := os.Readlink(fd); err != nil || target != path {
			continue
		}
		pid, err := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(fd))))
		if err == nil && pid != os.Getpid() && !slices.Contains(pids, pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// runInstaller runs DSS's installer, as the DSS account, within the install
// timeout, handing it the install lock (see lockInstall). The installer is
// not stopped with the agent: cut short, it would leave a data directory
// half made. The agent stops waiting for it; the next agent waits on the
// lock it holds, then carries on from what it left. ended, if set, is
// called once the installer has ended, even when the agent stopped waiting
// for it: what the installer reads (the license handed to it) is removed
// then, not before.
func (m *machine) runInstaller(ctx context.Context, lock *os.File, ended func(), name string, args ...string) (string, error) {
	if ended == nil {
		ended = func() {}
	}
	// Its own descriptor of the lock: the caller closes lock when it
	// returns, perhaps before the installer started.
	if lock == nil {
		ended()
		return "", errors.New("DSS's installer runs only under the install lock")
	}
	// Close-on-exec, as every descriptor of the agent: only the installer
	// is handed it (DSS started later must not hold the lock for life).
	fd, _, errno := syscall.Syscall(syscall.SYS_FCNTL, lock.Fd(), syscall.F_DUPFD_CLOEXEC, 0)
	if errno != 0 {
		ended()
		return "", fmt.Errorf("install lock: %w", errno)
	}
	held := os.NewFile(fd, lock.Name())
	type result struct {
		out string
		err error
	}
	done := make(chan result, 1)
	go func() {
		run, cancel := context.WithTimeout(context.WithoutCancel(ctx), m.cfg.InstallTimeout)
		out, err := m.runWith(run, held, runDSS, name, args...)
		cancel()
		held.Close()
		ended()
		done <- result{out, err}
	}()
	select {
	case r := <-done:
		return r.out, r.err
	case <-ctx.Done():
		return "", fmt.Errorf("the agent is stopping; DSS's installer runs on, holding the install lock: %w", ctx.Err())
	}
}

// deleteAPIKeys deletes DSS's API keys labelled label (bin/dsscli
// api-keys-list and api-key-delete).
func (m *machine) deleteAPIKeys(ctx context.Context, label string) (string, error) {
	out, err := m.dsscli(ctx, "api-keys-list", "--output", "json")
	if err != nil {
		return out, err
	}
	var keys []struct {
		ID    string `json:"id"`
		Label string `json:"label"`
	}
	if err := json.Unmarshal([]byte(strings.TrimSpace(out)), &keys); err != nil {
		return out, fmt.Errorf("dsscli api-keys-list printed no JSON list: %w", err)
	}
	for _, k := range keys {
		if k.Label != label {
			continue
		}
		if out, err := m.dsscli(ctx, "api-key-delete", k.ID); err != nil {
			return out, err
		}
		m.log.Info().Str("label", label).Msg("an admin API key made before a crash and never kept was deleted")
	}
	return "", nil
}

// run runs a program and returns the tail of its combined output. DSS's
// programs (those of its data directory) run as the DSS account.
func (m *machine) run(ctx context.Context, name string, args ...string) (string, error) {
	return m.runWith(ctx, nil, runAuto, name, args...)
}

// runAs says as whom runWith runs a program.
type runAs int

const (
	runAuto  runAs = iota // the DSS account for DSS's programs, else the agent's
	runDSS                // the DSS account
	runAgent              // the agent's own account (root on a real machine)
)

// runWith is run, handing the program inherit (as its descriptor 3) if set,
// as who says.
func (m *machine) runWith(ctx context.Context, inherit *os.File, who runAs, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	if inherit != nil {
		cmd.ExtraFiles = []*os.File{inherit}
	}
	out := &tailBuffer{max: maxOutput}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = os.Environ()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if who == runDSS || who == runAuto && strings.HasPrefix(name, m.dssDir) {
		acc, err := m.dssAccount(ctx)
		if err != nil {
			return "", err
		}
		acc.apply(cmd)
	}
	// A command cancelled by its context takes its children with it.
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%s %s: %w", filepath.Base(name), shownArgs(args), ctx.Err())
		} else {
			err = fmt.Errorf("%s %s: %w", filepath.Base(name), shownArgs(args), err)
		}
	}
	return out.String(), err
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	max     int
	buf     []byte
	dropped bool
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.buf = append(t.buf, p...)
	if len(t.buf) > t.max {
		t.buf = append(t.buf[:0], t.buf[len(t.buf)-t.max:]...)
		t.dropped = true
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	if t.dropped {
		return "…" + string(t.buf)
	}
	return string(t.buf)
}

// shownArgs is a command line as an error may show it: the value of any
// option naming a secret is masked (errors reach events and logs).
func shownArgs(args []string) string {
	shown := make([]string, len(args))
	secret := false
	for i, a := range args {
		name, _, inline := strings.Cut(a, "=")
		switch {
		case secret:
			shown[i] = "***"
		case inline && secretOption(name):
			shown[i] = name + "=***"
		default:
			shown[i] = a
		}
		secret = !inline && secretOption(a)
	}
	return strings.Join(shown, " ")
}

func secretOption(arg string) bool {
	if !strings.HasPrefix(arg, "-") {
		return false
	}
	name := strings.ToLower(arg)
	return strings.Contains(name, "password") || strings.Contains(name, "secret") || strings.Contains(name, "token")
}
