package e2e

import (
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/cmdline"
)

// TestAgentUpgradeInPlace: FM is upgraded under a running fleet (fm dev
// started again from another binary on the same data folder); the
// machines' agents, still the previous binary, are reported as not
// current; `fm agent-upgrade start --batch 1 --wait` brings them to the
// binary FM now serves, one at a time, each in place (the same process:
// it executed the new binary), and the upgraded agents carry out
// operations.
func TestAgentUpgradeInPlace(t *testing.T) {
	bin := fmBin(t)
	data := filepath.Join(t.TempDir(), "fm")
	t.Cleanup(func() { StopUnder(data) })
	addr := FreePort(t)
	d := startDevWith(t, bin, data, addr, "--heartbeat-seconds", "1")
	py := NewPython(t, d.url, d.keyFile)
	var ids []string
	for _, label := range []string{"au1", "au2"} {
		id := d.newInstance(t, label, "dss-14.0.0-standin")
		d.fm(t, "instance", "provision", id, "--wait")
		ids = append(ids, id)
	}
	agent := func(st map[string]any) (string, bool) {
		a, _ := st["agent"].(map[string]any)
		current, _ := a["current"].(bool)
		return str(a["sha256"]), current
	}
	pids := map[string][]int{}
	for _, id := range ids {
		d.waitStatus(t, py, id, "running the agent FM serves", func(st map[string]any) bool {
			_, current := agent(st)
			return st["state"] == "running" && current
		})
		pids[id] = cmdline.Find(agentConfig(data, id), "agent")
		if len(pids[id]) != 1 {
			t.Fatalf("%s's agents: %v", id, pids[id])
		}
	}
	if err := d.proc.Interrupt(60 * time.Second); err != nil {
		t.Fatal(err)
	}

	// Another fm binary: this FM serves it (no slim agent beside it).
	newer := filepath.Join(t.TempDir(), "fm")
	copyFile(t, bin, newer)
	served := FileSHA256(t, newer)
	d = startDevWith(t, newer, data, addr, "--heartbeat-seconds", "1", "--kits", filepath.Join(filepath.Dir(bin), "kits"))
	py = NewPython(t, d.url, d.keyFile)
	for _, id := range ids {
		d.waitStatus(t, py, id, "reported as not current", func(st map[string]any) bool {
			sha, current := agent(st)
			return st["agentResponding"] == true && sha != "" && sha != served && !current
		})
	}

	out := d.fm(t, "agent-upgrade", "start", "--batch", "1", "--wait", "--output", "json")
	var ru struct {
		State    string `json:"state"`
		SHA256   string `json:"sha256"`
		Upgraded int    `json:"upgraded"`
		Batches  int    `json:"batches"`
	}
	if err := json.Unmarshal([]byte(out), &ru); err != nil {
		t.Fatalf("fm agent-upgrade: %v\n%s", err, out)
	}
	if ru.State != "succeeded" || ru.SHA256 != served || ru.Upgraded != 2 || ru.Batches < 2 {
		t.Fatalf("the rollout: %+v\n%s", ru, out)
	}
	for _, id := range ids {
		st := d.waitStatus(t, py, id, "running the new agent", func(st map[string]any) bool {
			sha, current := agent(st)
			return sha == served && current && st["agentResponding"] == true
		})
		if got := cmdline.Find(agentConfig(data, id), "agent"); !slices.Equal(got, pids[id]) {
			t.Errorf("%s's agent is %v, not the process %v upgraded in place", id, got, pids[id])
		}
		machineBin := filepath.Join(data, "local", "machines", id, "root", "usr", "local", "bin", "fm")
		if got := FileSHA256(t, machineBin); got != served {
			t.Errorf("%s's binary has sha256 %s, want %s (status %v)", id, got, served, st)
		}
		if _, err := os.Stat(machineBin + ".previous"); err == nil {
			t.Errorf("%s kept the previous binary after the upgrade", id)
		}
	}
	// The upgraded agents work.
	d.fm(t, "instance", "restart-dss", ids[0], "--wait")
	// Asked again: every agent is current, nothing is sent.
	out = d.fm(t, "agent-upgrade", "start", "--batch", "5", "--wait", "--output", "json")
	var again struct {
		AlreadyCurrent int `json:"alreadyCurrent"`
		Upgraded       int `json:"upgraded"`
	}
	if err := json.Unmarshal([]byte(out), &again); err != nil || again.AlreadyCurrent != 2 || again.Upgraded != 0 {
		t.Fatalf("the second rollout: %+v %v\n%s", again, err, out)
	}
}

func agentConfig(data, id string) string {
	return filepath.Join(data, "local", "machines", id, "root", "etc", "fm-agent.json")
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}
