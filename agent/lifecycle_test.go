package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

func (r *rig) createProject(key string) {
	r.t.Helper()
	var s dssSecrets
	loadJSON(filepath.Join(r.data, "fm-agent", "dss-credentials.json"), &s)
	req, _ := http.NewRequest("POST", "http://127.0.0.1:"+itoa(r.dssPort())+"/public/api/projects/", strings.NewReader(`{"projectKey":"`+key+`","name":"x"}`))
	req.SetBasicAuth(s.AdminAPIKey, "")
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		r.t.Fatalf("create project: %v %v", resp, err)
	}
	resp.Body.Close()
}

func itoa(n int) string { b, _ := json.Marshal(n); return string(b) }

func TestUpgradeOnAKeptDataDirectory(t *testing.T) {
	r := newRig(t)
	r.startAgent()
	d1 := r.desire("13.4.0")
	r.waitReady(d1.Generation)
	r.createProject("KEEPME")
	var s dssSecrets
	loadJSON(filepath.Join(r.data, "fm-agent", "dss-credentials.json"), &s)

	// Reprovision on a new image: a new machine (new OS disk), the data
	// volume kept; DSS of the old machine is gone with it.
	r.stopAgent()
	newMachine(r.cfg, r.agent.log).killDSS()
	r.newMachineRoot()
	r.startAgent()
	d2 := r.desire("14.0.0")
	st := r.waitReady(d2.Generation)
	if st.DSS.Version != "14.0.0" || st.DSS.State != protocol.DSSRunning {
		t.Fatalf("after upgrade: %+v", st.DSS)
	}
	up := r.events.wait(t, "upgrade step", time.Second, func(e protocol.Event) bool {
		return e.Generation == d2.Generation && e.Step == "upgrade" && e.Status == protocol.StatusOK
	})
	if !strings.Contains(up.Message, "13.4.0 to 14.0.0") {
		t.Errorf("upgrade message %q", up.Message)
	}
	if len(r.events.find(func(e protocol.Event) bool { return e.Generation == d2.Generation && e.Step == "install" })) != 0 {
		t.Error("a kept data directory was installed again")
	}
	// The stand-in's migration happened, and the data survived it.
	mig, err := os.ReadFile(filepath.Join(r.dssDir(), "config", "migrations.json"))
	if err != nil || !strings.Contains(string(mig), "users.json") {
		t.Fatalf("migration record: %s %v", mig, err)
	}
	if code, body := r.get("/public/api/projects/KEEPME/", s.AdminAPIKey); code != 200 {
		t.Fatalf("project lost: %d %s", code, body)
	}
	if r.login("admin", s.InitialPassword) != 200 {
		t.Fatal("the admin password did not survive the upgrade")
	}
	// The credentials were not recreated.
	if len(r.events.find(func(e protocol.Event) bool { return e.Generation == d2.Generation && e.Step == "credentials" })) != 0 {
		t.Error("credentials recreated on a kept data directory")
	}
}

func TestDowngradeRefused(t *testing.T) {
	r := newRig(t)
	r.startAgent()
	r.waitReady(r.desire("14.0.0").Generation)
	r.stopAgent()
	newMachine(r.cfg, r.agent.log).killDSS()
	r.newMachineRoot()
	r.startAgent()
	d := r.desire("13.4.0")
	st := r.waitFailed(d.Generation)
	if st.Error == nil || st.Error.Code != protocol.CodeFailedPrecondition || !strings.Contains(st.Error.Message, "downgrade refused") {
		t.Fatalf("error %+v", st.Error)
	}
	if v, _ := newMachine(r.cfg, r.agent.log).installedVersion(); v != "14.0.0" {
		t.Fatalf("the data directory changed: %s", v)
	}
	// Forced, the agent tries, and the kit's own refusal is what fails it.
	d2 := *d
	r.gen++
	d2.Generation, d2.DSS.AllowDowngrade = r.gen, true
	r.put(&d2)
	r.waitFailed(d2.Generation)
	e := r.events.wait(t, "forced downgrade", time.Second, func(e protocol.Event) bool {
		return e.Generation == d2.Generation && e.Step == "upgrade" && e.Status == protocol.StatusFailed
	})
	if !strings.Contains(e.Output, "downgrades are not supported") {
		t.Fatalf("the kit's refusal is not in the event's output: %q", e.Output)
	}
}

func TestSettingsOnlyGenerationDoesNotReinstall(t *testing.T) {
	r := newRig(t)
	r.startAgent()
	d1 := r.desire("14.0.0", action(protocol.ActionAddEnvVariables, `{"variables":[{"key":"COLOR","value":"blue"}]}`))
	r.waitReady(d1.Generation)
	d2 := r.desire("14.0.0", action(protocol.ActionAddEnvVariables, `{"variables":[{"key":"COLOR","value":"green"}]}`))
	r.waitReady(d2.Generation)
	for _, e := range r.events.find(func(e protocol.Event) bool { return e.Generation == d2.Generation }) {
		if e.Step == "install" || e.Step == "upgrade" || e.Step == "fetch-kit" || e.Step == "attach-data" {
			t.Fatalf("generation %d ran %s", d2.Generation, e.Step)
		}
	}
	r.events.wait(t, "restart for the new settings", time.Second, func(e protocol.Event) bool {
		return e.Generation == d2.Generation && e.Step == "restart-dss" && e.Status == protocol.StatusOK
	})
	env, _ := os.ReadFile(filepath.Join(r.dssDir(), "bin", "env-site.sh"))
	if !strings.Contains(string(env), "COLOR='green'") || strings.Contains(string(env), "blue") {
		t.Fatalf("env-site.sh:\n%s", env)
	}
	// Removing the action removes its effect; an unchanged generation does
	// not restart DSS.
	d3 := r.desire("14.0.0")
	r.waitReady(d3.Generation)
	env, _ = os.ReadFile(filepath.Join(r.dssDir(), "bin", "env-site.sh"))
	if strings.Contains(string(env), "COLOR") {
		t.Fatalf("a removed action left its block:\n%s", env)
	}
	// A new driver restarts DSS; the same driver again does not.
	jar := filepath.Join(t.TempDir(), "d.jar")
	os.WriteFile(jar, []byte("JAR"), 0o644)
	jdbc := action(protocol.ActionInstallJDBCDriver, `{"url":"file://`+jar+`"}`)
	d4 := r.desire("14.0.0", jdbc)
	r.waitReady(d4.Generation)
	d5 := r.desire("14.0.0", jdbc)
	r.waitReady(d5.Generation)
	restarts := func(gen uint64) int {
		return len(r.events.find(func(e protocol.Event) bool {
			return e.Generation == gen && e.Step == "restart-dss" && e.Status == protocol.StatusOK
		}))
	}
	if restarts(d4.Generation) != 1 || restarts(d5.Generation) != 0 {
		t.Errorf("restarts: %d for a new driver (want 1), %d for the same one (want 0)", restarts(d4.Generation), restarts(d5.Generation))
	}
}

func TestFailingActionFailsTheSequence(t *testing.T) {
	jar := filepath.Join(t.TempDir(), "d.jar")
	os.WriteFile(jar, []byte("JAR"), 0o644)
	for _, tc := range []struct {
		name, params, want string
	}{
		{"a driver that is not there", `{"url":"file://` + filepath.Join(t.TempDir(), "absent.jar") + `"}`, "absent.jar"},
		{"a folder outside the data directory", `{"url":"file://` + jar + `","subpathInDatadir":"../../outside"}`, "data directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t)
			r.startAgent()
			d := r.desire("14.0.0", action(protocol.ActionInstallJDBCDriver, tc.params))
			st := r.waitFailed(d.Generation)
			if st.Error == nil || !strings.Contains(st.Error.Message, "INSTALL_JDBC_DRIVER") || !strings.Contains(st.Error.Message, tc.want) {
				t.Fatalf("error %+v, want one naming %q", st.Error, tc.want)
			}
			e := r.events.wait(t, "the failed action", time.Second, func(e protocol.Event) bool {
				return e.Status == protocol.StatusFailed && strings.HasPrefix(e.Step, "setup-action[0]")
			})
			if e.Error == nil {
				t.Fatal("a failed action event without its error")
			}
			// DSS was not started: the sequence stopped at the failure.
			if len(r.events.find(func(e protocol.Event) bool { return e.Step == "start-dss" })) != 0 {
				t.Fatal("the sequence went on after a failed action")
			}
			if _, err := os.Stat(filepath.Join(filepath.Dir(filepath.Dir(r.dssDir())), "outside")); err == nil {
				t.Fatal("a driver was written outside the DSS data directory")
			}
		})
	}
}

func TestAnsibleTasks(t *testing.T) {
	if _, err := exec.LookPath("ansible-playbook"); err != nil {
		if os.Getenv("FM_REQUIRE_ANSIBLE") != "" {
			t.Fatal("ansible-playbook is required (FM_REQUIRE_ANSIBLE is set) but not installed")
		}
		t.Skip("ansible-playbook is not installed; .ci/run installs it (apt-get install ansible-core)")
	}
	r := newRig(t)
	marker := filepath.Join(t.TempDir(), "facts.txt")
	r.startAgent()
	d := r.desire("14.0.0",
		action(protocol.ActionRunAnsibleTasks, `{"stage":"after_dss_startup","ansibleTasks":"- copy:\n    dest: `+marker+`\n    content: \"{{ dataiku.dss.version }} {{ dataiku.dss.node_type }} {{ dataiku.dss.port }} {{ dataiku.dss.was_installed }}\"\n"}`))
	r.waitReady(d.Generation)
	b, err := os.ReadFile(marker)
	if err != nil || strings.TrimSpace(string(b)) != "14.0.0 design "+itoa(r.port)+" True" {
		t.Fatalf("facts seen by the tasks: %q %v", b, err)
	}
	// A failing task fails the sequence with Ansible's output.
	d2 := r.desire("14.0.0", action(protocol.ActionRunAnsibleTasks, `{"stage":"after_install","ansibleTasks":"- fail:\n    msg: deliberately broken\n"}`))
	st := r.waitFailed(d2.Generation)
	e := r.events.wait(t, "failed ansible action", time.Second, func(e protocol.Event) bool {
		return e.Generation == d2.Generation && e.Status == protocol.StatusFailed && strings.Contains(e.Step, "RUN_ANSIBLE_TASKS")
	})
	if !strings.Contains(e.Output, "deliberately broken") || st.Error == nil {
		t.Fatalf("ansible output not reported: %q", e.Output)
	}
}

func TestAnsibleAbsentIsAClearFailure(t *testing.T) {
	m := newMachine(Config{RootDir: t.TempDir(), DataDir: t.TempDir()}, zerolog.Nop())
	ar := &actionRunner{m: m, lookPath: func(string) (string, error) { return "", exec.ErrNotFound }}
	res := ar.run(context.Background(), action(protocol.ActionRunAnsibleTasks, `{"stage":"after_install","ansibleTasks":"- debug: msg=x"}`), 0, ansibleFacts{}, nil)
	if res.status != protocol.StatusFailed || !strings.Contains(res.message, "ansible-playbook is not installed") {
		t.Fatalf("%+v", res)
	}
}

func TestPackageManagerCommand(t *testing.T) {
	dir := t.TempDir()
	script := filepath.Join(dir, "pm")
	log := filepath.Join(dir, "calls")
	os.WriteFile(script, []byte("#!/bin/sh\necho \"$@\" >> "+log+"\necho installing \"$@\"\n"), 0o755)
	m := newMachine(Config{RootDir: t.TempDir(), DataDir: t.TempDir(), PackageManager: script + " install -y"}, zerolog.Nop())
	ar := &actionRunner{m: m, lookPath: exec.LookPath}
	res := ar.run(context.Background(), action(protocol.ActionInstallSystemPackages, `{"packages":["htop","jq"]}`), 0, ansibleFacts{}, nil)
	calls, _ := os.ReadFile(log)
	if res.status != protocol.StatusOK || strings.TrimSpace(string(calls)) != "install -y htop jq" || !strings.Contains(res.output, "installing") {
		t.Fatalf("%+v calls=%q", res, calls)
	}
	os.WriteFile(script, []byte("#!/bin/sh\necho 'No match for argument: nosuchpkg' >&2\nexit 1\n"), 0o755)
	res = ar.run(context.Background(), action(protocol.ActionInstallSystemPackages, `{"packages":["nosuchpkg"]}`), 0, ansibleFacts{}, nil)
	if res.status != protocol.StatusFailed || !strings.Contains(res.output, "No match for argument") {
		t.Fatalf("%+v", res)
	}
}

func TestKitFromObjectStoreAndBadDigest(t *testing.T) {
	r := newRig(t)
	src := standinKit(t, "14.0.0")
	store, err := r.js.ObjectStore(context.Background(), protocol.ObjectStoreKits)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(src.Path)
	if _, err := store.Put(context.Background(), jetstream.ObjectMeta{Name: "dss-14.tar.gz"}, bytes.NewReader(b)); err != nil {
		t.Fatal(err)
	}
	r.startAgent()
	r.gen++
	bad := &protocol.DesiredState{Instance: r.instance, Generation: r.gen, NodeType: "design",
		DSS: protocol.DSSTarget{Version: "14.0.0", Port: r.port, Kit: protocol.KitSource{Path: src.Path, SHA256: strings.Repeat("0", 64)}}}
	r.put(bad)
	st := r.waitFailed(bad.Generation)
	if st.Error == nil || st.Error.Code != protocol.CodeDataLoss || !strings.Contains(st.Error.Message, "SHA-256") {
		t.Fatalf("bad digest: %+v", st.Error)
	}
	r.gen++
	good := &protocol.DesiredState{Instance: r.instance, Generation: r.gen, NodeType: "automation",
		DSS: protocol.DSSTarget{Version: "14.0.0", Port: r.port, Kit: protocol.KitSource{Object: "dss-14.tar.gz"}}}
	r.put(good)
	if st := r.waitReady(good.Generation); st.DSS.NodeType != "automation" {
		t.Fatalf("%+v", st.DSS)
	}
}

func TestMalformedDesiredStateIsRejected(t *testing.T) {
	r := newRig(t)
	r.startAgent()
	d := r.desire("14.0.0")
	r.waitReady(d.Generation)
	for _, bad := range []string{`{"v":1,`, `{"v":7,"instance":"x"}`, `{"v":1,"instance":"` + r.instance + `","generation":9}`} {
		r.putRaw([]byte(bad))
	}
	r.events.wait(t, "rejections", 10*time.Second, func(e protocol.Event) bool {
		return len(r.events.find(func(e protocol.Event) bool { return e.Kind == protocol.EventRejected })) >= 3
	})
	// The agent keeps running at its last good generation, and takes the
	// next good one.
	if st, _ := r.status(); st.Phase != protocol.PhaseReady || st.Generation != d.Generation {
		t.Fatalf("after rejections: %+v", st)
	}
	r.gen = 20
	r.waitReady(r.desire("14.0.0").Generation)
}

// TestKitFetchRidesOutABusRestart: the bus goes away just as the agent
// fetches its kit from fm_kits (FM restarting); the agent retries until the
// bus is back, never reporting the generation failed, and reaches it.
func TestAnInterruptedInstallIsKeptAsideAndDoneAgain(t *testing.T) {
	r := newRig(t)
	// What an installer cut short leaves: files, but no DSS version.
	if err := os.MkdirAll(filepath.Join(r.dssDir(), "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(r.dssDir(), "install.ini"), []byte("[general]\n"), 0o644)
	r.startAgent()
	d := r.desire("14.0.0")
	r.waitReady(d.Generation)
	e := r.events.wait(t, "the install step", time.Second, func(e protocol.Event) bool {
		return e.Step == "install" && e.Status == protocol.StatusOK
	})
	kept, _ := filepath.Glob(r.dssDir() + ".incomplete-*")
	if len(kept) != 1 || !strings.Contains(e.Message, filepath.Base(kept[0])) {
		t.Fatalf("the incomplete data directory: kept as %v; install said %q", kept, e.Message)
	}
	if b, err := os.ReadFile(filepath.Join(kept[0], "install.ini")); err != nil || string(b) != "[general]\n" {
		t.Fatalf("what the interrupted install left was not kept: %q %v", b, err)
	}
}

func TestKitFetchRidesOutABusRestart(t *testing.T) {
	r := newRig(t)
	src := standinKit(t, "14.0.0")
	store, err := r.js.ObjectStore(context.Background(), protocol.ObjectStoreKits)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(src.Path)
	if _, err := store.Put(context.Background(), jetstream.ObjectMeta{Name: "dss-14.tar.gz"}, bytes.NewReader(b)); err != nil {
		t.Fatal(err)
	}
	restarted := make(chan struct{})
	var once sync.Once
	r.cfg.Crash = func(point string) {
		if point != "agent/fetch-kit:before" {
			return
		}
		once.Do(func() {
			// The bus is down from here on for longer than a request
			// waits for its answer (5s).
			r.bus.Shutdown()
			go func() {
				defer close(restarted)
				time.Sleep(8 * time.Second)
				r.bus.Restart(t)
			}()
		})
	}
	r.startAgent()
	r.gen++
	d := &protocol.DesiredState{Instance: r.instance, Generation: r.gen, NodeType: "design",
		DSS: protocol.DSSTarget{Version: "14.0.0", Port: r.port, Kit: protocol.KitSource{Object: "dss-14.tar.gz"}}}
	r.put(d)
	<-restarted
	st := r.waitReady(d.Generation)
	if st.DSS.State != protocol.DSSRunning {
		t.Fatalf("%+v", st.DSS)
	}
	for _, e := range r.events.all() {
		if e.Status == protocol.StatusFailed {
			t.Errorf("a failure was reported during the outage: %s %s: %s", e.Kind, e.Step, e.Message)
		}
	}
	if len(r.events.find(func(e protocol.Event) bool {
		return e.Step == "fetch-kit" && e.Status == protocol.StatusRetrying && strings.Contains(e.Message, "trying again")
	})) == 0 {
		t.Error("no retry of the kit fetch was reported")
	}
}
