package e2e

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

// TestEverySetupAction: a template with one action of each of the 23 types
// provisions an instance on fm dev; its operation shows 23 action steps,
// none failed, and DSS answers with what they set. The template then
// changes one action, and a replay applies that change alone: the other
// settings stay, and DSS is not restarted.
func TestEverySetupAction(t *testing.T) {
	if _, err := exec.LookPath("ansible-playbook"); err != nil {
		if os.Getenv("FM_REQUIRE_ANSIBLE") != "" {
			t.Fatal("ansible-playbook is required (FM_REQUIRE_ANSIBLE is set) but not installed")
		}
		t.Skip("RUN_ANSIBLE_TASKS needs ansible-playbook")
	}
	data := filepath.Join(t.TempDir(), "fm")
	d := startDevFast(t, data)
	py := NewPython(t, d.url, d.keyFile)
	files := t.TempDir()
	jar := filepath.Join(files, "driver.jar")
	os.WriteFile(jar, []byte("PK\x03\x04 a driver"), 0o644)
	_, port, _ := strings.Cut(FreePort(t), ":")

	caPEM, keyPEM := certificatePEM(t), privateKeyPEM(t)
	template := func(instanceName string) string {
		actions := []map[string]any{
			{"type": "ADD_AUTHORIZED_KEY", "params": map[string]any{"sshKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG ops@example", "stage": "before_install"}},
			{"type": "ADD_SSH_KEY", "params": map[string]any{"privateKey": keyPEM, "keyName": "git_deploy"}},
			{"type": "ADD_ENV_VARIABLES", "params": map[string]any{"variables": []map[string]string{{"key": "TEAM", "value": "data"}}}},
			{"type": "ADD_PROPERTIES", "params": map[string]any{"properties": []map[string]string{{"key": "dku.e2e.mark", "value": "42"}}}},
			{"type": "SETUP_PROXY", "params": map[string]any{"httpProxy": "http://proxy.internal:3128"}},
			{"type": "SETUP_ADVANCED_SECURITY", "params": map[string]any{"hsts": true}},
			{"type": "ADD_CA_TO_TRUSTSTORE", "params": map[string]any{"name": "corp-root", "certificate": caPEM}},
			{"type": "INSTALL_JDBC_DRIVER", "params": map[string]any{"url": "file://" + jar, "dbType": "mysql"}},
			{"type": "UPDATE_DSS_PORT", "params": map[string]any{"port": json.Number(port)}},
			{"type": "INSTALL_SYSTEM_PACKAGES", "params": map[string]any{"packages": []string{"htop"}}},
			{"type": "RUN_ANSIBLE_TASKS", "params": map[string]any{"stage": "after_dss_startup", "ansibleTasks": "- debug: msg={{ dataiku.dss.port }}"}},
			{"type": "SETUP_MEMORY_SETTINGS", "params": map[string]any{"backendXmx": "2g"}},
			{"type": "SETUP_INSTANCE_NAME", "params": map[string]any{"instanceName": instanceName}},
			{"type": "SETUP_SECURE_COOKIES", "params": map[string]any{}},
			{"type": "SETUP_UI_CUSTOMIZATION", "params": map[string]any{"homeMessage": "e2e"}},
			{"type": "SETUP_RUNTIME_DATABASE", "params": map[string]any{"host": "db.internal", "database": "dss_runtime", "user": "dss", "password": "pw"}},
			{"type": "SETUP_MUS_AUTOCREATE", "params": map[string]any{}},
			{"type": "INSTALL_DSS_PLUGINS_FROM_STORE", "params": map[string]any{"plugins": []string{"eks-clusters"}}},
			{"type": "INSTALL_CODE_ENV_WITH_PRESET", "params": map[string]any{"preset": "TIMESERIES_FORECASTING"}},
			{"type": "SETUP_GRAPHICS_EXPORT", "params": map[string]any{}},
			{"type": "SETUP_K8S_AND_SPARK", "params": map[string]any{}},
			{"type": "SETUP_NONE_K8S_AND_SPARK", "params": map[string]any{}},
			{"type": "INSTALL_DEPRECATED_PYTHON", "params": map[string]any{"install_py36": false, "install_py37": false, "install_py38": true}},
		}
		b, err := json.Marshal(map[string]any{"label": "all-actions", "setupActions": actions})
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	// An image of the stand-in's kit whose tools (kubectl, python3.8) the
	// actions install, pinned by digest.
	var base api.Image
	if code := py.Do(t, "GET", "/images/dss-14.0.0-standin", "", &base); code != 200 || base.Kit == nil {
		t.Fatalf("the stand-in's image: %d %+v", code, base)
	}
	tools := map[string]api.Tool{}
	for _, name := range []string{"kubectl", "python3.8"} {
		p := filepath.Join(files, name)
		content := []byte("#!/bin/sh\necho " + name + "\n")
		os.WriteFile(p, content, 0o644)
		sum := sha256.Sum256(content)
		tools[name] = api.Tool{URL: "file://" + p, SHA256: hex.EncodeToString(sum[:])}
	}
	image, _ := json.Marshal(api.Image{ID: "dss-14.0.0-tools", DSSVersion: "14.0.0", Kit: base.Kit, Tools: tools})
	if code := py.Do(t, "POST", "/images", string(image), nil); code != 200 {
		t.Fatalf("an image with tools: %d", code)
	}
	tplFile := filepath.Join(files, "tpl.json")
	os.WriteFile(tplFile, []byte(template("Design (e2e)")), 0o644)
	vn := jsonField(t, d.fm(t, "network", "create", "--label", "lab", "--default", "--output", "json"), "id")
	tpl := jsonField(t, d.fm(t, "template", "create", "--file", tplFile, "--output", "json"), "id")
	id := jsonField(t, d.fm(t, "instance", "create", "--label", "all", "--network", vn, "--template", tpl,
		"--image", "dss-14.0.0-tools", "--output", "json"), "id")

	// actionSteps are the operation's 23 setup-action steps that ended.
	// The steps reach the operation as events, which may come after its
	// end: they are waited for.
	actionSteps := func(job string) []api.ProgressStep {
		t.Helper()
		d.fm(t, "op", "wait", job)
		var out []api.ProgressStep
		for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(200 * time.Millisecond) {
			var f api.Future
			if code := py.Do(t, "GET", "/futures/"+job, "", &f); code != 200 || f.State != api.OpSucceeded {
				t.Fatalf("operation %s: %d %+v", job, code, f)
			}
			out = out[:0]
			for _, s := range f.Progress.Steps {
				if strings.HasPrefix(s.Name, "setup-action[") && s.Status != string(protocol.StatusStarted) {
					out = append(out, s)
				}
			}
			if len(out) >= 23 || time.Now().After(deadline) {
				return out
			}
		}
	}
	steps := actionSteps(jsonField(t, d.fm(t, "instance", "provision", id, "--output", "json"), "jobId"))
	if len(steps) != 23 {
		t.Fatalf("%d action steps, want 23: %+v", len(steps), steps)
	}
	for _, s := range steps {
		want := string(protocol.StatusOK)
		if strings.Contains(s.Name, "INSTALL_SYSTEM_PACKAGES") {
			want = string(protocol.StatusUnsupported) // a machine of the local backend is a folder on FM's host
		}
		if s.Status != want {
			t.Errorf("%s: %s %q, want %s", s.Name, s.Status, s.Message, want)
		}
	}
	st := d.status(t, py, id)
	url, _ := st["publicURL"].(string)
	if st["state"] != "running" || !strings.Contains(url, ":"+port) {
		t.Fatalf("after provision (DSS on port %s): %v", port, st)
	}
	// The image's tools are on the machine (a folder of fm dev's data).
	for _, name := range []string{"kubectl", "python3.8"} {
		link := filepath.Join(data, "local", "machines", id, "root", "usr", "local", "bin", name)
		if b, err := os.ReadFile(link); err != nil || !strings.Contains(string(b), "echo "+name) {
			t.Fatalf("the image's %s is not on the machine: %q %v", name, b, err)
		}
	}
	var key struct{ AdminAPIKey string }
	py.Do(t, "GET", "/instances/"+id+"/admin-api-key", "", &key)
	settings := func() map[string]any {
		t.Helper()
		code, body := dss(t, url, "/public/api/admin/general-settings", key.AdminAPIKey)
		var gs map[string]any
		if code != 200 || json.Unmarshal([]byte(body), &gs) != nil {
			t.Fatalf("general settings: %d %s", code, body)
		}
		return gs
	}
	gs := settings()
	if gs["nodeName"] != "Design (e2e)" || gs["secureCookies"] != true || gs["impersonation"].(map[string]any)["enabled"] != true {
		t.Fatalf("general settings after provision: %v", gs)
	}
	code, runtime := dss(t, url, "/api/runtime", key.AdminAPIKey)
	for _, want := range []string{`"TEAM":"data"`, `"dku.e2e.mark":"42"`, `"dku.security.hsts":"true"`, `"backend.xmx":"2g"`, `"enabled":true`} {
		if code != 200 || !strings.Contains(runtime, want) {
			t.Fatalf("DSS does not run with %s: %d %s", want, code, runtime)
		}
	}
	// One action changes: the replay applies it, the rest stays, and DSS
	// is not restarted.
	before := settings()
	os.WriteFile(tplFile, []byte(template("Design (renamed)")), 0o644)
	d.fm(t, "template", "update", tpl, "--file", tplFile)
	job := jsonField(t, d.fm(t, "instance", "replay-setup-actions", id, "--output", "json"), "jobId")
	steps = actionSteps(job)
	if len(steps) != 23 {
		for _, s := range steps {
			t.Logf("  %s %s", s.Name, s.Status)
		}
		t.Fatalf("replay: %d action steps", len(steps))
	}
	// The actions that read before they write say when they had nothing
	// to do; the name alone changed.
	idempotent := []string{"UPDATE_DSS_PORT", "SETUP_MEMORY_SETTINGS", "SETUP_SECURE_COOKIES", "SETUP_UI_CUSTOMIZATION",
		"SETUP_RUNTIME_DATABASE", "SETUP_MUS_AUTOCREATE", "INSTALL_DSS_PLUGINS_FROM_STORE", "INSTALL_CODE_ENV_WITH_PRESET",
		"SETUP_GRAPHICS_EXPORT", "SETUP_K8S_AND_SPARK", "SETUP_NONE_K8S_AND_SPARK"}
	for _, s := range steps {
		typ, _, _ := strings.Cut(s.Name[strings.Index(s.Name, "] ")+2:], " ")
		switch {
		case typ == "SETUP_INSTANCE_NAME" && strings.Contains(s.Message, "already"):
			t.Errorf("replay, the changed action did nothing: %q", s.Message)
		case slices.Contains(idempotent, typ) && !strings.Contains(s.Message, "already"):
			t.Errorf("replay, %s changed something: %q", typ, s.Message)
		case s.Status == string(protocol.StatusFailed):
			t.Errorf("replay, %s failed: %q", typ, s.Message)
		}
	}
	var f api.Future
	py.Do(t, "GET", "/futures/"+job, "", &f)
	for _, s := range f.Progress.Steps {
		if s.Name == "restart-dss" {
			t.Errorf("the replay restarted DSS: %+v", s)
			for _, s := range f.Progress.Steps {
				t.Logf("  %s %s: %s", s.Name, s.Status, s.Message)
			}
		}
	}
	after := settings()
	before["nodeName"] = "Design (renamed)"
	if b1, _ := json.Marshal(before); string(b1) != mustJSON(after) {
		t.Fatalf("the replay changed more than the name:\n%v\n%v", before, after)
	}
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func privateKeyPEM(t *testing.T) string {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
}

func certificatePEM(t *testing.T) string {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "corp root"}, NotBefore: time.Now(),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, priv)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}
