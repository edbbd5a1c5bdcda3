package e2e

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestLifecycleOverTLS runs fm dev with TLS on the REST API and the bus: the
// CLI and the NATS CLI need the CA, and a machine's agent joins and talks to
// the bus with the CA it was given.
func TestLifecycleOverTLS(t *testing.T) {
	data := filepath.Join(t.TempDir(), "fm")
	t.Cleanup(func() { StopUnder(data) })
	addr := FreePort(t)
	proc := Start(t, fmBin(t), nil, "dev", "--data", data, "--listen", addr, "--log-format", "json", "--heartbeat-seconds", "1", "--tls")
	out := proc.WaitStdout("Press Ctrl-C to stop", 60*time.Second)
	ca := filepath.Join(data, "tls", "ca.pem")
	if !strings.Contains(out, "https://"+addr) || !strings.Contains(out, ca) {
		t.Fatalf("fm dev --tls says:\n%s", out)
	}
	base := []string{"FM_URL=https://" + addr, "FM_KEY_FILE=" + filepath.Join(data, "admin-key.json")}
	env := append(base, "FM_CA_FILE="+ca)
	fm := func(args ...string) string {
		t.Helper()
		out, errOut, code := Run(t, fmBin(t), env, args...)
		if code != 0 {
			t.Fatalf("fm %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
		}
		return out
	}

	if _, errOut, code := Run(t, fmBin(t), base, "instance", "list"); code == 0 || !strings.Contains(errOut, "certificate") {
		t.Fatalf("without the CA: exit %d %s", code, errOut)
	}
	vn := jsonField(t, fm("network", "create", "--label", "tls-net", "--default", "--output", "json"), "id")
	tpl := jsonField(t, fm("template", "create", "--label", "tls-tpl", "--output", "json"), "id")
	id := jsonField(t, fm("instance", "create", "--label", "tls1", "--network", vn, "--template", tpl,
		"--image", "dss-14.0.0-standin", "--output", "json"), "id")
	fm("instance", "provision", id, "--wait")
	st := fm("instance", "get", id, "--output", "json")
	if jsonField(t, st, "id") != id {
		t.Fatalf("instance: %s", st)
	}
	status := fm("instance", "status", id, "--output", "json")
	if !strings.Contains(status, `"agentResponding": true`) || !strings.Contains(status, `"state": "running"`) {
		t.Fatalf("status over TLS: %s", status)
	}

	natsBin, err := exec.LookPath("nats")
	if err != nil {
		t.Fatal("the NATS CLI is not on PATH; `make test` installs it")
	}
	natsAddr := strings.TrimSpace(readFile(t, filepath.Join(data, "nats.addr")))
	natsEnv := []string{"NATS_URL=nats://" + natsAddr, "HOME=" + t.TempDir(), "NATS_CREDS=" + filepath.Join(data, "nats-readonly.creds")}
	if out, errOut, code := Run(t, natsBin, natsEnv, "stream", "ls"); code == 0 {
		t.Fatalf("nats without the CA: exit 0\n%s%s", out, errOut)
	}
	if out, errOut, code := Run(t, natsBin, append(natsEnv, "NATS_CA="+ca), "stream", "ls"); code != 0 || !strings.Contains(out, "FM_EVENTS") {
		t.Fatalf("nats with the CA: exit %d\n%s%s", code, out, errOut)
	}
	fm("instance", "deprovision", id, "--wait")
	if err := proc.Interrupt(15 * time.Second); err != nil {
		t.Fatal(err)
	}
}

// TestServerServesHTTPS: fm server makes a self-signed CA on first start
// and serves the REST API with TLS by default.
func TestServerServesHTTPS(t *testing.T) {
	data := filepath.Join(t.TempDir(), "fm")
	addr := FreePort(t)
	proc := Start(t, fmBin(t), nil, "server", "--data", data, "--listen", addr, "--nats-listen", FreePort(t))
	proc.WaitStdout("REST API https://"+addr, 60*time.Second)
	env := []string{"FM_URL=https://" + addr, "FM_KEY_FILE=" + filepath.Join(data, "admin-key.json"), "FM_CA_FILE=" + filepath.Join(data, "tls", "ca.pem")}
	if out, errOut, code := Run(t, fmBin(t), env, "apikey", "list"); code != 0 || !strings.Contains(out, "admin") {
		t.Fatalf("fm apikey list over HTTPS: exit %d\n%s%s", code, out, errOut)
	}
	if out, errOut, code := Run(t, fmBin(t), env, "nats-creds", "--role", "readonly"); code != 0 || !strings.Contains(out, "NATS USER JWT") {
		t.Fatalf("fm nats-creds: exit %d\n%s%s", code, out, errOut)
	}
	if err := proc.Interrupt(15 * time.Second); err != nil {
		t.Fatal(err)
	}
}
