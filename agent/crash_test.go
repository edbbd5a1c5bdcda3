package agent

import (
	"context"
	"encoding/json"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/deploy/standin/kit"
	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/fleetmanager/fm/internal/crashpoint"
	"github.com/fleetmanager/fm/internal/crashpoint/crashtable"
	"github.com/fleetmanager/fm/protocol"
)

// TestCrashPoints is the agent's crash-point table: each piece of the
// agent's work (the startup sequence of a new machine, an upgrade in place,
// a new machine on a kept volume, a settings change, commands) is killed at
// each crash point in turn (its bus connection and install lock drop, the
// goroutine that reached the point never goes on, DSS and what else runs on
// the machine go on), the work is delivered once more, a new agent starts
// on the same disks, and the outcome is checked: the generation is reached
// with DSS answering, one DSS runs, the credentials FM keeps open DSS and
// exactly one admin API key of FM's exists, commands are answered once with
// their effect. FM_CRASH_FULL=1 runs every point; by default one in two.
func TestCrashPoints(t *testing.T) {
	stride := 2
	if crashtable.Full() {
		stride = 1
	}
	var cases []crashtable.Case
	for _, sc := range agentScenarios() {
		var points []string
		if !t.Run(sc.name+"/record", func(t *testing.T) {
			if points = recordScenario(t, sc); len(points) == 0 {
				t.Fatal("the work passes no crash point")
			}
		}) {
			continue
		}
		for _, n := range crashtable.Select(len(points), stride) {
			cases = append(cases, crashtable.Case{Operation: sc.name, N: n, Point: crashtable.Occurrence(points, n),
				Run: func(t *testing.T) { crashScenario(t, sc, n) }})
		}
	}
	crashtable.Report(t, "agent", crashtable.Run(t, "agent", 3, cases))
}

// agentScenario is a piece of the agent's work.
type agentScenario struct {
	name string
	// setup brings the machine to where the work starts, with agents that
	// do not crash; it leaves no agent running.
	setup func(r *rig)
	// act starts the work and returns how to deliver it once more.
	act func(r *rig) (again func())
	// done waits for the outcome and checks it.
	done func(r *rig)
}

var crashActions = []protocol.SetupAction{
	action(protocol.ActionAddEnvVariables, `{"variables":[{"key":"FM_CRASH","value":"1"}]}`),
	action(protocol.ActionAddProperties, `{"properties":[{"key":"crash.test","value":"yes"}],"stage":"after_dss_startup"}`),
}

// sparkActions change what DSS reads at start before it starts (the
// variable) and once it runs (the Spark integration, which restarts it),
// and nothing else after it started: a kill between the integration and
// the restart it needs leaves DSS running without it, the files as they
// must be, and only the record of what DSS started with tells.
var sparkActions = []protocol.SetupAction{
	action(protocol.ActionAddEnvVariables, `{"variables":[{"key":"FM_CRASH","value":"1"}]}`),
	action(protocol.ActionSetupK8sAndSpark, `{}`),
}

func agentScenarios() []agentScenario {
	ready := func(r *rig) {
		r.startAgent()
		r.waitReady(r.desire(kit.Versions[0], crashActions...).Generation)
		r.stopAgent()
	}
	desire := func(version string, actions ...protocol.SetupAction) func(r *rig) func() {
		return func(r *rig) func() {
			d := r.desire(version, actions...)
			return func() { r.put(d) } // the same state, at a new revision
		}
	}
	converged := func(version string) func(r *rig) {
		return func(r *rig) {
			st := r.waitReady(r.gen)
			if st.DSS.State != protocol.DSSRunning || st.DSS.Version != version {
				r.t.Errorf("DSS after the restart: %+v", st.DSS)
			}
			r.checkMachine()
		}
	}
	// withFacts adds, where Ansible is installed, a task after the install
	// that writes the facts setup actions see (was DSS installed, upgraded?)
	// and checks them once converged: an agent killed after the installer
	// ended must not tell its setup actions it installed nothing.
	withFacts := func(version, want string) (func(r *rig) func(), func(r *rig)) {
		if _, err := exec.LookPath("ansible-playbook"); err != nil {
			return desire(version, crashActions...), converged(version)
		}
		facts := func(r *rig) string { return filepath.Join(r.data, "facts.txt") }
		return func(r *rig) func() {
				task := action(protocol.ActionRunAnsibleTasks, `{"stage":"after_install","ansibleTasks":"- copy:\n    dest: `+facts(r)+
					`\n    content: \"{{ dataiku.dss.was_installed }} {{ dataiku.dss.was_upgraded }}\"\n"}`)
				return desire(version, append(slices.Clone(crashActions), task)...)(r)
			}, func(r *rig) {
				converged(version)(r)
				if b, err := os.ReadFile(facts(r)); err != nil || string(b) != want {
					r.t.Errorf("the setup actions after the install were told %q (%v), want %q", b, err, want)
				}
			}
	}
	commandScenario := func(name string, kind protocol.CommandKind, params any, check func(r *rig, res protocol.Event)) agentScenario {
		return agentScenario{name: name, setup: ready,
			act: func(r *rig) func() {
				id := "cmd-" + name
				r.commandWithID(id, id, kind, params, time.Now().Add(10*time.Minute))
				r.lastCommand = id
				return func() { r.commandWithID(id, id+"-again", kind, params, time.Now().Add(10*time.Minute)) }
			},
			done: func(r *rig) {
				res := r.result(r.lastCommand)
				if res.Status != protocol.StatusOK {
					r.t.Errorf("%s: %+v", name, res)
				}
				// A crash after the answer runs the command again, answered
				// under the same id (kept once): the machine is checked once
				// the new agent recorded it done.
				r.waitCommandDone(r.lastCommand)
				// Answered once: the result's id derives from the command's.
				time.Sleep(500 * time.Millisecond)
				if n := len(r.events.find(func(e protocol.Event) bool {
					return e.Kind == protocol.EventCommand && e.CommandID == r.lastCommand
				})); n != 1 {
					r.t.Errorf("the command was answered %d times", n)
				}
				check(r, res)
				r.checkMachine()
			}}
	}
	newest := kit.Versions[len(kit.Versions)-1]
	// joinScenario: a new machine joins FM (a fake join endpoint that binds
	// the token to the first key, as FM does) and reports.
	joins := map[*rig]*fakeJoin{}
	var joinsMu sync.Mutex
	joinScenario := agentScenario{name: "join",
		setup: func(r *rig) {
			fj := newFakeJoin(r.t)
			ts := httptest.NewServer(fj)
			r.t.Cleanup(ts.Close)
			r.cfg.Join = &protocol.JoinSpec{URL: ts.URL + "/api/join", Token: "jt-crash.secret"}
			joinsMu.Lock()
			joins[r] = fj
			joinsMu.Unlock()
		},
		act: func(r *rig) func() { return func() {} },
		done: func(r *rig) {
			r.waitStatus("reported after joining", time.Minute, func(s protocol.AgentStatus) bool { return s.Time.After(r.since) })
			joinsMu.Lock()
			fj := joins[r]
			joinsMu.Unlock()
			asked := fj.keysAsked()
			for _, k := range asked {
				if k != asked[0] {
					r.t.Fatalf("the machine asked with two keys: %v", asked)
				}
			}
			var id identity
			if b, err := os.ReadFile(newMachine(r.cfg, r.cfg.Logger).identityPath()); err != nil || json.Unmarshal(b, &id) != nil || id.InstanceKey != fj.key {
				r.t.Fatalf("identity: %v %+v", err, id)
			}
		}}
	installAct, installDone := withFacts(kit.Versions[0], "True False")
	upgradeAct, upgradeDone := withFacts(newest, "False True")
	return []agentScenario{
		joinScenario,
		{name: "startup-sequence", setup: func(*rig) {}, act: installAct, done: installDone},
		{name: "upgrade", setup: ready, act: upgradeAct, done: upgradeDone},
		{name: "spark", setup: func(*rig) {}, act: desire(kit.Versions[0], sparkActions...), done: converged(kit.Versions[0])},
		// A new machine (a new OS disk) on the kept volume converges to the
		// desired state it finds.
		{name: "new-machine", setup: func(r *rig) { ready(r); r.newMachineRoot() },
			act: func(r *rig) func() {
				d := r.lastDesired
				return func() { r.put(d) }
			}, done: converged(kit.Versions[0])},
		{name: "settings", setup: ready, act: desire(kit.Versions[0], crashActions[0],
			action(protocol.ActionAddProperties, `{"properties":[{"key":"crash.test","value":"changed"}],"stage":"after_dss_startup"}`)),
			done: converged(kit.Versions[0])},
		commandScenario("restart-dss", protocol.CommandRestartDSS, nil, func(r *rig, _ protocol.Event) {}),
		commandScenario("reset-user-password", protocol.CommandResetUserPassword,
			protocol.ResetUserPasswordParams{UserName: "admin", Password: "crash-proof"}, func(r *rig, _ protocol.Event) {
				if r.login("admin", "crash-proof") != 200 {
					r.t.Error("the new password does not open DSS")
				}
			}),
		commandScenario("replay-setup-actions", protocol.CommandReplaySetupActions, nil, func(r *rig, _ protocol.Event) {}),
	}
}

// recordScenario runs the work once without a crash and returns the crash
// points it passed.
func recordScenario(t *testing.T, sc agentScenario) []string {
	r := newRig(t)
	sc.setup(r)
	var rec crashpoint.Recorder
	r.cfg.Crash = rec.Hook()
	r.since = time.Now()
	r.startAgent()
	sc.act(r)
	sc.done(r)
	r.stopAgent()
	r.cfg.Crash = nil
	return rec.Points()
}

// crashScenario kills an agent at the n-th crash point of the work,
// delivers the work once more, starts a new agent on the same disks and
// checks the outcome.
func crashScenario(t *testing.T, sc agentScenario, n int) {
	r := newRig(t)
	sc.setup(r)
	crasher := &crashpoint.Crasher{N: n}
	r.cfg.Crash = crasher.Hook()
	r.since = time.Now()
	a, err := New(r.cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	crasher.Die = func() {
		// What the death of the process takes with it: its connection,
		// its descriptors (the install lock), its goroutines. DSS and the
		// installer it started live on.
		if a.nc != nil {
			a.nc.Close()
		}
		if l := a.installLock.Load(); l != nil {
			l.Close()
		}
		cancel()
	}
	go func() { _ = a.Run(ctx) }()
	t.Cleanup(func() { cancel(); a.logFile.Close() })
	again := sc.act(r)
	select {
	case <-crasher.Crashed():
	case <-time.After(2 * time.Minute):
		t.Fatalf("the agent never reached crash point %d", n)
	}
	again()
	r.cfg.Crash = nil
	r.startAgent()
	sc.done(r)
}

// waitCommandDone waits until the agent recorded the command done.
func (r *rig) waitCommandDone(id string) {
	r.t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		var cur commandCursor
		if _, err := loadJSON(filepath.Join(r.data, "fm-agent", "commands.json"), &cur); err == nil && cur.seen(id) && cur.Running == nil {
			return
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("the agent did not record command %s done within a minute", id)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// checkMachine checks what must hold on a machine after any piece of work:
// one DSS, answering, and credentials that open it with exactly one admin
// API key of FM's.
func (r *rig) checkMachine() {
	r.t.Helper()
	if dss := cmdline.Find(r.dssDir(), "serve"); len(dss) != 1 {
		r.t.Errorf("%d DSS processes run, want 1", len(dss))
	}
	if pids := lockHolders(filepath.Join(r.data, "fm-agent", "install.lock")); len(pids) > 0 {
		r.t.Errorf("processes %v hold the install lock with no installer running", pids)
	}
	var s dssSecrets
	if _, err := loadJSON(filepath.Join(r.data, "fm-agent", "dss-credentials.json"), &s); err != nil || s.InitialPassword == "" || s.AdminAPIKey == "" {
		r.t.Fatalf("credentials %+v: %v", s, err)
	}
	if r.lastCommand != "cmd-reset-user-password" && r.login("admin", s.InitialPassword) != 200 {
		r.t.Error("the initial password FM keeps does not open DSS")
	}
	code, body := r.get("/api/runtime", s.AdminAPIKey)
	if code != 200 {
		r.t.Errorf("the admin API key FM keeps does not open DSS (%d)", code)
	}
	// DSS runs with what its setup actions set, those after its start
	// included: a kill between a change and the restart it needs is made
	// up for.
	var rt struct {
		Env   map[string]string `json:"env"`
		Spark struct {
			Enabled bool `json:"enabled"`
		} `json:"spark"`
	}
	json.Unmarshal(body, &rt)
	if d := r.lastDesired; d != nil && slices.ContainsFunc(d.SetupActions, func(a protocol.SetupAction) bool { return a.Type == protocol.ActionSetupK8sAndSpark }) &&
		(!rt.Spark.Enabled || rt.Env["FM_CRASH"] != "1") {
		r.t.Errorf("DSS does not run with what its setup actions set: %s", body)
	}
	out, err := newMachine(r.cfg, r.cfg.Logger).dsscli(context.Background(), "api-keys-list", "--output", "json")
	var keys []struct{ Label string }
	if err != nil || json.Unmarshal([]byte(out), &keys) != nil {
		r.t.Fatalf("api-keys-list: %v: %s", err, out)
	}
	n := 0
	for _, k := range keys {
		if strings.HasPrefix(k.Label, "fleet-manager") {
			n++
		}
	}
	if n != 1 {
		r.t.Errorf("%d admin API keys of FM's exist, want 1: %s", n, out)
	}
	env, _ := os.ReadFile(filepath.Join(r.dssDir(), "bin", "env-site.sh"))
	if c := strings.Count(string(env), "FM_CRASH"); c != 1 {
		r.t.Errorf("env-site.sh sets FM_CRASH %d times", c)
	}
}
