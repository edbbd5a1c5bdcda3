package agent

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/crashpoint"
	"github.com/fleetmanager/fm/protocol"
)

// The binaries of these tests are scripts: what matters is their digest
// and their `version`, which the agent runs before it swaps.
const (
	oldAgentScript = "#!/bin/sh\necho 'fm 1.0.0 (the old agent)'\n"
	newAgentScript = "#!/bin/sh\ncase \"$1\" in version) echo 'fm 2.0.0 (the new agent)';; agent) [ \"$2\" = --check ] && echo '" + CheckOK + "';; *) exit 1;; esac\n"
)

// upgradeRig is a rig whose agent knows its binary (on the machine's disk)
// and an HTTP server serving the binary to upgrade to.
type upgradeRig struct {
	*rig
	bin       string
	served    atomic.Pointer[string]
	downloads atomic.Int32
	url       string
	// answer, when set, is the status of the next failures downloads.
	answer, failures atomic.Int32
	// expiresAt is the expiry of the command a test sent, if any.
	expiresAt time.Time
}

func newUpgradeRig(t *testing.T) *upgradeRig {
	t.Helper()
	u := &upgradeRig{rig: newRig(t)}
	u.bin = filepath.Join(u.root, "usr", "local", "bin", "fm")
	writeExecutable(t, u.bin, oldAgentScript)
	u.cfg.Binary, u.cfg.Version, u.cfg.CheckArgs = u.bin, "1.0.0", []string{"agent", "--check"}
	u.serve(newAgentScript)
	u.tune = func(a *Agent) { a.upgradeLead, a.deadlineMargin = 0, time.Second }
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.downloads.Add(1)
		if code := int(u.answer.Load()); code != 0 && u.failures.Add(-1) >= 0 {
			http.Error(w, "not now", code)
			return
		}
		_, _ = w.Write([]byte(*u.served.Load()))
	}))
	t.Cleanup(ts.Close)
	u.url = ts.URL + "/download/fm"
	return u
}

func (u *upgradeRig) serve(script string) { u.served.Store(&script) }

func (u *upgradeRig) params(script string, within int) protocol.UpgradeAgentParams {
	return protocol.UpgradeAgentParams{URL: u.url, SHA256: sha256hex([]byte(script)), ReportWithinSeconds: within}
}

func writeExecutable(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o755); err != nil {
		t.Fatal(err)
	}
}

// run starts an agent on whatever binary is in place (its digest is what
// it goes by) and returns what its Run returned.
func (u *upgradeRig) run() <-chan error {
	u.t.Helper()
	u.startAgent()
	return u.done
}

// waitRestart waits for the agent to stop asking to be executed again,
// as its command line would.
func (u *upgradeRig) waitRestart(done <-chan error) {
	u.t.Helper()
	select {
	case err := <-done:
		if !errors.Is(err, ErrRestart) {
			u.t.Fatalf("Run returned %v, want ErrRestart", err)
		}
		u.agent.Close()
		u.cancel = nil
	case <-time.After(time.Minute):
		u.t.Fatal("the agent did not restart within a minute")
	}
}

func (u *upgradeRig) content() string {
	b, err := os.ReadFile(u.bin)
	if err != nil {
		u.t.Fatal(err)
	}
	return string(b)
}

func (u *upgradeRig) marker() *upgradeMarker {
	var mk upgradeMarker
	ok, err := loadJSON(filepath.Join(u.root, "var", "lib", "fm-agent", "agent-upgrade.json"), &mk)
	if err != nil {
		u.t.Fatal(err)
	}
	if !ok {
		return nil
	}
	return &mk
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func TestUpgradeAgentInPlace(t *testing.T) {
	u := newUpgradeRig(t)
	done := u.run()
	id := u.command(protocol.CommandUpgradeAgent, u.params(newAgentScript, 60))
	u.waitRestart(done)
	if u.content() != newAgentScript || !exists(previousBinary(u.bin)) {
		t.Fatalf("after the swap the binary is %q, the previous one kept: %v", u.content(), exists(previousBinary(u.bin)))
	}
	trial := filepath.Join(u.root, "var", "lib", "fm-agent", "upgrade-trial")
	if mk := u.marker(); mk == nil || mk.State != upgradeTrial || mk.Command != id || !exists(trial) {
		t.Fatalf("marker after the swap: %+v (trial file: %v)", mk, exists(trial))
	}
	if n := len(u.events.find(func(e protocol.Event) bool { return e.CommandID == id })); n != 0 {
		t.Fatalf("the old agent answered the command (%d events): the new one must", n)
	}

	// The new binary starts (as the command line executes it) and reports.
	u.cfg.Version = "2.0.0"
	u.run()
	res := u.result(id)
	if res.Status != protocol.StatusOK || !strings.Contains(res.Message, "upgraded from 1.0.0 to 2.0.0") {
		t.Fatalf("result: %+v", res)
	}
	u.waitCommandDone(id)
	if u.marker() != nil || exists(previousBinary(u.bin)) || exists(trial) {
		t.Fatalf("kept: marker %+v, previous binary left: %v, trial file left: %v", u.marker(), exists(previousBinary(u.bin)), exists(trial))
	}
	u.waitStatus("the new digest reported", 30*time.Second, func(s protocol.AgentStatus) bool {
		return s.AgentSHA256 == sha256hex([]byte(newAgentScript)) && s.AgentVersion == "2.0.0"
	})

	// Delivered twice: answered once. Asked again: nothing downloaded.
	u.commandWithID(id, id+"-again", protocol.CommandUpgradeAgent, u.params(newAgentScript, 60), time.Time{})
	again := u.command(protocol.CommandUpgradeAgent, u.params(newAgentScript, 60))
	if res := u.result(again); res.Status != protocol.StatusOK || !strings.Contains(res.Message, "already runs this binary") {
		t.Fatalf("asked again: %+v", res)
	}
	if n := len(u.events.find(func(e protocol.Event) bool { return e.Kind == protocol.EventCommand && e.CommandID == id })); n != 1 {
		t.Errorf("the upgrade was answered %d times", n)
	}
	if n := u.downloads.Load(); n != 1 {
		t.Errorf("%d downloads, want 1", n)
	}
	u.stopAgent()
}

// TestUpgradeAgentRollsBack: a new agent that does not report in time, or
// keeps dying, is replaced by the previous binary, which answers why.
func TestUpgradeAgentRollsBack(t *testing.T) {
	tests := []struct {
		name string
		// trial runs the new binary until it rolls back.
		trial func(u *upgradeRig)
		want  string
		// kept: the marker still says trial (the agent never rolled back)
		kept bool
		// expires, if set, is how long the command is worth running.
		expires time.Duration
	}{
		{name: "the bus out of its reach past the deadline", want: "did not report by", trial: func(u *upgradeRig) {
			good := u.cfg.NATSURL
			u.cfg.NATSURL = "nats://127.0.0.1:1"
			u.waitRestart(u.run())
			u.cfg.NATSURL = good
		}},
		{name: "started after the deadline", want: "did not report by", trial: func(u *upgradeRig) {
			time.Sleep(time.Until(u.marker().Deadline))
			u.waitRestart(u.run())
		}},
		{name: "started after the deadline and the command's expiry", want: "did not report by", expires: 5 * time.Second, trial: func(u *upgradeRig) {
			mk := u.marker()
			if !mk.Deadline.Before(u.expiresAt) {
				u.t.Fatalf("the trial's deadline %s is not before the command's expiry %s", mk.Deadline, u.expiresAt)
			}
			time.Sleep(time.Until(mk.Deadline.Add(time.Second)))
			u.waitRestart(u.run())
			// The old agent runs the command past its expiry: it answers
			// how the upgrade ended, not that the command expired.
			time.Sleep(time.Until(u.expiresAt.Add(500 * time.Millisecond)))
		}},
		{name: "dying at every start", want: "started 3 times without reporting", trial: func(u *upgradeRig) {
			// Three starts that died before reporting (a service manager
			// restarts it each time), then a fourth.
			mk := u.marker()
			mk.Starts = maxTrialStarts
			if err := saveJSON(filepath.Join(u.root, "var", "lib", "fm-agent", "agent-upgrade.json"), mk, 0o600); err != nil {
				u.t.Fatal(err)
			}
			u.waitRestart(u.run())
		}},
		{name: "put back by the service manager", want: "the service manager put the previous one back", trial: func(u *upgradeRig) {
			// The new binary never ran (it died at once, three times):
			// fm-agent.service's ExecStopPost put the previous one back.
			if !exists(filepath.Join(u.root, "var", "lib", "fm-agent", "upgrade-trial")) {
				u.t.Fatal("no trial file for the service manager to count in")
			}
			if err := os.Rename(previousBinary(u.bin), u.bin); err != nil {
				u.t.Fatal(err)
			}
			if err := os.Remove(filepath.Join(u.root, "var", "lib", "fm-agent", "upgrade-trial")); err != nil {
				u.t.Fatal(err)
			}
		}, kept: true},
		{name: "killed while rolling back", want: "started 3 times without reporting", trial: func(u *upgradeRig) {
			mk := u.marker()
			mk.Starts = maxTrialStarts
			if err := saveJSON(filepath.Join(u.root, "var", "lib", "fm-agent", "agent-upgrade.json"), mk, 0o600); err != nil {
				u.t.Fatal(err)
			}
			crasher := &crashpoint.Crasher{N: 1, At: "agent/upgrade:rollback-recorded", Die: func() {}}
			cfg := u.cfg
			cfg.Crash = crasher.Hook()
			a, err := New(cfg)
			if err != nil {
				u.t.Fatal(err)
			}
			go func() { _ = a.Run(context.Background()) }() // parked at the point for good
			select {
			case <-crasher.Crashed():
			case <-time.After(time.Minute):
				u.t.Fatal("the rollback never began")
			}
			a.logFile.Close()
			if u.content() != newAgentScript {
				u.t.Fatal("the binary changed before the marker said so")
			}
			// Started again, still on the new binary: it finishes.
			u.waitRestart(u.run())
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			u := newUpgradeRig(t)
			within := 3
			done := u.run()
			id := protocol.NewID("cmd")
			var expires time.Time
			if tc.expires != 0 {
				expires = time.Now().Add(tc.expires)
				u.expiresAt = expires
			}
			u.commandWithID(id, id, protocol.CommandUpgradeAgent, u.params(newAgentScript, within), expires)
			u.waitRestart(done)
			u.cfg.Version = "2.0.0"
			tc.trial(u)
			if u.content() != oldAgentScript || exists(previousBinary(u.bin)) {
				t.Fatalf("after the rollback the binary is %q", u.content())
			}
			if mk := u.marker(); mk == nil || (mk.State != upgradeRolledBack) != tc.kept {
				t.Fatalf("marker after the rollback: %+v", mk)
			}
			u.cfg.Version = "1.0.0"
			u.run()
			res := u.result(id)
			if res.Status != protocol.StatusFailed || res.Error == nil || res.Error.Code != protocol.CodeAborted ||
				!strings.Contains(res.Error.Message, tc.want) || !strings.Contains(res.Error.Message, "version 1.0.0 runs again") {
				t.Fatalf("result: %+v %+v", res, res.Error)
			}
			u.waitCommandDone(id)
			if u.marker() != nil || exists(filepath.Join(u.root, "var", "lib", "fm-agent", "upgrade-trial")) {
				t.Errorf("marker or trial file left: %+v", u.marker())
			}
			u.stopAgent()
		})
	}
}

// TestUpgradeAgentDownloadRetries: FM answering 503 a while is waited
// out; a 404 is not.
func TestUpgradeAgentDownloadRetries(t *testing.T) {
	u := newUpgradeRig(t)
	u.answer.Store(http.StatusServiceUnavailable)
	u.failures.Store(2)
	done := u.run()
	u.command(protocol.CommandUpgradeAgent, u.params(newAgentScript, 60))
	u.waitRestart(done)
	if n := u.downloads.Load(); n != 3 || u.content() != newAgentScript {
		t.Fatalf("%d downloads, binary %q", n, u.content())
	}

	u2 := newUpgradeRig(t)
	u2.answer.Store(http.StatusNotFound)
	u2.failures.Store(100)
	u2.run()
	res := u2.result(u2.command(protocol.CommandUpgradeAgent, u2.params(newAgentScript, 60)))
	if res.Error == nil || res.Error.Code != protocol.CodeFailedPrecondition || u2.downloads.Load() != 1 || u2.content() != oldAgentScript {
		t.Fatalf("a 404: %+v %+v after %d downloads", res, res.Error, u2.downloads.Load())
	}
	u2.stopAgent()
}

// TestUpgradeAgentRefuses: what cannot be upgraded to changes nothing.
func TestUpgradeAgentRefuses(t *testing.T) {
	tests := []struct {
		name   string
		change func(u *upgradeRig, p *protocol.UpgradeAgentParams)
		code   protocol.Code
		want   string
	}{
		{name: "a malformed digest", code: protocol.CodeInvalidArgument, want: "64 lower-case hex",
			change: func(u *upgradeRig, p *protocol.UpgradeAgentParams) { p.SHA256 = "abc" }},
		{name: "another binary than asked for", code: protocol.CodeInvalidArgument, want: "not the one asked for",
			change: func(u *upgradeRig, p *protocol.UpgradeAgentParams) { u.serve(newAgentScript + "# tampered\n") }},
		{name: "a binary that does not run here", code: protocol.CodeFailedPrecondition, want: "does not run on this machine",
			change: func(u *upgradeRig, p *protocol.UpgradeAgentParams) {
				bad := "#!/bin/sh\nexit 1\n"
				u.serve(bad)
				*p = u.params(bad, 60)
			}},
		{name: "a binary that refuses this agent's command line", code: protocol.CodeFailedPrecondition, want: "refuses this machine's agent command line",
			change: func(u *upgradeRig, p *protocol.UpgradeAgentParams) {
				picky := "#!/bin/sh\n[ \"$1\" = version ] && echo 'fm 2.0.1 (picky)' && exit 0\nexit 2\n"
				u.serve(picky)
				*p = u.params(picky, 60)
			}},
		{name: "a binary off the machine's disk", code: protocol.CodeUnimplemented, want: "not on this machine's disk",
			change: func(u *upgradeRig, p *protocol.UpgradeAgentParams) {
				u.bin = filepath.Join(u.t.TempDir(), "fm")
				writeExecutable(u.t, u.bin, oldAgentScript)
				u.cfg.Binary = u.bin
			}},
		{name: "an agent that does not know its binary", code: protocol.CodeUnimplemented, want: "does not know its own binary",
			change: func(u *upgradeRig, p *protocol.UpgradeAgentParams) { u.cfg.Binary = "" }},
		{name: "a report window too long", code: protocol.CodeInvalidArgument, want: "reportWithinSeconds",
			change: func(u *upgradeRig, p *protocol.UpgradeAgentParams) { p.ReportWithinSeconds = 7200 }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			u := newUpgradeRig(t)
			p := u.params(newAgentScript, 60)
			tc.change(u, &p)
			before := u.content()
			u.run()
			id := u.command(protocol.CommandUpgradeAgent, p)
			res := u.result(id)
			if res.Status != protocol.StatusFailed || res.Error == nil || res.Error.Code != tc.code || !strings.Contains(res.Error.Message, tc.want) {
				t.Fatalf("result: %+v %+v", res, res.Error)
			}
			if u.content() != before || exists(previousBinary(u.bin)) || u.marker() != nil {
				t.Errorf("a refusal changed the machine: binary %q, previous %v, marker %+v", u.content(), exists(previousBinary(u.bin)), u.marker())
			}
			entries, _ := os.ReadDir(filepath.Dir(u.bin))
			if len(entries) != 1 {
				t.Errorf("files left beside the binary: %v", entries)
			}
			u.stopAgent()
		})
	}
}

// TestUpgradeAgentCrashPoints kills the agent at each crash point of an
// upgrade, delivers the command once more, and starts the agent again on
// whatever binary is in place until it answers: it ends upgraded,
// answered once, with nothing left over.
func TestUpgradeAgentCrashPoints(t *testing.T) {
	var points []string
	{
		u := newUpgradeRig(t)
		var rec crashpoint.Recorder
		u.cfg.Crash = rec.Hook()
		done := u.run()
		id := u.command(protocol.CommandUpgradeAgent, u.params(newAgentScript, 60))
		u.waitRestart(done)
		u.run()
		u.result(id)
		u.waitCommandDone(id)
		u.stopAgent()
		for _, p := range rec.Points() {
			if strings.Contains(p, "upgrade") {
				points = append(points, p)
			}
		}
	}
	if len(points) < 3 {
		t.Fatalf("the upgrade passes %d crash points: %v", len(points), points)
	}
	for n, point := range points {
		t.Run(point, func(t *testing.T) {
			u := newUpgradeRig(t)
			crasher := &crashpoint.Crasher{N: countBefore(points, n) + 1, At: point}
			u.cfg.Crash = crasher.Hook()
			// The agent, and those it is started again as, until one dies
			// at the point (some are passed by the new agent).
			var (
				cur    atomic.Pointer[Agent]
				cancel atomic.Pointer[context.CancelFunc]
			)
			crasher.Die = func() {
				if a := cur.Load(); a.nc != nil {
					a.nc.Close()
				}
				(*cancel.Load())()
			}
			start := func() <-chan error {
				a, err := New(u.cfg)
				if err != nil {
					t.Fatal(err)
				}
				ctx, stop := context.WithCancel(context.Background())
				cur.Store(a)
				cancel.Store(&stop)
				ran := make(chan error, 1)
				go func() { ran <- a.Run(ctx) }()
				t.Cleanup(func() { stop(); a.logFile.Close() })
				return ran
			}
			ran := start()
			id := "cmd-upgrade-crash"
			u.commandWithID(id, id, protocol.CommandUpgradeAgent, u.params(newAgentScript, 60), time.Now().Add(10*time.Minute))
		wait:
			for {
				select {
				case <-crasher.Crashed():
					break wait
				case err := <-ran:
					if !errors.Is(err, ErrRestart) {
						t.Fatalf("the agent ended (%v) before crash point %s", err, point)
					}
					cur.Load().Close()
					ran = start()
				case <-time.After(time.Minute):
					t.Fatalf("the agent never reached crash point %s", point)
				}
			}
			u.commandWithID(id, id+"-again", protocol.CommandUpgradeAgent, u.params(newAgentScript, 60), time.Now().Add(10*time.Minute))
			u.cfg.Crash = nil
			u.untilAnswered(id)
			res := u.result(id)
			if res.Status != protocol.StatusOK {
				t.Fatalf("result: %+v %+v", res, res.Error)
			}
			u.waitCommandDone(id)
			time.Sleep(300 * time.Millisecond)
			if n := len(u.events.find(func(e protocol.Event) bool { return e.Kind == protocol.EventCommand && e.CommandID == id })); n != 1 {
				t.Errorf("answered %d times", n)
			}
			if u.content() != newAgentScript || exists(previousBinary(u.bin)) || u.marker() != nil {
				t.Errorf("after the upgrade: binary %q, previous %v, marker %+v", u.content(), exists(previousBinary(u.bin)), u.marker())
			}
			if entries, _ := os.ReadDir(filepath.Dir(u.bin)); len(entries) != 1 {
				t.Errorf("files left beside the binary: %v", entries)
			}
			u.stopAgent()
		})
	}
}

// untilAnswered starts the agent again on whatever binary is in place
// each time it asks to be (as its command line, or systemd, would) until
// the command is answered.
func (u *upgradeRig) untilAnswered(id string) {
	u.t.Helper()
	answered := func() bool {
		return len(u.events.find(func(e protocol.Event) bool { return e.Kind == protocol.EventCommand && e.CommandID == id })) > 0
	}
	for range 4 {
		done := u.run()
		deadline := time.Now().Add(time.Minute)
		for !answered() {
			select {
			case err := <-done:
				if !errors.Is(err, ErrRestart) {
					u.t.Fatalf("Run: %v", err)
				}
				u.agent.Close()
				u.cancel = nil
			case <-time.After(50 * time.Millisecond):
				if time.Now().After(deadline) {
					u.t.Fatalf("command %s not answered within a minute", id)
				}
				continue
			}
			break
		}
		if answered() {
			return
		}
	}
	u.t.Fatalf("command %s not answered after 4 starts", id)
}

// TestUpgradeAgentOnlyFromFM: the binary comes from the machine's own disk
// and FM's host, nowhere else.
func TestUpgradeAgentOnlyFromFM(t *testing.T) {
	root := t.TempDir()
	bin := filepath.Join(root, "usr", "local", "bin", "fm")
	tests := []struct {
		name string
		cfg  Config
		url  string
		want string
	}{
		{name: "FM's host", cfg: Config{RootDir: root, Binary: bin, Join: &protocol.JoinSpec{URL: "https://fm.example.com:10000/api/join"}}, url: "https://fm.example.com:10000/download/fm"},
		{name: "no join: the bus's credentials", cfg: Config{RootDir: root, Binary: bin}, url: "http://127.0.0.1:1/download/fm"},
		{name: "another host", cfg: Config{RootDir: root, Binary: bin, Join: &protocol.JoinSpec{URL: "https://fm.example.com:10000/api/join"}}, url: "https://evil.example.com:10000/download/fm", want: "is not Fleet Manager's"},
		{name: "plain HTTP to FM's HTTPS host", cfg: Config{RootDir: root, Binary: bin, Join: &protocol.JoinSpec{URL: "https://fm.example.com:10000/api/join"}}, url: "http://fm.example.com:10000/download/fm", want: "is not Fleet Manager's"},
		{name: "not http", cfg: Config{RootDir: root, Binary: bin}, url: "file:///etc/passwd", want: "not an http(s) URL"},
		{name: "a binary beside the machine's disk", cfg: Config{RootDir: root, Binary: root + "-other/fm"}, url: "http://127.0.0.1:1/download/fm", want: "not on this machine's disk"},
		{name: "a binary above it", cfg: Config{RootDir: root, Binary: filepath.Join(root, "..", "fm")}, url: "http://127.0.0.1:1/download/fm", want: "not on this machine's disk"},
		{name: "the fm package's binary", cfg: Config{RootDir: "/", Binary: "/usr/bin/fm"}, url: "http://127.0.0.1:1/download/fm", want: "upgrade the fm package instead"},
		{name: "the cloud machine's binary", cfg: Config{RootDir: "/", Binary: "/usr/local/bin/fm"}, url: "http://127.0.0.1:1/download/fm"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := &Agent{cfg: tc.cfg, selfSHA: sha256hex([]byte(oldAgentScript))}
			perr := a.canUpgrade(tc.url)
			switch {
			case tc.want == "" && perr != nil:
				t.Fatalf("refused: %v", perr)
			case tc.want != "" && (perr == nil || !strings.Contains(perr.Message, tc.want)):
				t.Fatalf("got %v, want %q", perr, tc.want)
			}
		})
	}
}

// countBefore is how many times points[n] occurs before n.
func countBefore(points []string, n int) int {
	c := 0
	for _, p := range points[:n] {
		if p == points[n] {
			c++
		}
	}
	return c
}

// TestUpgradeAgentDecidedByItsMarker: a new agent that reaches its command
// after its rollback was done under it (the deadline passed as the
// command came) does not answer "already runs this binary": it restarts
// on the binary put back, which answers. A second upgrade while one is on
// trial is refused, the binary known to work kept.
func TestUpgradeAgentDecidedByItsMarker(t *testing.T) {
	u := newUpgradeRig(t)
	done := u.run()
	id := u.command(protocol.CommandUpgradeAgent, u.params(newAgentScript, 60))
	u.waitRestart(done)
	u.cfg.Version = "2.0.0"
	a, err := New(u.cfg) // the new binary, as executed
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	restarted := false
	a.restart = func(error) { restarted = true }

	// Another upgrade while this binary is on trial: refused.
	other := protocol.Command{ID: "cmd-other", Instance: u.instance, Kind: protocol.CommandUpgradeAgent}
	other.Params, _ = json.Marshal(u.params("#!/bin/sh\necho 'fm 3.0.0'\n", 60))
	if res := a.upgradeAgent(context.Background(), other); res.err == nil || res.err.Code != protocol.CodeUnavailable || !exists(previousBinary(u.bin)) {
		t.Fatalf("a second upgrade on trial: %+v", res)
	}

	// The deadline passes: the watcher's rollback, then the command.
	a.upgradeMu.Lock()
	mk, _ := a.loadUpgrade()
	if err := a.rollBack(mk, "the new agent did not report by now"); !errors.Is(err, ErrRestart) {
		t.Fatalf("rollBack: %v", err)
	}
	a.upgradeMu.Unlock()
	cmd := protocol.Command{ID: id, Instance: u.instance, Kind: protocol.CommandUpgradeAgent}
	cmd.Params, _ = json.Marshal(u.params(newAgentScript, 60))
	res := a.upgradeAgent(context.Background(), cmd)
	if !res.restart || !restarted || res.err != nil || res.message != "" {
		t.Fatalf("the new agent after its rollback answered %+v (restarted %v)", res, restarted)
	}
	if u.content() != oldAgentScript || u.marker() == nil || u.marker().State != upgradeRolledBack {
		t.Fatalf("after: binary %q marker %+v", u.content(), u.marker())
	}
	// The old binary, executed, answers.
	u.cfg.Version = "1.0.0"
	u.run()
	if r := u.result(id); r.Error == nil || r.Error.Code != protocol.CodeAborted || !strings.Contains(r.Error.Message, "did not report by now") {
		t.Fatalf("the old agent's answer: %+v %+v", r, r.Error)
	}
	u.stopAgent()
}

// TestUpgradeAgentWatchdog: on a machine systemd runs, the old agent arms
// a transient timer past the trial's deadline; its script puts the
// previous binary back and restarts the agent's unit only while the trial
// file is there (a new binary that hung before it read its marker).
func TestUpgradeAgentWatchdog(t *testing.T) {
	u := newUpgradeRig(t)
	u.cfg.ServiceManager = "systemd"
	var armed []string
	u.tune = func(a *Agent) {
		a.upgradeLead, a.deadlineMargin = 0, time.Second
		a.systemdRun = func(_ context.Context, args ...string) (string, error) { armed = args; return "", nil }
	}
	done := u.run()
	id := u.command(protocol.CommandUpgradeAgent, u.params(newAgentScript, 60))
	u.waitRestart(done)
	if len(armed) != 9 || armed[0] != "--unit" || armed[1] != "fm-agent-upgrade-"+id+"-1" || armed[2] != "--collect" || armed[3] != "--on-active" || armed[6] != "/bin/sh" {
		t.Fatalf("systemd-run %q", armed)
	}
	if secs, _ := strconv.Atoi(strings.TrimSuffix(armed[4], "s")); secs < 60+110 || secs > 60+125 {
		t.Fatalf("the watchdog fires in %s, want the deadline (60 s) and its grace (120 s)", armed[4])
	}
	// The script, with systemctl a stand-in that records what it restarts.
	stub := t.TempDir()
	writeExecutable(t, filepath.Join(stub, "systemctl"), "#!/bin/sh\necho \"$@\" >> "+filepath.Join(stub, "restarted")+"\n")
	script := armed[8]
	trialFile := filepath.Join(u.root, "var", "lib", "fm-agent", "upgrade-trial")
	runScript := func() {
		cmd := exec.Command("/bin/sh", "-c", script)
		cmd.Env = append(os.Environ(), "PATH="+stub+":"+os.Getenv("PATH"))
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("watchdog script: %v\n%s", err, out)
		}
	}
	// Another trial's file (a later upgrade): this watchdog leaves it be.
	original, _ := os.ReadFile(trialFile)
	if err := os.WriteFile(trialFile, []byte(id+"-2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	runScript()
	if _, err := os.Stat(filepath.Join(stub, "restarted")); err == nil || u.content() != newAgentScript {
		t.Fatal("the watchdog acted on another trial")
	}
	if err := os.WriteFile(trialFile, original, 0o600); err != nil {
		t.Fatal(err)
	}
	runScript()
	restarted, _ := os.ReadFile(filepath.Join(stub, "restarted"))
	if u.content() != oldAgentScript || strings.TrimSpace(string(restarted)) != "restart fm-agent.service" ||
		exists(filepath.Join(u.root, "var", "lib", "fm-agent", "upgrade-trial")) {
		t.Fatalf("after the watchdog: binary %q, systemctl %q", u.content(), restarted)
	}
	// Kept (or rolled back) before it fires: it does nothing.
	writeExecutable(t, u.bin, newAgentScript)
	os.Remove(filepath.Join(stub, "restarted"))
	runScript()
	if _, err := os.Stat(filepath.Join(stub, "restarted")); err == nil || u.content() != newAgentScript {
		t.Fatal("the watchdog acted with no trial under way")
	}
}

// TestUpgradeAgentTooLate: an upgrade asked too close to its command's
// expiry for the download and the report window is refused, changing
// nothing, and downloads nothing.
func TestUpgradeAgentTooLate(t *testing.T) {
	u := newUpgradeRig(t)
	u.run()
	id := protocol.NewID("cmd")
	u.commandWithID(id, id, protocol.CommandUpgradeAgent, u.params(newAgentScript, 60), time.Now().Add(30*time.Second))
	res := u.result(id)
	if res.Error == nil || res.Error.Code != protocol.CodeDeadlineExceeded || !strings.Contains(res.Error.Message, "too soon") {
		t.Fatalf("result: %+v %+v", res, res.Error)
	}
	if u.downloads.Load() != 0 || u.content() != oldAgentScript || u.marker() != nil {
		t.Fatalf("refused too late, yet: %d downloads, binary %q, marker %+v", u.downloads.Load(), u.content(), u.marker())
	}
	u.stopAgent()
}
