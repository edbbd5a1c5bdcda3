package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

var (
	buildDir  string
	buildOnce sync.Once
	fmBinPath string
	buildErr  error
)

func TestMain(m *testing.M) {
	var err error
	if buildDir, err = os.MkdirTemp("", "fm-e2e-"); err != nil {
		panic(err)
	}
	code := m.Run()
	os.RemoveAll(buildDir)
	os.Exit(code)
}

// fmBin builds fm and the kits once per test binary. It runs inside the
// tests, where Go's test cache records the sources Build reads.
func fmBin(t *testing.T) string {
	t.Helper()
	return fmBinB(t)
}

func fmBinB(tb testing.TB) string {
	tb.Helper()
	buildOnce.Do(func() { fmBinPath, buildErr = Build(buildDir, true) })
	if buildErr != nil {
		tb.Fatal(buildErr)
	}
	return fmBinPath
}

var (
	plainOnce sync.Once
	plainBin  string
	plainErr  error
)

// fmBinPlain is fm built without the race detector, for benchmarks.
func fmBinPlain(tb testing.TB) string {
	tb.Helper()
	plainOnce.Do(func() {
		dir := filepath.Join(buildDir, "plain")
		plainBin, plainErr = Build(dir, false)
	})
	if plainErr != nil {
		tb.Fatal(plainErr)
	}
	return plainBin
}

// devEnv is `fm dev` on a temporary data folder and a random port.
type devEnv struct {
	proc    *Proc
	data    string
	addr    string
	url     string
	env     []string
	keyFile string
	args    []string // extra flags
}

func startDev(t *testing.T, data string) *devEnv {
	t.Helper()
	return startDevAt(t, data, FreePort(t))
}

// startDevAt starts fm dev listening on addr, with extra flags.
func startDevAt(t *testing.T, data, addr string, extra ...string) *devEnv {
	t.Helper()
	return startDevWith(t, fmBin(t), data, addr, extra...)
}

// startDevWith is startDevAt with the fm binary bin (another commit's).
func startDevWith(t *testing.T, bin, data, addr string, extra ...string) *devEnv {
	t.Helper()
	d := &devEnv{data: data, addr: addr, url: "http://" + addr, keyFile: filepath.Join(data, "admin-key.json"), args: extra}
	d.env = []string{"FM_URL=" + d.url, "FM_KEY_FILE=" + d.keyFile}
	d.proc = Start(t, bin, nil, append([]string{"dev", "--data", data, "--listen", addr, "--log-format", "json"}, extra...)...)
	WaitHTTP(t, d.url+"/healthz", 60*time.Second)
	d.proc.WaitStdout("Press Ctrl-C to stop", 10*time.Second)
	return d
}

// dumpBus returns every message stored on fm dev's bus.
func (d *devEnv) dumpBus(t *testing.T) string {
	t.Helper()
	return bustest.Dump(t, d.jetStream(t))
}

// jetStream reaches fm dev's bus with the admin NATS credentials it made;
// the connection closes when the test ends.
func (d *devEnv) jetStream(t *testing.T) jetstream.JetStream {
	t.Helper()
	_, js := d.connect(t, filepath.Join(d.data, "nats-admin.creds"))
	return js
}

// connect reaches fm dev's bus with the credentials in creds; the
// connection closes when the test ends.
func (d *devEnv) connect(t *testing.T, creds string, opts ...nats.Option) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	addr, err := os.ReadFile(filepath.Join(d.data, "nats.addr"))
	if err != nil {
		t.Fatal(err)
	}
	return ConnectJetStream(t, "nats://"+strings.TrimSpace(string(addr)), append([]nats.Option{nats.UserCredentials(creds)}, opts...)...)
}

// restart starts fm dev again as it was (same data, address and flags),
// as an operator restarts FM: machines find it where they left it.
func (d *devEnv) restart(t *testing.T) *devEnv {
	t.Helper()
	return startDevAt(t, d.data, d.addr, d.args...)
}

// fm runs a client command and fails the test if it does not exit 0.
func (d *devEnv) fm(t *testing.T, args ...string) string {
	t.Helper()
	out, errOut, code := Run(t, fmBin(t), d.env, args...)
	if code != 0 {
		t.Fatalf("fm %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

func jsonField(t *testing.T, out, key string) string {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("not a JSON object: %s", out)
	}
	s, _ := m[key].(string)
	return s
}

func TestDevWithCLIAndRawHTTP(t *testing.T) {
	data := filepath.Join(t.TempDir(), "fm")
	d := startDev(t, data)

	// First start: the admin key file exists with mode 0600 and is named,
	// never printed.
	st, err := os.Stat(d.keyFile)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("admin key file: %v %v", st, err)
	}
	key, _ := os.ReadFile(d.keyFile)
	var kf struct{ ID, Secret string }
	json.Unmarshal(key, &kf)
	if !strings.Contains(d.proc.Stdout(), d.keyFile) || strings.Contains(d.proc.Stdout()+d.proc.Stderr(), kf.Secret) {
		t.Fatalf("the key file is not named, or the secret is printed:\n%s", d.proc.Stdout())
	}

	// /images is never empty in fm dev: the stand-in kits are registered.
	images := d.fm(t, "image", "list")
	if !strings.Contains(images, "dss-14.0.0-standin") || !strings.Contains(images, "dss-13.4.0-standin") {
		t.Fatalf("images:\n%s", images)
	}

	vnID := jsonField(t, d.fm(t, "network", "create", "--label", "lab", "--default", "--output", "json"), "id")
	tplPath := filepath.Join(t.TempDir(), "tpl.json")
	os.WriteFile(tplPath, []byte(`{"label":"base","setupActions":[{"type":"ADD_AUTHORIZED_KEY","params":{"sshKey":"ssh-ed25519 AAAAC3Nza ops"}}]}`), 0o644)
	tplID := jsonField(t, d.fm(t, "template", "create", "--file", tplPath, "--output", "json"), "id")
	inID := jsonField(t, d.fm(t, "instance", "create", "--label", "dss1", "--network", vnID, "--template", tplID,
		"--image", "dss-14.0.0-standin", "--volume-size", "20", "--fm-tags", "team-a,prod", "--output", "json"), "id")

	list := d.fm(t, "instance", "list")
	if !strings.Contains(list, inID) || !strings.Contains(list, "lab") || !strings.Contains(list, "base") {
		t.Fatalf("instance list:\n%s", list)
	}
	// FM's paging and filters: a page of one, by a part of the label; a
	// page after the last id is empty; a state that does not exist is an
	// error that says so.
	if page := d.fm(t, "instance", "list", "--limit", "1", "--label", "DSS", "--state", "created", "--output", "json"); !strings.Contains(page, inID) {
		t.Fatalf("a page of instances with DSS in their label:\n%s", page)
	}
	if page := d.fm(t, "instance", "list", "--after", inID, "--output", "json"); strings.TrimSpace(page) != "[]" {
		t.Fatalf("instances after the only one:\n%s", page)
	}
	if _, errOut, code := Run(t, fmBin(t), d.env, "instance", "list", "--state", "asleep"); code == 0 || !strings.Contains(errOut, "state") {
		t.Fatalf("--state asleep: exit %d, %s", code, errOut)
	}
	d.fm(t, "instance", "update", inID, "--description", "first node", "--auto-snapshot", "true")
	if got := d.fm(t, "instance", "get", inID, "--output", "json"); jsonField(t, got, "description") != "first node" {
		t.Fatalf("update not applied: %s", got)
	}

	// Bad input: a clear message and exit status 1, nothing created.
	out, errOut, code := Run(t, fmBin(t), d.env, "instance", "create", "--label", "bad", "--network", vnID, "--template", tplID, "--image", "dss-0.0.1")
	if code != 1 || !strings.Contains(errOut, `image "dss-0.0.1" does not exist`) {
		t.Fatalf("bad create: %d %s %s", code, out, errOut)
	}
	if _, _, code := Run(t, fmBin(t), d.env, "instance", "get"); code != 2 {
		t.Fatalf("missing id: exit %d, want 2", code)
	}

	// The same objects through raw HTTP shaped like the Python client.
	py := NewPython(t, d.url, d.keyFile)
	var raw []map[string]any
	if s := py.Do(t, "GET", "/instances", "", &raw); s != 200 || len(raw) != 1 || raw[0]["virtualNetworkLabel"] != "lab" {
		t.Fatalf("GET /instances: %d %v", s, raw)
	}
	var vn map[string]any
	py.Do(t, "GET", "/virtual-networks/"+vnID, "", &vn)
	vn["httpsStrategy"], vn["httpStrategy"] = "SELF_SIGNED", "REDIRECT"
	b, _ := json.Marshal(vn)
	if s := py.Do(t, "PUT", "/virtual-networks/"+vnID, string(b), nil); s != 200 {
		t.Fatalf("save network: %d", s)
	}
	var tags map[string]string
	if s := py.Do(t, "PUT", "/cloud-tags", `{"owner":"platform"}`, nil); s != 200 {
		t.Fatalf("PUT cloud-tags: %d", s)
	}
	var msg struct{ Msg string }
	py.Do(t, "GET", "/cloud-tags", "", &msg)
	json.Unmarshal([]byte(msg.Msg), &tags)
	if tags["owner"] != "platform" {
		t.Fatalf("cloud tags: %q", msg.Msg)
	}

	// Deletion is a future; fm waits for it and the op is listed.
	d.fm(t, "instance", "delete", inID)
	if ops := d.fm(t, "op", "list", "--target", inID); !strings.Contains(ops, "delete-instance") || !strings.Contains(ops, "succeeded") {
		t.Fatalf("op list:\n%s", ops)
	}
	if page := d.fm(t, "op", "list", "--limit", "1", "--output", "json"); strings.Count(page, `"jobId"`) != 1 {
		t.Fatalf("op list --limit 1:\n%s", page)
	}
	d.fm(t, "instance", "create", "--label", "dss2", "--network", vnID, "--template", tplID, "--image", "dss-13.4.0-standin")

	// Ctrl-C shuts down cleanly within seconds.
	if err := d.proc.Interrupt(15 * time.Second); err != nil {
		t.Fatalf("fm dev exited with %v after SIGINT", err)
	}

	// A restart on the same folder keeps every object and the key.
	d2 := d.restart(t)
	if strings.Contains(d2.proc.Stdout(), "(created") {
		t.Fatal("a restart created a new admin key")
	}
	list = d2.fm(t, "instance", "list")
	if !strings.Contains(list, "dss2") || strings.Contains(list, "dss1") {
		t.Fatalf("after restart:\n%s", list)
	}
	if got := d2.fm(t, "network", "get", vnID, "--output", "json"); jsonField(t, got, "httpsStrategy") != "SELF_SIGNED" {
		t.Fatalf("network after restart: %s", got)
	}
	if err := d2.proc.Interrupt(15 * time.Second); err != nil {
		t.Fatal(err)
	}
}

// TestNATSCredentials: fm dev's bus takes no one without credentials, and
// its read-only ones change nothing and make no consumer.
func TestNATSCredentials(t *testing.T) {
	natsBin, err := exec.LookPath("nats")
	if err != nil {
		t.Fatal("the NATS CLI is not on PATH; `make test` installs it (go install github.com/nats-io/natscli/nats@v0.5.0)")
	}
	data := filepath.Join(t.TempDir(), "fm")
	d := startDev(t, data)
	vnID := jsonField(t, d.fm(t, "network", "create", "--label", "lab", "--default", "--output", "json"), "id")
	addr, err := os.ReadFile(filepath.Join(data, "nats.addr"))
	if err != nil {
		t.Fatal(err)
	}
	url := "NATS_URL=nats://" + strings.TrimSpace(string(addr))
	home := "HOME=" + t.TempDir()
	// The bus takes no one without credentials.
	if out, errOut, code := Run(t, natsBin, []string{url, home}, "stream", "ls"); code == 0 || !strings.Contains(out+errOut, "Authorization Violation") {
		t.Errorf("nats stream ls without credentials: exit %d\n%s%s", code, out, errOut)
	}
	env := []string{url, home, "NATS_CREDS=" + filepath.Join(data, "nats-readonly.creds")}
	// The read-only credentials change nothing.
	if out, errOut, code := Run(t, natsBin, env, "kv", "put", "fm_networks", vnID, "{}"); code == 0 || !strings.Contains(out+errOut, "ermission") {
		t.Errorf("nats kv put with read-only credentials: exit %d\n%s%s", code, out, errOut)
	}
	// The recipes themselves run in TestOperatorRecipes (docs/operators.md).
	// A read-only operator makes no consumer: its delivery subject would
	// be the FM account's (docs/security.md).
	if out, errOut, code := Run(t, natsBin, env, "kv", "ls", "fm_networks"); code == 0 && !strings.Contains(out+errOut, "ermission") {
		t.Errorf("nats kv ls fm_networks with read-only credentials: exit 0\n%s%s", out, errOut)
	}
	if err := d.proc.Interrupt(15 * time.Second); err != nil {
		t.Fatal(err)
	}
}
