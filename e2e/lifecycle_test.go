package e2e

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/fleetmanager/fm/internal/pki"
	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/protocol"
	natsjwt "github.com/nats-io/jwt/v2"
)

// startDevFast starts fm dev with 1-second heartbeats, and stops every
// machine it made when the test ends.
func startDevFast(t *testing.T, data string) *devEnv {
	t.Helper()
	t.Cleanup(func() { StopUnder(data) })
	return startDevAt(t, data, FreePort(t), "--heartbeat-seconds", "1")
}

// newInstance creates a network, a template and an instance with the
// image, and returns the instance's id.
func (d *devEnv) newInstance(t *testing.T, label, image string) string {
	t.Helper()
	vn := jsonField(t, d.fm(t, "network", "create", "--label", label+"-net", "--default", "--output", "json"), "id")
	tpl := jsonField(t, d.fm(t, "template", "create", "--label", label+"-tpl", "--output", "json"), "id")
	return jsonField(t, d.fm(t, "instance", "create", "--label", label, "--network", vn, "--template", tpl,
		"--image", image, "--output", "json"), "id")
}

func (d *devEnv) status(t *testing.T, py *Python, id string) map[string]any {
	t.Helper()
	var st map[string]any
	if code := py.Do(t, "GET", "/instances/"+id+"/status", "", &st); code != 200 {
		t.Fatalf("status: %d %v", code, st)
	}
	return st
}

func (d *devEnv) waitStatus(t *testing.T, py *Python, id, what string, cond func(map[string]any) bool) map[string]any {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	var st map[string]any
	for time.Now().Before(deadline) {
		if st = d.status(t, py, id); cond(st) {
			return st
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("instance never %s; status %v", what, st)
	return nil
}

// dss asks the instance's DSS (through its publicURL) a question.
func dss(t *testing.T, url, path, key string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", url+path, nil)
	if key != "" {
		req.SetBasicAuth(key, "")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestLifecycleThroughTheCLI(t *testing.T) {
	data := filepath.Join(t.TempDir(), "fm")
	d := startDevFast(t, data)
	py := NewPython(t, d.url, d.keyFile)
	vn := jsonField(t, d.fm(t, "network", "create", "--label", "lab", "--default", "--output", "json"), "id")
	tplFile := filepath.Join(t.TempDir(), "tpl.json")
	const licenseMark = "E2E-LICENSEE-MARK"
	os.WriteFile(tplFile, []byte(`{"label":"base","license":"{\"content\":{\"licensee\":\"`+licenseMark+`\"}}","setupActions":[
		{"type":"ADD_ENV_VARIABLES","params":{"variables":[{"key":"TEAM","value":"data"}]}},
		{"type":"SETUP_K8S_AND_SPARK","params":{}}]}`), 0o644)
	tpl := jsonField(t, d.fm(t, "template", "create", "--file", tplFile, "--output", "json"), "id")
	id := jsonField(t, d.fm(t, "instance", "create", "--label", "dss1", "--network", vn, "--template", tpl,
		"--image", "dss-13.4.0-standin", "--volume-size", "5", "--output", "json"), "id")

	// Provision, showing the steps.
	out, errOut, code := Run(t, fmBin(t), d.env, "instance", "provision", id, "--wait")
	if code != 0 || !strings.Contains(errOut, "install") || !strings.Contains(errOut, "SETUP_K8S_AND_SPARK") || !strings.Contains(out, "succeeded") {
		t.Fatalf("provision: %d\n%s\n%s", code, out, errOut)
	}
	st := d.status(t, py, id)
	url, _ := st["publicURL"].(string)
	if st["state"] != "running" || st["hasPhysicalInstance"] != true || st["cloudMachineIsUp"] != true || url == "" {
		t.Fatalf("after provision: %v", st)
	}
	if code, body := dss(t, url, "/api/health", ""); code != 200 || !strings.Contains(body, `"version":"13.4.0"`) {
		t.Fatalf("DSS at %s: %d %s", url, code, body)
	}
	var key struct{ AdminAPIKey string }
	py.Do(t, "GET", "/instances/"+id+"/admin-api-key", "", &key)
	if code, body := dss(t, url, "/api/runtime", key.AdminAPIKey); code != 200 || !strings.Contains(body, `"TEAM":"data"`) {
		t.Fatalf("the setup action is not in DSS: %d %s", code, body)
	}

	// Prometheus sees the fleet, with an API key (its series name
	// instances).
	if resp, err := http.Get(d.url + "/metrics"); err != nil || resp.StatusCode != 401 {
		t.Fatalf("/metrics without a key: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
	// The bus is sampled every 15 s: the series it makes may come after
	// the first scrape.
	inst := `{instance_id="` + id + `"}`
	wanted := []string{`fm_instances{node_type="design",state="running"} 1`, `fm_instance_heartbeat_age_seconds` + inst,
		`fm_instance_data_volume_used_ratio` + inst, `fm_instance_data_volume_size_bytes` + inst,
		`fm_operations_total{kind="reprovision",result="succeeded"} 1`, `fm_operations_total{kind="stop",result="failed"} 0`,
		`fm_instance_machine_up` + inst + ` 1`, `fm_instance_agent_up` + inst + ` 1`, `fm_instance_dss_up` + inst + ` 1`,
		`fm_instance_dss_info{instance_id="` + id + `",node_type="design",version="13.4.0"} 1`,
		// fm dev's provisioner is in the server's registry.
		`fm_provisioner_backend_calls_total{backend="local",call="reprovision",result="ok"} 1`, `fm_provisioner_lease_held 1`,
		`fm_bus_connected 1`, `fm_bus_stream_messages{stream="FM_EVENTS"}`,
		`fm_bus_consumer_pending_messages{consumer="fm-server",stream="FM_EVENTS"}`, `fm_bus_jetstream_storage_bytes`,
		`fm_bus_server_storage_bytes{server=`, `fm_bus_server_storage_limit_bytes{server=`}
	var missing []string
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		scrape, _ := http.NewRequest("GET", d.url+"/metrics", nil)
		scrape.SetBasicAuth(py.KeyID, py.Secret)
		resp, err := http.DefaultClient.Do(scrape)
		if err != nil {
			t.Fatal(err)
		}
		metrics, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		missing = missing[:0]
		for _, want := range wanted {
			if !strings.Contains(string(metrics), want) {
				name, _, _ := strings.Cut(want, "{")
				var near []string
				for _, l := range strings.Split(string(metrics), "\n") {
					if strings.HasPrefix(l, name) {
						near = append(near, l)
					}
				}
				missing = append(missing, fmt.Sprintf("%s (it has %q)", want, near))
			}
		}
		if len(missing) == 0 || time.Now().After(deadline) {
			break
		}
	}
	for _, m := range missing {
		t.Errorf("/metrics lacks %s", m)
	}

	// The CLI shows the fleet: each instance's state, DSS, URL, heartbeat
	// and volume; fm status sums it up.
	list := d.fm(t, "instance", "list")
	for _, want := range []string{"STATE", "running", "13.4.0", url, "%"} {
		if !strings.Contains(list, want) {
			t.Errorf("fm instance list lacks %q:\n%s", want, list)
		}
	}
	status := d.fm(t, "status")
	for _, want := range []string{"instances   1 (running 1)", "DSS         13.4.0 1", "0 agents not responding", "0 DSS down"} {
		if !strings.Contains(status, want) {
			t.Errorf("fm status lacks %q:\n%s", want, status)
		}
	}
	if strings.Contains(status, "\x1b[") {
		t.Errorf("fm status wrote colours to a pipe:\n%q", status)
	}
	// The agent's own log, shipped to FM_LOGS, read back through the API.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		logs := d.fm(t, "instance", "logs", id, "--since", "1h")
		if strings.Contains(logs, "agent: {") && strings.Contains(logs, `"message"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("fm instance logs shows no agent log line:\n%s", tail(logs, 2000))
		}
	}

	// Stop and start.
	d.fm(t, "instance", "stop", id, "--wait")
	if st := d.status(t, py, id); st["state"] != "stopped" || st["cloudMachineIsUp"] != false || st["publicURL"] != "" {
		t.Fatalf("stopped: %v", st)
	}
	if code, _ := dss(t, url, "/api/health", ""); code != 0 {
		t.Fatal("DSS answers on a stopped machine")
	}
	d.fm(t, "instance", "start", id, "--wait")
	if code, _ := dss(t, url, "/api/health", ""); code != 200 {
		t.Fatal("DSS does not answer after start")
	}

	// Data written into DSS survives a deprovision and a reprovision.
	req, _ := http.NewRequest("POST", url+"/public/api/projects/", strings.NewReader(`{"projectKey":"KEEP","name":"kept"}`))
	req.SetBasicAuth(key.AdminAPIKey, "")
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 200 {
		t.Fatalf("create project: %v %v", resp, err)
	}
	d.fm(t, "instance", "deprovision", id, "--wait")
	if st := d.status(t, py, id); st["state"] != "deprovisioned" || st["hasPhysicalInstance"] != false {
		t.Fatalf("deprovisioned: %v", st)
	}
	if _, err := os.Stat(filepath.Join(data, "local", "volumes", id, "dataiku", "dss_data", "projects", "KEEP")); err != nil {
		t.Fatalf("the data volume was not kept: %v", err)
	}
	d.fm(t, "instance", "reprovision", id, "--wait")
	if code, _ := dss(t, url, "/public/api/projects/KEEP/", key.AdminAPIKey); code != 200 {
		t.Fatal("the project did not survive deprovision and reprovision")
	}

	// A new image upgrades DSS in place, keeping the data.
	d.fm(t, "instance", "update", id, "--image", "dss-14.0.0-standin")
	_, errOut, code = Run(t, fmBin(t), d.env, "instance", "reprovision", id, "--wait")
	if code != 0 || !strings.Contains(errOut, "upgraded from 13.4.0 to 14.0.0") {
		t.Fatalf("upgrade: %d %s", code, errOut)
	}
	if code, body := dss(t, url, "/api/health", ""); !strings.Contains(body, `"version":"14.0.0"`) || code != 200 {
		t.Fatalf("after upgrade: %s", body)
	}
	if code, _ := dss(t, url, "/public/api/projects/KEEP/", key.AdminAPIKey); code != 200 {
		t.Fatal("the project did not survive the upgrade")
	}
	// Back to the older image: refused.
	d.fm(t, "instance", "update", id, "--image", "dss-13.4.0-standin")
	_, errOut, code = Run(t, fmBin(t), d.env, "instance", "reprovision", id)
	if code != 1 || !strings.Contains(errOut, "downgrade refused") {
		t.Fatalf("downgrade: %d %s", code, errOut)
	}
	d.fm(t, "instance", "update", id, "--image", "dss-14.0.0-standin")

	// Commands.
	d.fm(t, "instance", "restart-dss", id, "--wait")
	// A setup action added to the template reaches the machine with a
	// replay, without a new machine: the template as it is now runs again.
	os.WriteFile(tplFile, []byte(`{"label":"base","license":"{\"content\":{\"licensee\":\"`+licenseMark+`\"}}","setupActions":[
		{"type":"ADD_ENV_VARIABLES","params":{"variables":[{"key":"TEAM","value":"data"}]}},
		{"type":"ADD_ENV_VARIABLES","params":{"variables":[{"key":"REPLAYED","value":"yes"}]}},
		{"type":"SETUP_K8S_AND_SPARK","params":{}}]}`), 0o644)
	d.fm(t, "template", "update", tpl, "--file", tplFile)
	_, errOut, code = Run(t, fmBin(t), d.env, "instance", "replay-setup-actions", id, "--wait")
	if code != 0 || !strings.Contains(errOut, "ADD_ENV_VARIABLES") {
		t.Fatalf("replay: %d %s", code, errOut)
	}
	if code, body := dss(t, url, "/api/runtime", key.AdminAPIKey); code != 200 || !strings.Contains(body, `"REPLAYED":"yes"`) || !strings.Contains(body, `"TEAM":"data"`) {
		t.Fatalf("the template's new setup action is not in DSS after the replay: %d %s", code, body)
	}
	if st := d.status(t, py, id); st["state"] != "running" {
		t.Fatalf("after the replay: %v", st)
	}
	// The same for every instance of the template, in one call.
	os.WriteFile(tplFile, []byte(`{"label":"base","license":"{\"content\":{\"licensee\":\"`+licenseMark+`\"}}","setupActions":[
		{"type":"ADD_ENV_VARIABLES","params":{"variables":[{"key":"TEAM","value":"data"}]}},
		{"type":"ADD_ENV_VARIABLES","params":{"variables":[{"key":"REPLAYED","value":"fleet-wide"}]}},
		{"type":"SETUP_K8S_AND_SPARK","params":{}}]}`), 0o644)
	d.fm(t, "template", "update", tpl, "--file", tplFile)
	var fleetWide api.TemplateReplay
	if err := json.Unmarshal([]byte(d.fm(t, "template", "replay-setup-actions", tpl, "--output", "json")), &fleetWide); err != nil {
		t.Fatal(err)
	}
	if len(fleetWide.Futures) != 1 || fleetWide.Futures[0].TargetID != id || len(fleetWide.Skipped) != 0 {
		t.Fatalf("template-wide replay: %+v", fleetWide)
	}
	d.fm(t, "op", "wait", fleetWide.Futures[0].JobID)
	if code, body := dss(t, url, "/api/runtime", key.AdminAPIKey); code != 200 || !strings.Contains(body, `"REPLAYED":"fleet-wide"`) {
		t.Fatalf("the template-wide replay did not reach DSS: %d %s", code, body)
	}
	pw := d.fm(t, "instance", "password", id)
	if !strings.HasPrefix(pw, "admin: ") {
		t.Fatalf("password: %s", pw)
	}
	if _, _, code := Run(t, fmBin(t), d.env, "instance", "password", id); code != 1 {
		t.Fatal("the initial password was given twice")
	}
	cmd := exec.Command(fmBin(t), "instance", "reset-password", id, "--wait")
	cmd.Env = append(os.Environ(), d.env...)
	cmd.Stdin = strings.NewReader("Fresh-passw0rd\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("reset-password: %v %s", err, out)
	}
	login, _ := http.Post(url+"/api/login", "application/json", strings.NewReader(`{"login":"admin","password":"Fresh-passw0rd"}`))
	if login == nil || login.StatusCode != 200 {
		t.Fatalf("login with the new password: %v", login)
	}
	// The license reached DSS, through the sealed desired state.
	if lic, err := os.ReadFile(filepath.Join(data, "local", "volumes", id, "dataiku", "dss_data", "config", "license.json")); err != nil || !strings.Contains(string(lic), licenseMark) {
		t.Fatalf("DSS's license: %v %s", err, lic)
	}

	// A diagnosis bundle is filed in fm_diagnosis.
	var f map[string]any
	py.Do(t, "GET", "/instances/"+id+"/actions/collect-diagnosis", "", &f)
	res, code := py.wait(t, f)
	diag, _ := res["result"].(map[string]any)
	if code != 200 || diag["object"] != id+"/"+fmt.Sprint(f["jobId"])+"-cmd.tar.gz" {
		t.Fatalf("collect-diagnosis: %d %v", code, res)
	}
	// A custom certificate, with its private key (kept sealed, given to
	// no viewer).
	certPEM, keyLine := selfSignedPEM(t)
	var in map[string]any
	py.Do(t, "GET", "/instances/"+id, "", &in)
	in["sslCertificatePEM"] = certPEM
	if code := py.Do(t, "PUT", "/instances/"+id, mustMarshal(t, in), nil); code != 200 {
		t.Fatalf("a custom certificate: %d", code)
	}
	secrets := map[string]string{"initial password": strings.TrimPrefix(strings.TrimSpace(pw), "admin: "),
		"DSS admin API key": key.AdminAPIKey, "reset password": "Fresh-passw0rd", "license": licenseMark,
		"certificate's private key": keyLine, "the agent's NATS seed": agentSeed(t, d, id)}
	noSecretIn(t, "the diagnosis bundle", diagnosisBundle(t, d, fmt.Sprint(diag["object"])), secrets)
	// Collected and downloaded in one command; both bundles listed.
	fresh := filepath.Join(t.TempDir(), "fresh.tar.gz")
	if out := d.fm(t, "instance", "diagnosis", id, "--out", fresh); !strings.Contains(out, "wrote "+fresh) {
		t.Fatalf("fm instance diagnosis: %s", out)
	}
	freshBundle, err := os.ReadFile(fresh)
	if err != nil || len(freshBundle) == 0 {
		t.Fatalf("fm instance diagnosis wrote %d bytes: %v", len(freshBundle), err)
	}
	// This one was collected with the certificate's key on the machine.
	noSecretIn(t, "the diagnosis bundle collected after the certificate", bundleText(t, freshBundle), secrets)
	if listed := d.fm(t, "instance", "diagnosis", id, "--list"); strings.Count(listed, ".tar.gz") != 2 {
		t.Fatalf("fm instance diagnosis --list:\n%s", listed)
	}
	agentLog, err := os.ReadFile(filepath.Join(data, "local", "machines", id, "root", "var", "lib", "fm-agent", "agent.log"))
	if err != nil {
		t.Fatal(err)
	}
	noSecretIn(t, "the agent's log", string(agentLog), secrets)
	bus := d.dumpBus(t)
	noSecretIn(t, "the bus", bus, secrets)
	// …because they went sealed with the instance key.
	for _, sealed := range []string{`"sealedLicense":"fmsealed2:`, `"sealedResult":"fmsealed2:`, `"sealedParams":"fmsealed2:`} {
		if !strings.Contains(bus, sealed) {
			t.Errorf("no %s… on the bus", sealed)
		}
	}

	// Delete: refused with a machine, then done after a deprovision.
	if _, errOut, code := Run(t, fmBin(t), d.env, "instance", "delete", id); code != 1 || !strings.Contains(errOut, "deprovision it first") {
		t.Fatalf("delete with a machine: %d %s", code, errOut)
	}
	d.fm(t, "instance", "deprovision", id, "--wait")
	d.fm(t, "instance", "delete", id, "--wait")
	if _, err := os.Stat(filepath.Join(data, "local", "volumes", id)); !os.IsNotExist(err) {
		t.Fatal("delete left the data volume")
	}
	if code := py.Do(t, "GET", "/instances/"+id, "", nil); code != 404 {
		t.Fatalf("deleted instance: %d", code)
	}
	if left := cmdline.Find(filepath.Join(data, "local")); len(left) != 0 {
		t.Fatalf("machine processes left: %v", left)
	}

	// Every credential event is on record, the agents' last one revoked.
	audit := d.fm(t, "audit", "--object", "credentials", "--limit", "100")
	for _, want := range []string{"credentials.minted", "credentials.exchanged", "credentials.revoked"} {
		if !strings.Contains(audit, want) {
			t.Errorf("the audit trail lacks %s:\n%s", want, audit)
		}
	}
	// No secret is in clear on the bus (buckets with their history,
	// streams, object stores) or in FM's log.
	var admin struct{ Secret string }
	b, _ := os.ReadFile(d.keyFile)
	json.Unmarshal(b, &admin)
	secrets["FM admin key secret"] = admin.Secret
	noSecretIn(t, "the bus", d.dumpBus(t), secrets)
	noSecretIn(t, "fm dev's log", d.proc.Stdout()+d.proc.Stderr(), secrets)
	// Nor anywhere in FM's data folder, file by file, but for the admin
	// key FM writes there for its operator, and the machines' disks (the
	// local backend keeps them there).
	delete(secrets, "FM admin key secret")
	noSecretInFolder(t, data, secrets, filepath.Join(data, "local", "machines"), filepath.Join(data, "local", "volumes"))
}

// selfSignedPEM is a certificate and its private key, PEM (as FM makes
// its own), and the first line of the key's body (what a leak of the key
// would show).
func selfSignedPEM(t *testing.T) (string, string) {
	t.Helper()
	files, err := pki.EnsureSelfSigned(t.TempDir(), []string{"dss.example.com"})
	if err != nil {
		t.Fatal(err)
	}
	cert, key := readFile(t, files.Cert), readFile(t, files.Key)
	return cert + key, strings.Split(key, "\n")[1]
}

// diagnosisBundle downloads a bundle with fm instance diagnosis (REST),
// checks that fm_diagnosis keeps it sealed, and returns the text of its
// files.
func diagnosisBundle(t *testing.T, d *devEnv, object string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	obs, err := d.jetStream(t).ObjectStore(ctx, protocol.ObjectStoreDiagnosis)
	if err != nil {
		t.Fatal(err)
	}
	filed, err := obs.GetBytes(ctx, object)
	if err != nil {
		t.Fatalf("the bundle %s: %v", object, err)
	}
	id, name, _ := strings.Cut(object, "/")
	out := filepath.Join(t.TempDir(), "bundle.tar.gz")
	d.fm(t, "instance", "diagnosis", id, "--name", name, "--out", out)
	b, err := os.ReadFile(out)
	if err != nil || len(b) == 0 {
		t.Fatalf("fm instance diagnosis --name %s: %v", name, err)
	}
	if !bytes.HasPrefix(filed, seal.StreamMagic()) || bytes.Contains(filed, b[:min(len(b), 64)]) {
		t.Fatalf("fm_diagnosis keeps %s unsealed", object)
	}
	return bundleText(t, b)
}

// agentSeed is the NATS seed of the instance's machine's agent.
func agentSeed(t *testing.T, d *devEnv, id string) string {
	t.Helper()
	kp, err := natsjwt.ParseDecoratedNKey(machineCreds(t, filepath.Join(d.data, "local", "machines"), id))
	if err != nil {
		t.Fatal(err)
	}
	seed, err := kp.Seed()
	if err != nil {
		t.Fatal(err)
	}
	return string(seed)
}

// bundleText is the text of every file of a diagnosis bundle (.tar.gz).
func bundleText(t *testing.T, b []byte) string {
	t.Helper()
	gz, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	var all strings.Builder
	tr := tar.NewReader(gz)
	for {
		_, err := tr.Next()
		if err == io.EOF {
			return all.String()
		}
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(&all, tr); err != nil {
			t.Fatal(err)
		}
	}
}

// noSecretInFolder checks every file under dir but those under skip.
func noSecretInFolder(t *testing.T, dir string, secrets map[string]string, skip ...string) {
	t.Helper()
	files, size := 0, 0
	err := filepath.WalkDir(dir, func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if e.IsDir() && slices.Contains(skip, path) {
			return filepath.SkipDir
		}
		if !e.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		files, size = files+1, size+len(b)
		for name, v := range secrets {
			if bytes.Contains(b, []byte(v)) {
				t.Errorf("the %s is in clear in %s", name, path)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if files < 10 || size < 100_000 {
		t.Fatalf("the data folder holds %d files, %d bytes: the scan read nothing", files, size)
	}
}

// noSecretIn fails the test for each secret found in text.
func noSecretIn(t *testing.T, where, text string, secrets map[string]string) {
	t.Helper()
	if len(text) < 1000 {
		t.Fatalf("%s holds only %d bytes: the scan read nothing", where, len(text))
	}
	for name, v := range secrets {
		if len(v) < 8 {
			t.Fatalf("%s %q is too short to look for", name, v)
		}
		if strings.Contains(text, v) {
			t.Errorf("the %s is in clear in %s", name, where)
		}
	}
}

// wait polls a future as Dataiku's client does, but faster: GET
// /futures/{id}?peek=False until hasResult or an HTTP error.
func (p *Python) wait(t *testing.T, f map[string]any) (map[string]any, int) {
	t.Helper()
	if f["hasResult"] == true {
		return f, 200
	}
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		var next map[string]any
		code := p.Do(t, "GET", fmt.Sprintf("/futures/%v?peek=False", f["jobId"]), "", &next)
		if code >= 400 || next["hasResult"] == true {
			return next, code
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("future %v never resolved", f["jobId"])
	return nil, 0
}

func TestLifecycleAsThePythonClientSendsIt(t *testing.T) {
	data := filepath.Join(t.TempDir(), "fm")
	d := startDevFast(t, data)
	py := NewPython(t, d.url, d.keyFile)
	var vn, tpl, in, f map[string]any
	py.Do(t, "POST", "/virtual-networks?useDefaultValues=True", `{"label": "net", "mode": "EXISTING_MONOTENANT", "awsVpcId": null, "awsSubnetId": null, "awsSecondSubnetId": null, "awsAutoCreateSecurityGroups": true}`, &vn)
	py.Do(t, "POST", "/instance-settings-templates", `{"label": "tpl", "setupActions": [{"type": "ADD_AUTHORIZED_KEY", "params": {"sshKey": "ssh-ed25519 AAAAC3Nza ops@x"}}], "license": null}`, &tpl)
	py.Do(t, "POST", "/instances", fmt.Sprintf(`{"label": "py1", "instanceSettingsTemplateId": %q, "virtualNetworkId": %q, "imageId": "dss-14.0.0-standin", "dssNodeType": "automation"}`, tpl["id"], vn["id"]), &in)
	id := in["id"].(string)
	for _, action := range []string{"reprovision", "stop", "start", "restart-dss", "replay-setup-actions"} {
		if code := py.Do(t, "GET", "/instances/"+id+"/actions/"+action, "", &f); code != 200 {
			t.Fatalf("%s: %d %v", action, code, f)
		}
		if res, code := py.wait(t, f); code != 200 {
			t.Fatalf("%s failed: %d %v", action, code, res)
		}
	}
	st := d.status(t, py, id)
	if st["cloudMachineIsUp"] != true || st["publicURL"] == "" || st["privateIP"] != "127.0.0.1" {
		t.Fatalf("status %v", st)
	}
	// reset-user-password: a JSON body (13.5.4 and later) or a query (older).
	py.Do(t, "POST", "/instances/"+id+"/actions/reset-user-password", `{"userName": "admin", "password": "Body-pw1"}`, &f)
	if _, code := py.wait(t, f); code != 200 {
		t.Fatal("reset by body failed")
	}
	py.Do(t, "GET", "/instances/"+id+"/actions/reset-user-password?userName=admin&password=Query-pw1", "", &f)
	if _, code := py.wait(t, f); code != 200 {
		t.Fatal("reset by query failed")
	}
	// A command DSS refuses fails as an HTTP error on the future.
	py.Do(t, "POST", "/instances/"+id+"/actions/reset-user-password", `{"userName": "nobody", "password": "x"}`, &f)
	if res, code := py.wait(t, f); code < 400 || !strings.Contains(fmt.Sprint(res["detailedMessage"]), "nobody") {
		t.Fatalf("a failed command: %d %v", code, res)
	}
	var pw map[string]any
	if code := py.Do(t, "GET", "/instances/"+id+"/actions/get-initial-password", "", &pw); code != 200 || pw["password"] == "" {
		t.Fatalf("initial password: %d %v", code, pw)
	}
	py.Do(t, "GET", "/instances/"+id+"/actions/deprovision", "", &f)
	py.wait(t, f)
	py.Do(t, "GET", "/instances/"+id+"/actions/delete", "", &f)
	if _, code := py.wait(t, f); code != 200 {
		t.Fatal("delete failed")
	}
	var list []any
	py.Do(t, "GET", "/instances", "", &list)
	if len(list) != 0 {
		t.Fatalf("instances left: %v", list)
	}
}

func TestCrashDuringReprovision(t *testing.T) {
	data := filepath.Join(t.TempDir(), "fm")
	d := startDevFast(t, data)
	py := NewPython(t, d.url, d.keyFile)
	id := d.newInstance(t, "c1", "dss-14.0.0-standin")
	var f map[string]any
	py.Do(t, "GET", "/instances/"+id+"/actions/reprovision", "", &f)
	// fm dev dies at once, in the middle of the operation.
	if err := syscall.Kill(d.proc.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-d.proc.done
	d2 := d.restart(t)
	py2 := NewPython(t, d2.url, d2.keyFile)
	res, code := py2.wait(t, f)
	if code != 200 || res["hasResult"] != true {
		t.Fatalf("after the crash the operation ended with %d %v", code, res)
	}
	st := d2.status(t, py2, id)
	if st["state"] != "running" || st["agentResponding"] != true {
		t.Fatalf("status %v", st)
	}
	cfg := filepath.Join(data, "local", "machines", id, "root", "etc", "fm-agent.json")
	if agents := cmdline.Find(cfg, "agent"); len(agents) != 1 {
		t.Fatalf("%d machines run for the instance, want exactly 1", len(agents))
	}
}

func TestKilledAgentIsSeenAndStartBringsItBack(t *testing.T) {
	data := filepath.Join(t.TempDir(), "fm")
	d := startDevFast(t, data)
	py := NewPython(t, d.url, d.keyFile)
	id := d.newInstance(t, "k1", "dss-14.0.0-standin")
	d.fm(t, "instance", "provision", id, "--wait")
	cfg := filepath.Join(data, "local", "machines", id, "root", "etc", "fm-agent.json")
	agents := cmdline.Find(cfg, "agent")
	if len(agents) != 1 {
		t.Fatalf("agents %v", agents)
	}
	syscall.Kill(agents[0], syscall.SIGKILL)
	d.waitStatus(t, py, id, "shown as not responding", func(st map[string]any) bool { return st["agentResponding"] == false })
	st := d.waitStatus(t, py, id, "failed with a lost machine", func(st map[string]any) bool {
		return st["state"] == "failed" && st["machineStatus"] == "lost"
	})
	if st["cloudMachineIsUp"] != false {
		t.Fatalf("%v", st)
	}
	d.fm(t, "instance", "start", id, "--wait")
	d.waitStatus(t, py, id, "running and responding", func(st map[string]any) bool {
		return st["state"] == "running" && st["agentResponding"] == true
	})
}

func TestLifecycleBadInput(t *testing.T) {
	data := filepath.Join(t.TempDir(), "fm")
	d := startDevFast(t, data)
	py := NewPython(t, d.url, d.keyFile)
	id := d.newInstance(t, "b1", "dss-14.0.0-standin")
	before := d.status(t, py, id)
	var e map[string]any
	for path, want := range map[string]int{
		"/instances/in-unknown/actions/reprovision": 404,
		"/instances/in-unknown/actions/start":       404,
		"/instances/" + id + "/actions/start":       409,
		"/instances/" + id + "/actions/stop":        409,
		"/instances/" + id + "/actions/restart-dss": 409,
	} {
		if code := py.Do(t, "GET", path, "", &e); code != want || e["errorType"] == nil || e["detailedMessage"] == "" {
			t.Errorf("%s: %d %v, want %d with an error body", path, code, e, want)
		}
	}
	if code := py.Do(t, "PUT", "/instances/"+id, `{"imageId":"dss-0.0.0-nope"}`, &e); code != 400 || !strings.Contains(fmt.Sprint(e["detailedMessage"]), "dss-0.0.0-nope") {
		t.Errorf("unknown image: %d %v", code, e)
	}
	after := d.status(t, py, id)
	b1, _ := json.Marshal(before)
	b2, _ := json.Marshal(after)
	if string(b1) != string(b2) {
		t.Fatalf("refused requests changed the instance:\n%s\n%s", b1, b2)
	}
}
