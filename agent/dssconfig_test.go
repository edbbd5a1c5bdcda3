package agent

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/fleetmanager/fm/protocol"
	"github.com/rs/zerolog"
)

// TestConfigureDSS: the actions that configure DSS through its admin API
// and dssadmin each have their effect on a stand-in DSS, seen through its
// API and files; the same template again changes nothing (no file, no
// restart); a change changes only what it names; a setting DSS takes at
// start restarts it, even when a kill cut the agent short before the
// restart; a refused action fails the operation with DSS's answer and
// leaves DSS running.
func TestConfigureDSS(t *testing.T) {
	r := newRig(t)
	r.startAgent()
	template := func(instanceName, dbPassword string, plugins ...string) []protocol.SetupAction {
		ps, _ := json.Marshal(plugins)
		return []protocol.SetupAction{
			action(protocol.ActionSetupInstanceName, `{"instanceName":"`+instanceName+`"}`),
			action(protocol.ActionSetupSecureCookies, `{}`),
			action(protocol.ActionSetupUICustomization, `{"headerColor":"#112233","homeMessage":"Production: be careful"}`),
			action(protocol.ActionSetupRuntimeDatabase, `{"host":"db.internal","database":"dss_runtime","user":"dss","password":"`+dbPassword+`"}`),
			action(protocol.ActionSetupMUSAutocreate, `{"unixUserPrefix":"u_"}`),
			action(protocol.ActionInstallDSSPluginsFromStore, `{"plugins":`+string(ps)+`}`),
			action(protocol.ActionInstallCodeEnvWithPreset, `{"preset":"VISUAL_ML","gpu":true}`),
			action(protocol.ActionSetupGraphicsExport, `{}`),
			action(protocol.ActionSetupK8sAndSpark, `{"useHostIP":true}`),
			action(protocol.ActionSetupNoneK8sAndSpark, `{}`),
		}
	}
	api := func(path string, out any) {
		t.Helper()
		code, body := r.get(path, r.adminKey())
		if code != 200 || json.Unmarshal(body, out) != nil {
			t.Fatalf("GET %s: %d %s", path, code, body)
		}
	}
	// results are the action steps of a generation, by type.
	results := func(gen uint64, n int) map[protocol.SetupActionType]protocol.Event {
		t.Helper()
		out := map[protocol.SetupActionType]protocol.Event{}
		r.events.wait(t, "the actions' steps", 10*time.Second, func(protocol.Event) bool {
			for _, e := range r.events.find(func(e protocol.Event) bool {
				return e.Generation == gen && strings.HasPrefix(e.Step, "setup-action[") && e.Status != protocol.StatusStarted
			}) {
				typ, _, _ := strings.Cut(e.Step[strings.Index(e.Step, "] ")+2:], " ")
				out[protocol.SetupActionType(typ)] = e
			}
			return len(out) == n
		})
		return out
	}
	restarted := func(gen uint64) bool {
		return len(r.events.find(func(e protocol.Event) bool { return e.Generation == gen && e.Step == "restart-dss" })) > 0
	}
	settingsFile := filepath.Join(r.dssDir(), "config", "general-settings.json")

	// The first provision: every action has its effect.
	d := r.desire("14.0.0", template("Design (prod)", "s3cret", "eks-clusters", "googlesheets")...)
	if st := r.waitReady(d.Generation); st.DSS.State != protocol.DSSRunning {
		t.Fatalf("DSS %+v", st.DSS)
	}
	for typ, e := range results(d.Generation, 10) {
		if e.Status != protocol.StatusOK {
			t.Errorf("%s: %s %q\n%s", typ, e.Status, e.Message, e.Output)
		}
	}
	var gs struct {
		NodeName         string            `json:"nodeName"`
		SecureCookies    bool              `json:"secureCookies"`
		UI               map[string]string `json:"uiCustomization"`
		InternalDatabase struct {
			Connection string `json:"connection"`
		} `json:"internalDatabase"`
		Impersonation     map[string]any `json:"impersonation"`
		ContainerSettings struct {
			ExecutionConfigs []struct {
				Name, Type string
			} `json:"executionConfigs"`
			Default string `json:"defaultExecutionConfig"`
		} `json:"containerSettings"`
		SparkSettings struct {
			ExecutionConfigs []struct{ Name string } `json:"executionConfigs"`
		} `json:"sparkSettings"`
		MaxRunningActivities int `json:"maxRunningActivities"`
	}
	api("/public/api/admin/general-settings", &gs)
	switch {
	case gs.NodeName != "Design (prod)", !gs.SecureCookies, gs.UI["headerColor"] != "#112233", gs.UI["homeMessage"] != "Production: be careful":
		t.Errorf("name, cookies, UI: %+v", gs)
	case gs.InternalDatabase.Connection != protocol.DefaultRuntimeConnection:
		t.Errorf("runtime database: %+v", gs.InternalDatabase)
	case gs.Impersonation["enabled"] != true || gs.Impersonation["unixUserPrefix"] != "u_" || gs.Impersonation["unixGroup"] != protocol.DefaultMUSGroup:
		t.Errorf("impersonation: %v", gs.Impersonation)
	case len(gs.ContainerSettings.ExecutionConfigs) != 1 || gs.ContainerSettings.ExecutionConfigs[0].Name != "eks-default" ||
		gs.ContainerSettings.ExecutionConfigs[0].Type != "KUBERNETES" || gs.ContainerSettings.Default != "eks-default":
		t.Errorf("containerized execution: %+v", gs.ContainerSettings)
	case len(gs.SparkSettings.ExecutionConfigs) != 1 || gs.SparkSettings.ExecutionConfigs[0].Name != "eks-default":
		t.Errorf("Spark: %+v", gs.SparkSettings)
	case gs.MaxRunningActivities != 5:
		t.Errorf("a setting no action names changed: %+v", gs)
	}
	var conn struct {
		Type   string         `json:"type"`
		Params map[string]any `json:"params"`
	}
	api("/public/api/admin/connections/"+protocol.DefaultRuntimeConnection, &conn)
	if conn.Type != "PostgreSQL" || conn.Params["host"] != "db.internal" || conn.Params["db"] != "dss_runtime" || conn.Params["port"] != float64(5432) {
		t.Errorf("runtime connection: %+v", conn)
	}
	var plugins []struct{ ID string }
	api("/public/api/plugins/", &plugins)
	if len(plugins) != 2 || plugins[0].ID != "eks-clusters" || plugins[1].ID != "googlesheets" {
		t.Errorf("plugins: %+v", plugins)
	}
	var envs []struct{ EnvName, Preset string }
	api("/public/api/admin/code-envs/", &envs)
	if len(envs) != 1 || envs[0].Preset != "VISUAL_ML_GPU" {
		t.Errorf("code envs: %+v", envs)
	}
	for _, f := range []string{"resources/graphics-export/installed.json", "resources/container-images/container-exec.json",
		"resources/container-images/spark.json", "bin/env-spark.sh", "security/impersonation.json"} {
		if _, err := os.Stat(filepath.Join(r.dssDir(), f)); err != nil {
			t.Errorf("dssadmin's %s: %v", f, err)
		}
	}
	// The Spark integration, done once DSS ran, restarted it: DSS runs
	// with it.
	var rt struct {
		Spark struct {
			Enabled bool `json:"enabled"`
		} `json:"spark"`
		Env map[string]string `json:"env"`
	}
	api("/api/runtime", &rt)
	if !rt.Spark.Enabled || !restarted(d.Generation) {
		t.Errorf("DSS does not run with the Spark integration (restarted: %v): %+v", restarted(d.Generation), rt)
	}
	// useHostIP: DSS's containers call back at one of the machine's
	// addresses.
	if ip := net.ParseIP(rt.Env["DKU_BACKEND_EXT_HOST"]); ip == nil || ip.IsLoopback() || !slices.ContainsFunc(machineAddresses(nil), ip.Equal) {
		t.Errorf("DKU_BACKEND_EXT_HOST: %q", rt.Env["DKU_BACKEND_EXT_HOST"])
	}
	if t.Failed() {
		t.FailNow()
	}

	// The same template again changes nothing: no file written, no restart.
	settings, _ := os.ReadFile(settingsFile)
	stat, _ := os.Stat(settingsFile)
	dss := cmdline.Find(r.dssDir(), "serve")
	d = r.desire("14.0.0", template("Design (prod)", "s3cret", "eks-clusters", "googlesheets")...)
	r.waitReady(d.Generation)
	for typ, e := range results(d.Generation, 10) {
		if e.Status != protocol.StatusOK || !strings.Contains(e.Message, "already") {
			t.Errorf("again, %s: %s %q", typ, e.Status, e.Message)
		}
	}
	again, _ := os.ReadFile(settingsFile)
	stat2, _ := os.Stat(settingsFile)
	if string(again) != string(settings) || !stat2.ModTime().Equal(stat.ModTime()) || restarted(d.Generation) || !slices.Equal(cmdline.Find(r.dssDir(), "serve"), dss) {
		t.Fatalf("the same template changed something: settings %v, restarted %v", string(again) != string(settings), restarted(d.Generation))
	}

	// A changed name and a plugin more: only they change, without a restart.
	d = r.desire("14.0.0", template("Design (staging)", "s3cret", "eks-clusters", "googlesheets", "geoadmin")...)
	r.waitReady(d.Generation)
	api("/public/api/admin/general-settings", &gs)
	api("/public/api/plugins/", &plugins)
	if gs.NodeName != "Design (staging)" || gs.UI["homeMessage"] != "Production: be careful" || len(plugins) != 3 || restarted(d.Generation) {
		t.Fatalf("after the change: %+v %+v, restarted %v", gs, plugins, restarted(d.Generation))
	}

	// A new database password: DSS takes it at start, and restarts.
	d = r.desire("14.0.0", template("Design (staging)", "n3w", "eks-clusters", "googlesheets", "geoadmin")...)
	r.waitReady(d.Generation)
	if ev := r.events.find(func(e protocol.Event) bool { return e.Generation == d.Generation && e.Step == "restart-dss" }); len(ev) == 0 ||
		!strings.Contains(ev[len(ev)-1].Message, "changed: fm:runtime-database)") {
		t.Fatalf("a new runtime database password did not restart DSS, saying why: %+v", ev)
	}

	// Killed after an action changed a setting DSS takes at start, before
	// the restart: the action is carried out as the killed agent did, the
	// agent stopped; the replay finds nothing to change, and restarts DSS.
	r.stopAgent()
	m := newMachine(r.cfg, zerolog.Nop())
	cut := &actionRunner{m: m, lookPath: exec.LookPath}
	if res := cut.run(t.Context(), template("Design (staging)", "n3wer")[3], 3, ansibleFacts{}, nil); res.status != protocol.StatusOK {
		t.Fatalf("the action of the run cut short: %+v", res)
	}
	r.startAgent()
	d = r.desire("14.0.0", template("Design (staging)", "n3wer", "eks-clusters", "googlesheets", "geoadmin")...)
	r.waitReady(d.Generation)
	if ev := results(d.Generation, 10)[protocol.ActionSetupRuntimeDatabase]; !strings.Contains(ev.Message, "already") || !restarted(d.Generation) {
		t.Fatalf("a change a killed agent made was never restarted for: %q, restarted %v", ev.Message, restarted(d.Generation))
	}

	// A replay that moves DSS to another port: the actions after its
	// startup talk to DSS where it listens until the restart, which moves
	// it.
	newPort := freePort(t)
	d = r.desire("14.0.0", append(template("Design (moved)", "n3wer", "eks-clusters", "googlesheets", "geoadmin"),
		action(protocol.ActionUpdateDSSPort, fmt.Sprintf(`{"port":%d}`, newPort)))...)
	if st := r.waitReady(d.Generation); st.DSS.Port != newPort || !restarted(d.Generation) {
		t.Fatalf("after the move: %+v, restarted %v", st.DSS, restarted(d.Generation))
	}
	api("/public/api/admin/general-settings", &gs)
	if gs.NodeName != "Design (moved)" {
		t.Fatalf("the name given before the move: %q", gs.NodeName)
	}

	// A replay asked by a command reports its steps under the command's
	// operation (FM files them there even before it knows the operation
	// began); a convergence's carry none.
	opID, cmdID := protocol.NewID("op"), protocol.NewID("cmd")
	since := time.Now()
	cmd := protocol.Command{ID: cmdID, Instance: r.instance, Kind: protocol.CommandReplaySetupActions, OpID: opID,
		Issued: time.Now().UTC(), Expires: time.Now().Add(10 * time.Minute).UTC()}
	data, _ := protocol.Encode(&cmd)
	if _, err := r.js.Publish(t.Context(), protocol.CommandSubject(r.instance, cmdID), data); err != nil {
		t.Fatal(err)
	}
	if res := r.result(cmdID); res.Status != protocol.StatusOK || res.OpID != opID {
		t.Fatalf("the replay command: %+v", res)
	}
	var under, none int
	for _, e := range r.events.find(func(e protocol.Event) bool {
		return e.Kind == protocol.EventStep && strings.HasPrefix(e.Step, "setup-action[") && e.Time.After(since)
	}) {
		if e.OpID == opID {
			under++
		} else {
			none++
		}
	}
	if under < 22 || none != 0 { // 11 actions, started and ended
		t.Fatalf("the replay's steps: %d under its operation, %d not", under, none)
	}
	for _, e := range r.events.find(func(e protocol.Event) bool { return e.Kind == protocol.EventStep && e.Generation == d.Generation }) {
		if e.OpID != "" && e.Time.Before(since) {
			t.Fatalf("a convergence's step carries an operation: %+v", e)
		}
	}

	// Refused by DSS: the operation fails with DSS's answer, DSS runs on.
	d = r.desire("14.0.0", template("Design (staging)", "n3w", "no-such-plugin")...)
	st := r.waitFailed(d.Generation)
	if st.Error == nil || !strings.Contains(st.Error.Message, "no-such-plugin") || !strings.Contains(st.Error.Message, "not found") {
		t.Fatalf("failure: %+v", st.Error)
	}
	if !m.answers(t.Context()) {
		t.Fatal("DSS stopped answering after a refused action")
	}
}
