package main_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// adminStandin is an installed 14.0.0 data directory, its service running,
// and an admin API key: the subtests of TestAdminAPI share them, each
// building on what the ones before it did.
type adminStandin struct {
	data string
	port int
	key  string
}

func startAdminStandin(t *testing.T) *adminStandin {
	t.Helper()
	a := &adminStandin{data: filepath.Join(t.TempDir(), "dss_data"), port: freePort(t)}
	dss := filepath.Join(a.data, "bin", "dss")
	sh(t, true, kits(t)["14.0.0"]+"/installer.sh", "-d", a.data, "-p", fmt.Sprint(a.port), "-t", "design")
	t.Cleanup(func() { exec.Command(dss, "stop").Run() })
	var keys []map[string]any
	out := sh(t, true, filepath.Join(a.data, "bin", "dsscli"), "api-key-create", "--admin", "--label", "fm", "--output", "json")
	if err := json.Unmarshal([]byte(out), &keys); err != nil || len(keys) != 1 || keys[0]["key"] == nil {
		t.Fatalf("api-key-create: %s", out)
	}
	a.key = keys[0]["key"].(string)
	sh(t, true, dss, "start")
	return a
}

// call sends a request with the admin key and returns the status and body.
func (a *adminStandin) call(t *testing.T, method, path, body string) (int, []byte) {
	t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, fmt.Sprintf("http://127.0.0.1:%d%s", a.port, path), r)
	if err != nil {
		t.Fatal(err)
	}
	req.SetBasicAuth(a.key, "")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, b
}

func (a *adminStandin) dssadmin(t *testing.T, ok bool, args ...string) string {
	t.Helper()
	return sh(t, ok, filepath.Join(a.data, "bin", "dssadmin"), args...)
}

// fileState is a file as a test saw it: a write that changed nothing must
// leave the same bytes, mtime and inode (atomicfile replaces the inode).
type fileState struct {
	data []byte
	info os.FileInfo
}

func snapshot(t *testing.T, path string) fileState {
	t.Helper()
	if path == "" {
		return fileState{}
	}
	info, err := os.Stat(path)
	if os.IsNotExist(err) {
		return fileState{}
	}
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return fileState{data, info}
}

func (s fileState) same(o fileState) bool {
	if s.info == nil || o.info == nil {
		return s.info == nil && o.info == nil
	}
	return bytes.Equal(s.data, o.data) && s.info.ModTime().Equal(o.info.ModTime()) && os.SameFile(s.info, o.info)
}

func jsonEqual(t *testing.T, got []byte, want string) bool {
	t.Helper()
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatalf("not JSON: %s", got)
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatalf("bad expectation %s: %v", want, err)
	}
	return reflect.DeepEqual(g, w)
}

// apiCase is a call of the admin API and what it must do: its status, a
// part of its answer (of the message for a refusal), and whether it changes
// file (a refusal, or the same call again, must leave it as it was).
type apiCase struct {
	name               string
	method, path, body string
	status             int
	want               string
	answer             string // when set, the answer must be this JSON
	file               string
	changes            bool
	setup              func(t *testing.T)
	check              func(t *testing.T, body []byte)
}

func (a *adminStandin) run(t *testing.T, cases []apiCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.changes && tc.status != 200 {
				t.Fatal("the case expects a refusal to change a file")
			}
			if tc.setup != nil {
				tc.setup(t)
			}
			file := ""
			if tc.file != "" {
				file = filepath.Join(a.data, tc.file)
			}
			before := snapshot(t, file)
			status, body := a.call(t, tc.method, tc.path, tc.body)
			if status != tc.status {
				t.Fatalf("%s %s: status %d, want %d: %s", tc.method, tc.path, status, tc.status, body)
			}
			if status >= 400 {
				var e struct{ ErrorType, Message string }
				if err := json.Unmarshal(body, &e); err != nil || e.ErrorType == "" || !strings.Contains(e.Message, tc.want) {
					t.Fatalf("refusal %s: want errorType and a message with %q", body, tc.want)
				}
			} else if !strings.Contains(string(body), tc.want) {
				t.Fatalf("answer %s: want %q in it", body, tc.want)
			}
			if tc.answer != "" && !jsonEqual(t, body, tc.answer) {
				t.Fatalf("answer %s, want %s", body, tc.answer)
			}
			if file != "" {
				if after := snapshot(t, file); before.same(after) == tc.changes {
					t.Fatalf("%s changed: %v, want %v (now %q, was %q)", tc.file, !tc.changes, tc.changes, after.data, before.data)
				}
			}
			if tc.check != nil {
				tc.check(t, body)
			}
		})
	}
}

// generalSettings is a valid body of PUT general-settings, changed by
// mutate. auditTrailSettings stands for a setting the stand-in does not
// know, which it must keep.
func generalSettings(mutate func(gs map[string]any)) string {
	gs := map[string]any{
		"nodeName":         "design-eu-1",
		"secureCookies":    true,
		"uiCustomization":  map[string]any{"headerColor": "#1a2b3c", "homeMessage": "Welcome"},
		"internalDatabase": map[string]any{"connection": nil},
		"impersonation":    map[string]any{"enabled": false},
		"containerSettings": map[string]any{
			"executionConfigs":       []any{map[string]any{"name": "docker-small", "type": "DOCKER", "memory": "2g"}},
			"defaultExecutionConfig": "docker-small",
		},
		"sparkSettings":        map[string]any{"executionConfigs": []any{}},
		"maxRunningActivities": 7,
		"ldapSettings":         map[string]any{"enabled": true, "url": "ldap://ldap.internal"},
		"auditTrailSettings":   map[string]any{"targets": []any{"log"}},
	}
	if mutate != nil {
		mutate(gs)
	}
	b, _ := json.Marshal(gs)
	return string(b)
}

func field(gs map[string]any, name string) map[string]any { return gs[name].(map[string]any) }

// The settings that need a dssadmin setup command first.
var (
	kubernetesSettings = generalSettings(func(gs map[string]any) {
		field(gs, "containerSettings")["executionConfigs"] = []any{
			map[string]any{"name": "docker-small", "type": "DOCKER"},
			map[string]any{"name": "k8s-large", "type": "KUBERNETES", "namespace": "dss"},
		}
		field(gs, "containerSettings")["defaultExecutionConfig"] = "k8s-large"
	})
	impersonationSettings = generalSettings(func(gs map[string]any) {
		gs["impersonation"] = map[string]any{"enabled": true, "autoCreateUnixUsers": true, "unixUserPrefix": "dss_", "unixGroup": "dss-users"}
	})
	sparkSettings = generalSettings(func(gs map[string]any) {
		field(gs, "sparkSettings")["executionConfigs"] = []any{map[string]any{"name": "default", "conf": []any{}}}
	})
)

// TestAdminAPI runs what FM's agent does through the stand-in's admin API
// and dssadmin: connections, general settings and the setup commands they
// need, plugins, code envs; every refusal leaves the files as they were,
// and the same call again changes nothing.
func TestAdminAPI(t *testing.T) {
	a := startAdminStandin(t)
	const (
		settingsFile    = "config/general-settings.json"
		connectionsFile = "config/connections.json"
	)
	pg := func(name, port, extra string) string {
		return fmt.Sprintf(`{"name":%q,"type":"PostgreSQL","params":{"host":"db.internal","port":%s,"db":"dss","user":"dss","password":"pw1"%s},"usableBy":"ALL","allowedGroups":[]}`, name, port, extra)
	}
	storedPassword := func(want string) func(t *testing.T, body []byte) {
		return func(t *testing.T, body []byte) {
			var conns map[string]struct{ Params map[string]any }
			b, _ := os.ReadFile(filepath.Join(a.data, connectionsFile))
			if err := json.Unmarshal(b, &conns); err != nil || conns["pg-main"].Params["password"] != want {
				t.Fatalf("stored password of pg-main: %v, want %q", conns["pg-main"].Params["password"], want)
			}
		}
	}

	t.Run("an admin key is required", func(t *testing.T) {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/public/api/admin/general-settings", a.port))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 401 {
			t.Fatalf("status %d without a key", resp.StatusCode)
		}
	})

	t.Run("connections", func(t *testing.T) {
		const base = "/public/api/admin/connections/"
		shownMain := `{"name":"pg-main","type":"PostgreSQL","params":{"host":"db.internal","port":5432,"db":"dss","user":"dss","password":""},"usableBy":"ALL","allowedGroups":[]}`
		a.run(t, []apiCase{
			{name: "none yet", method: "GET", path: base, status: 200, want: "{}"},
			{name: "create", method: "POST", path: base, body: pg("pg-main", "5432", ""), status: 200, want: "{}", file: connectionsFile, changes: true,
				check: func(t *testing.T, _ []byte) {
					if st, err := os.Stat(filepath.Join(a.data, connectionsFile)); err != nil || st.Mode().Perm() != 0o600 {
						t.Fatalf("connections.json holds passwords: mode %v, %v", st.Mode(), err)
					}
				}},
			{name: "the same name again", method: "POST", path: base, body: pg("pg-main", "5432", ""), status: 409, want: "Connection pg-main already exists", file: connectionsFile},
			{name: "a port as a string", method: "POST", path: base, body: pg("pg-str", `"5433"`, ""), status: 200, file: connectionsFile, changes: true},
			{name: "another type, checked for name and type only", method: "POST", path: base, body: `{"name":"fs-main","type":"Filesystem","params":{"root":"/data"}}`, status: 200, file: connectionsFile, changes: true},
			{name: "a name with a space", method: "POST", path: base, body: pg("pg main", "5432", ""), status: 400, want: "name", file: connectionsFile},
			{name: "a name too long", method: "POST", path: base, body: pg(strings.Repeat("n", 65), "5432", ""), status: 400, want: "name", file: connectionsFile},
			{name: "no type", method: "POST", path: base, body: `{"name":"x","params":{}}`, status: 400, want: "type", file: connectionsFile},
			{name: "port 0", method: "POST", path: base, body: pg("pg-2", "0", ""), status: 400, want: "params.port", file: connectionsFile},
			{name: "port 65536", method: "POST", path: base, body: pg("pg-2", "65536", ""), status: 400, want: "params.port", file: connectionsFile},
			{name: "a port not a number", method: "POST", path: base, body: pg("pg-2", `"54x"`, ""), status: 400, want: "params.port", file: connectionsFile},
			{name: "a port with a fraction", method: "POST", path: base, body: pg("pg-2", "5432.5", ""), status: 400, want: "params.port", file: connectionsFile},
			{name: "no host", method: "POST", path: base, body: strings.Replace(pg("pg-2", "5432", ""), `"db.internal"`, `""`, 1), status: 400, want: "params.host", file: connectionsFile},
			{name: "no db", method: "POST", path: base, body: strings.Replace(pg("pg-2", "5432", ""), `"db":"dss",`, "", 1), status: 400, want: "params.db", file: connectionsFile},
			{name: "no user", method: "POST", path: base, body: strings.Replace(pg("pg-2", "5432", ""), `"user":"dss",`, "", 1), status: 400, want: "params.user", file: connectionsFile},
			{name: "usable by some", method: "POST", path: base, body: strings.Replace(pg("pg-2", "5432", ""), `"ALL"`, `"SOME"`, 1), status: 400, want: "usableBy", file: connectionsFile},
			{name: "not JSON", method: "POST", path: base, body: `{"name":`, status: 400, file: connectionsFile},
			{name: "not an object", method: "POST", path: base, body: `[]`, status: 400, file: connectionsFile},
			{name: "one, password blanked", method: "GET", path: base + "pg-main", status: 200,
				check: func(t *testing.T, body []byte) {
					if !jsonEqual(t, body, shownMain) {
						t.Fatalf("got %s, want %s", body, shownMain)
					}
				}},
			{name: "all, passwords blanked", method: "GET", path: base, status: 200, want: `"fs-main"`,
				check: func(t *testing.T, body []byte) {
					var all map[string]any
					json.Unmarshal(body, &all)
					if len(all) != 3 || strings.Contains(string(body), "pw1") || !strings.Contains(string(body), `"port":"5433"`) {
						t.Fatalf("connections: %s", body)
					}
				}},
			{name: "one absent", method: "GET", path: base + "nope", status: 404, want: "nope"},
			{name: "put one absent", method: "PUT", path: base + "nope", body: pg("nope", "5432", ""), status: 404, want: "nope", file: connectionsFile},
			{name: "put another's definition", method: "PUT", path: base + "pg-main", body: pg("pg-str", "5432", ""), status: 400, want: "name", file: connectionsFile},
			{name: "put what a GET gave writes nothing", method: "PUT", path: base + "pg-main", body: shownMain, status: 200, file: connectionsFile, check: storedPassword("pw1")},
			{name: "put a new host keeps the password", method: "PUT", path: base + "pg-main", body: strings.Replace(shownMain, "db.internal", "db2.internal", 1), status: 200, file: connectionsFile, changes: true, check: storedPassword("pw1")},
			{name: "put a new password", method: "PUT", path: base + "pg-main", body: strings.Replace(strings.Replace(pg("pg-main", "5432", ""), "db.internal", "db2.internal", 1), "pw1", "pw2", 1), status: 200, file: connectionsFile, changes: true, check: storedPassword("pw2")},
			{name: "the same put again", method: "PUT", path: base + "pg-main", body: strings.Replace(strings.Replace(pg("pg-main", "5432", ""), "db.internal", "db2.internal", 1), "pw1", "pw2", 1), status: 200, file: connectionsFile},
			{name: "put a bad port", method: "PUT", path: base + "pg-main", body: strings.Replace(shownMain, "5432", "-1", 1), status: 400, want: "params.port", file: connectionsFile},
		})
	})

	t.Run("general settings", func(t *testing.T) {
		const path = "/public/api/admin/general-settings"
		put := func(name, body string, status int, want string, changes bool) apiCase {
			return apiCase{name: name, method: "PUT", path: path, body: body, status: status, want: want, file: settingsFile, changes: changes}
		}
		refuse := func(name, want string, mutate func(gs map[string]any)) apiCase {
			return put(name, generalSettings(mutate), 400, want, false)
		}
		showsSettings := func(want string) func(t *testing.T, _ []byte) {
			return func(t *testing.T, _ []byte) {
				if _, got := a.call(t, "GET", path, ""); !jsonEqual(t, got, want) {
					t.Fatalf("GET gives %s, want %s", got, want)
				}
			}
		}
		withDB := generalSettings(func(gs map[string]any) { gs["internalDatabase"] = map[string]any{"connection": "pg-main"} })
		a.run(t, []apiCase{
			{name: "the defaults before any change", method: "GET", path: path, status: 200, file: settingsFile,
				check: func(t *testing.T, body []byte) {
					want := `{"nodeName": "", "secureCookies": false, "uiCustomization": {}, "internalDatabase": {"connection": null}, "impersonation": {"enabled": false}, "containerSettings": {"executionConfigs": [], "defaultExecutionConfig": null}, "sparkSettings": {"executionConfigs": []}, "maxRunningActivities": 5, "ldapSettings": {"enabled": false}}`
					if !jsonEqual(t, body, want) {
						t.Fatalf("defaults: %s", body)
					}
				}},
			{name: "put", method: "PUT", path: path, body: generalSettings(nil), status: 200, want: "{}", file: settingsFile, changes: true, check: showsSettings(generalSettings(nil))},
			put("the same again", generalSettings(nil), 200, "", false),
			put("the same, written otherwise", "\n "+strings.ReplaceAll(generalSettings(nil), ",", ", "), 200, "", false),
			{name: "a setting left out takes its default", method: "PUT", path: path, body: generalSettings(func(gs map[string]any) { delete(gs, "maxRunningActivities") }), status: 200, file: settingsFile, changes: true,
				check: showsSettings(generalSettings(func(gs map[string]any) { gs["maxRunningActivities"] = 5 }))},
			put("put back", generalSettings(nil), 200, "", true),
			refuse("a node name too long", "nodeName", func(gs map[string]any) { gs["nodeName"] = strings.Repeat("n", 101) }),
			refuse("a node name on two lines", "nodeName", func(gs map[string]any) { gs["nodeName"] = "a\nb" }),
			refuse("a node name not a string", "nodeName", func(gs map[string]any) { gs["nodeName"] = 5 }),
			refuse("secure cookies not a boolean", "secureCookies", func(gs map[string]any) { gs["secureCookies"] = "yes" }),
			refuse("an unknown UI customization", "uiCustomization.footer", func(gs map[string]any) { field(gs, "uiCustomization")["footer"] = "x" }),
			refuse("a header colour by name", "uiCustomization.headerColor", func(gs map[string]any) { field(gs, "uiCustomization")["headerColor"] = "red" }),
			refuse("a home message too long", "uiCustomization.homeMessage", func(gs map[string]any) { field(gs, "uiCustomization")["homeMessage"] = strings.Repeat("m", 2001) }),
			refuse("a login message not a string", "uiCustomization.loginMessage", func(gs map[string]any) { field(gs, "uiCustomization")["loginMessage"] = 3 }),
			refuse("an internal database without connection", "internalDatabase.connection", func(gs map[string]any) { field(gs, "internalDatabase")["connection"] = "nope" }),
			refuse("an internal database not PostgreSQL", "not PostgreSQL", func(gs map[string]any) { field(gs, "internalDatabase")["connection"] = "fs-main" }),
			refuse("impersonation not a boolean", "impersonation.enabled", func(gs map[string]any) { field(gs, "impersonation")["enabled"] = "true" }),
			refuse("a bad unix user prefix", "impersonation.unixUserPrefix", func(gs map[string]any) { field(gs, "impersonation")["unixUserPrefix"] = "Dss" }),
			refuse("a unix user prefix too long", "impersonation.unixUserPrefix", func(gs map[string]any) { field(gs, "impersonation")["unixUserPrefix"] = strings.Repeat("u", 17) }),
			refuse("a bad unix group", "impersonation.unixGroup", func(gs map[string]any) { field(gs, "impersonation")["unixGroup"] = "1group" }),
			refuse("auto-created users not a boolean", "impersonation.autoCreateUnixUsers", func(gs map[string]any) { field(gs, "impersonation")["autoCreateUnixUsers"] = 1 }),
			refuse("two execution configs of one name", "containerSettings.executionConfigs[1].name", func(gs map[string]any) {
				field(gs, "containerSettings")["executionConfigs"] = []any{map[string]any{"name": "a", "type": "DOCKER"}, map[string]any{"name": "a", "type": "DOCKER"}}
			}),
			refuse("an execution config without name", "containerSettings.executionConfigs[0].name", func(gs map[string]any) {
				field(gs, "containerSettings")["executionConfigs"] = []any{map[string]any{"type": "DOCKER"}}
			}),
			refuse("an execution config of an unknown type", "containerSettings.executionConfigs[0].type", func(gs map[string]any) {
				field(gs, "containerSettings")["executionConfigs"] = []any{map[string]any{"name": "p", "type": "PODMAN"}}
			}),
			refuse("a default execution config that is not there", "containerSettings.defaultExecutionConfig", func(gs map[string]any) { field(gs, "containerSettings")["defaultExecutionConfig"] = "nope" }),
			refuse("two Spark configs of one name", "sparkSettings.executionConfigs[1].name", func(gs map[string]any) {
				field(gs, "sparkSettings")["executionConfigs"] = []any{map[string]any{"name": "s"}, map[string]any{"name": "s"}}
			}),
			put("Kubernetes before the base image", kubernetesSettings, 400, "build-base-image --type container-exec", false),
			put("impersonation before its installation", impersonationSettings, 400, "Multi-user security is not installed: run dssadmin install-impersonation first", false),
			put("Spark before its integration", sparkSettings, 400, "install-spark-integration", false),
			put("not an object", `[]`, 400, "", false),
			put("null", `null`, 400, "", false),
			put("two values", generalSettings(nil)+"{}", 400, "", false),
			{name: "the internal database on PostgreSQL", method: "PUT", path: path, body: withDB, status: 200, file: settingsFile, changes: true, check: showsSettings(withDB)},
		})
	})

	t.Run("dssadmin setup commands", func(t *testing.T) {
		tests := []struct {
			name    string
			args    []string
			ok      bool
			out     string // a part of the output (of the error when not ok)
			file    string
			content []string // parts of the file once written
			stopped bool     // DSS stopped around the command
		}{
			{name: "graphics export", args: []string{"install-graphics-export"}, ok: true, out: "stand-in", file: "resources/graphics-export/installed.json", content: []string{`"dssVersion": "14.0.0"`}},
			{name: "graphics export with an argument", args: []string{"install-graphics-export", "now"}, out: "takes no argument"},
			{name: "a base image without type", args: []string{"build-base-image"}, out: "usage: dssadmin build-base-image --type"},
			{name: "a base image of another type", args: []string{"build-base-image", "--type=api-deployer"}, out: `unknown image type "api-deployer" (container-exec, spark)`, file: "resources/container-images/api-deployer.json"},
			{name: "the container-exec base image", args: []string{"build-base-image", "--type", "container-exec"}, ok: true, out: "built no image", file: "resources/container-images/container-exec.json",
				content: []string{`"type": "container-exec"`, `"dssVersion": "14.0.0"`}},
			{name: "the spark base image", args: []string{"build-base-image", "--type=spark"}, ok: true, out: "built no image", file: "resources/container-images/spark.json", content: []string{`"type": "spark"`}},
			{name: "impersonation without user", args: []string{"install-impersonation"}, out: "usage: dssadmin install-impersonation DSS_USER", file: "security/impersonation.json"},
			{name: "impersonation of no unix user", args: []string{"install-impersonation", "Not A User"}, out: "not a unix user name", file: "security/impersonation.json"},
			{name: "impersonation while DSS runs", args: []string{"install-impersonation", "dataiku"}, out: "DSS is running", file: "security/impersonation.json"},
			{name: "impersonation", stopped: true, args: []string{"install-impersonation", "dataiku"}, ok: true, out: "dataiku", file: "security/impersonation.json", content: []string{`"dssUser": "dataiku"`}},
			{name: "Spark without its folder", args: []string{"install-spark-integration", "-sparkHome"}, out: "flag needs an argument", file: "bin/env-spark.sh"},
			{name: "Spark in a folder", args: []string{"install-spark-integration", "-sparkHome", "/opt/spark 3"}, ok: true, out: "/opt/spark 3", file: "bin/env-spark.sh",
				content: []string{"\nexport DKU_SPARK_ENABLED=true\n", "\nexport DKU_SPARK_HOME='/opt/spark 3'\n"}},
			{name: "Spark in the data directory", args: []string{"install-spark-integration"}, ok: true, file: "bin/env-spark.sh",
				content: []string{"\nexport DKU_SPARK_ENABLED=true\n", "\nexport DKU_SPARK_HOME=" + filepath.Join(a.data, "spark") + "\n"}},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				file := ""
				if tc.file != "" {
					file = filepath.Join(a.data, tc.file)
				}
				// A command that works is run twice: the second time changes nothing.
				runs := 1
				if tc.ok {
					runs = 2
				}
				if tc.stopped {
					sh(t, true, filepath.Join(a.data, "bin", "dss"), "stop")
					defer sh(t, true, filepath.Join(a.data, "bin", "dss"), "start")
				}
				for run := 1; run <= runs; run++ {
					before := snapshot(t, file)
					if out := a.dssadmin(t, tc.ok, tc.args...); !strings.Contains(out, tc.out) {
						t.Fatalf("run %d: output %q, want %q in it", run, out, tc.out)
					}
					if file == "" {
						continue
					}
					after := snapshot(t, file)
					if changed := !before.same(after); changed != (tc.ok && run == 1) {
						t.Fatalf("run %d: %s changed: %v", run, tc.file, changed)
					}
					for _, c := range tc.content {
						if !strings.Contains(string(after.data), c) {
							t.Fatalf("%s:\n%s\nwant %q in it", tc.file, after.data, c)
						}
					}
				}
			})
		}
	})

	t.Run("general settings once set up", func(t *testing.T) {
		const path = "/public/api/admin/general-settings"
		var cases []apiCase
		for _, c := range []struct{ name, body string }{{"Kubernetes", kubernetesSettings}, {"impersonation", impersonationSettings}, {"Spark", sparkSettings}} {
			cases = append(cases,
				apiCase{name: c.name, method: "PUT", path: path, body: c.body, status: 200, file: settingsFile, changes: true},
				apiCase{name: c.name + " again", method: "PUT", path: path, body: c.body, status: 200, file: settingsFile})
		}
		a.run(t, cases)
	})

	var jobID string
	t.Run("plugins", func(t *testing.T) {
		const path = "/public/api/plugins/actions/installFromStore"
		plugin := func(id string) string { return "plugins/installed/" + id + "/plugin.json" }
		a.run(t, []apiCase{
			{name: "none yet", method: "GET", path: "/public/api/plugins/", status: 200, want: "[]"},
			{name: "a bad id", method: "POST", path: path, body: `{"pluginId":"Time_Series"}`, status: 400, want: "Time_Series", file: plugin("Time_Series")},
			{name: "no id", method: "POST", path: path, body: `{}`, status: 400, want: "pluginId"},
			{name: "not in the store", method: "POST", path: path, body: `{"pluginId":"no-such-plugin"}`, status: 404, want: "Plugin no-such-plugin not found in the store", file: plugin("no-such-plugin")},
			{name: "install", method: "POST", path: path, body: `{"pluginId":"timeseries-preparation"}`, status: 200, file: plugin("timeseries-preparation"), changes: true,
				check: func(t *testing.T, body []byte) {
					var f struct {
						JobID     string
						HasResult bool
						Alive     bool
						Result    map[string]string
					}
					// Answered as a job under way; its result comes at the poll.
					if err := json.Unmarshal(body, &f); err != nil || f.JobID == "" || f.HasResult || !f.Alive || f.Result != nil {
						t.Fatalf("future: %s", body)
					}
					jobID = f.JobID
					if b, _ := os.ReadFile(filepath.Join(a.data, plugin("timeseries-preparation"))); !jsonEqual(t, b, `{"id":"timeseries-preparation","version":"2.0.5","source":"store"}`) {
						t.Fatalf("plugin.json: %s", b)
					}
				}},
			{name: "install another", method: "POST", path: path, body: `{"pluginId":"eks-clusters"}`, status: 200, file: plugin("eks-clusters"), changes: true},
			{name: "install one installed", method: "POST", path: path, body: `{"pluginId":"timeseries-preparation"}`, status: 400, want: "Plugin timeseries-preparation is already installed", file: plugin("timeseries-preparation")},
			{name: "listed by id", method: "GET", path: "/public/api/plugins/", status: 200,
				check: func(t *testing.T, body []byte) {
					want := `[{"id":"eks-clusters","version":"2.3.1","isDev":false},{"id":"timeseries-preparation","version":"2.0.5","isDev":false}]`
					if !jsonEqual(t, body, want) {
						t.Fatalf("plugins: %s", body)
					}
				}},
		})
	})

	t.Run("futures", func(t *testing.T) {
		if jobID == "" {
			t.Skip("no job: the plugins test failed")
		}
		a.run(t, []apiCase{
			{name: "a job of the stand-in", method: "GET", path: "/public/api/futures/" + jobID, status: 200,
				check: func(t *testing.T, body []byte) {
					want := fmt.Sprintf(`{"jobId":%q,"hasResult":true,"alive":false,"result":{"pluginId":"timeseries-preparation","version":"2.0.5"}}`, jobID)
					if !jsonEqual(t, body, want) {
						t.Fatalf("future: %s", body)
					}
				}},
			{name: "another", method: "GET", path: "/public/api/futures/0123abcd", status: 404, want: "0123abcd"},
		})
	})

	t.Run("code envs", func(t *testing.T) {
		const path = "/public/api/admin/code-envs/from-python-preset/"
		const env = "code-envs/python/visual_ml_cpu/desc.json"
		desc := func(interpreter, presetVersion string) func(t *testing.T, _ []byte) {
			return func(t *testing.T, _ []byte) {
				want := fmt.Sprintf(`{"envName":"visual_ml_cpu","envLang":"PYTHON","deploymentMode":"DSS_INTERNAL","preset":"VISUAL_ML_CPU","interpreter":%q,"presetVersion":%q}`, interpreter, presetVersion)
				if b, _ := os.ReadFile(filepath.Join(a.data, env)); !jsonEqual(t, b, want) {
					t.Fatalf("desc.json: %s, want %s", b, want)
				}
			}
		}
		answer := func(name string, created, updated bool) string {
			return fmt.Sprintf(`{"envName":%q,"created":%v,"updated":%v,"messages":{"error":false,"messages":[]}}`, name, created, updated)
		}
		a.run(t, []apiCase{
			{name: "none yet", method: "GET", path: "/public/api/admin/code-envs/", status: 200, want: "[]"},
			{name: "an unknown preset", method: "POST", path: path + "VISUAL_ML_TPU", status: 404, want: "VISUAL_ML_TPU", file: "code-envs/python/visual_ml_tpu/desc.json"},
			{name: "an unknown interpreter", method: "POST", path: path + "VISUAL_ML_CPU?interpreter=PYTHON27", status: 400, want: "PYTHON27", file: env},
			{name: "a bad prefix", method: "POST", path: path + "VISUAL_ML_CPU?prefix=Team-", status: 400, want: "prefix", file: "code-envs/python/Team-visual_ml_cpu/desc.json"},
			{name: "a prefix too long", method: "POST", path: path + "VISUAL_ML_CPU?prefix=" + strings.Repeat("p", 21), status: 400, want: "prefix"},
			{name: "allowUpdate neither true nor false", method: "POST", path: path + "VISUAL_ML_CPU?allowUpdate=maybe", status: 400, want: "allowUpdate", file: env},
			{name: "create", method: "POST", path: path + "VISUAL_ML_CPU", status: 200, answer: answer("visual_ml_cpu", true, false), file: env, changes: true, check: desc("PYTHON311", "14.0.0")},
			{name: "create again", method: "POST", path: path + "VISUAL_ML_CPU?allowUpdate=false", status: 409, want: "Code env visual_ml_cpu already exists", file: env},
			{name: "update, nothing to", method: "POST", path: path + "VISUAL_ML_CPU?allowUpdate=true&interpreter=PYTHON311", status: 200, answer: answer("visual_ml_cpu", false, false), file: env},
			{name: "update the interpreter", method: "POST", path: path + "VISUAL_ML_CPU?allowUpdate=true&interpreter=PYTHON312", status: 200, answer: answer("visual_ml_cpu", false, true), file: env, changes: true, check: desc("PYTHON312", "14.0.0")},
			{name: "update the interpreter again", method: "POST", path: path + "VISUAL_ML_CPU?allowUpdate=true&interpreter=PYTHON312", status: 200, answer: answer("visual_ml_cpu", false, false), file: env},
			{name: "update an env of an older DSS", method: "POST", path: path + "VISUAL_ML_CPU?allowUpdate=true&interpreter=PYTHON312", status: 200, answer: answer("visual_ml_cpu", false, true), file: env, changes: true,
				setup: func(t *testing.T) {
					p := filepath.Join(a.data, env)
					b, _ := os.ReadFile(p)
					if err := os.WriteFile(p, bytes.Replace(b, []byte(`"14.0.0"`), []byte(`"13.4.0"`), 1), 0o644); err != nil {
						t.Fatal(err)
					}
				},
				check: desc("PYTHON312", "14.0.0")},
			{name: "with a prefix", method: "POST", path: path + "TIMESERIES_FORECASTING_GPU?prefix=team_a_&interpreter=PYTHON310", status: 200,
				answer: answer("team_a_timeseries_forecasting_gpu", true, false), file: "code-envs/python/team_a_timeseries_forecasting_gpu/desc.json", changes: true},
			{name: "listed by name", method: "GET", path: "/public/api/admin/code-envs/", status: 200,
				check: func(t *testing.T, body []byte) {
					var envs []struct{ EnvName, Interpreter string }
					json.Unmarshal(body, &envs)
					if len(envs) != 2 || envs[0].EnvName != "team_a_timeseries_forecasting_gpu" || envs[0].Interpreter != "PYTHON310" || envs[1].EnvName != "visual_ml_cpu" {
						t.Fatalf("code envs: %s", body)
					}
				}},
		})
	})

	// Last, as it restarts the service: DSS takes the Spark integration at
	// its next start, through bin/env-spark.sh.
	t.Run("Spark in the runtime after a restart", func(t *testing.T) {
		spark := func() map[string]any {
			status, body := a.call(t, "GET", "/api/runtime", "")
			var rt struct{ Spark map[string]any }
			if err := json.Unmarshal(body, &rt); status != 200 || err != nil || rt.Spark == nil {
				t.Fatalf("runtime: %d %s", status, body)
			}
			return rt.Spark
		}
		if got := spark(); got["enabled"] != false {
			t.Fatalf("Spark before a restart: %v", got)
		}
		sh(t, true, filepath.Join(a.data, "bin", "dss"), "restart")
		if got, want := spark(), map[string]any{"enabled": true, "home": filepath.Join(a.data, "spark")}; !reflect.DeepEqual(got, want) {
			t.Fatalf("Spark after a restart: %v, want %v", got, want)
		}
	})
}
