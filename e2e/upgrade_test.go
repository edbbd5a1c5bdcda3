package e2e

import (
	"encoding/json"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/fleetmanager/fm/protocol"
)

// previousRelease is the FM the upgrade test starts from: the last commit
// CI passed before FM stamped its bus layout (bus.LayoutVersion). Once FM
// has releases, it is the previous release's tag.
const previousRelease = "ba26433bae1fedcaef14e96856a9e7f328da04d3"

// buildPrevious builds fm (and its agent and kits) of previousRelease from
// this checkout's history, with the race detector as the tests' own build.
func buildPrevious(t *testing.T) string {
	t.Helper()
	root := ModuleRoot()
	if err := exec.Command("git", "-C", root, "cat-file", "-e", previousRelease+"^{commit}").Run(); err != nil {
		if os.Getenv("FM_REQUIRE_UPGRADE") != "" {
			t.Fatalf("this checkout lacks commit %s, which the upgrade test builds (a shallow clone?)", previousRelease)
		}
		t.Skipf("this checkout lacks commit %s, which the upgrade test builds (a shallow clone?)", previousRelease)
	}
	src := t.TempDir()
	archive := exec.Command("sh", "-c", `git -C "$1" archive "$2" | tar -x -C "$3"`, "sh", root, previousRelease, src)
	if out, err := archive.CombinedOutput(); err != nil {
		t.Fatalf("git archive %s: %v\n%s", previousRelease, err, out)
	}
	bin, err := BuildFrom(src, t.TempDir(), true)
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// TestUpgradeFromThePreviousRelease: the previous release's FM runs a fleet
// (a running instance, its snapshot, a key, the operations that made them),
// stops, and this FM starts on its data folder. Every object and operation
// is there as it was; the previous release's agent, still running, reports
// to this FM and carries out an operation; the bus is stamped with this
// FM's layout. Then a bus a newer FM laid out is refused: this FM does not
// start, says why, and leaves every stream's configuration as it was.
func TestUpgradeFromThePreviousRelease(t *testing.T) {
	oldBin := buildPrevious(t)
	data := filepath.Join(t.TempDir(), "fm")
	t.Cleanup(func() { StopUnder(data) })
	addr := FreePort(t)

	old := startDevWith(t, oldBin, data, addr, "--heartbeat-seconds", "1")
	id := old.newInstance(t, "up1", "dss-13.4.0-standin")
	old.fm(t, "instance", "provision", id, "--wait")
	old.fm(t, "snapshot", "create", id, "--wait")
	old.fm(t, "apikey", "create", "--label", "robot", "--role", "viewer")
	py := NewPython(t, old.url, old.keyFile)
	before := fleetRecords(t, py, id)
	for what, records := range before {
		if records == "" || (what == "instances" && !strings.Contains(records, id)) {
			t.Fatalf("the previous release shows no %s:\n%v", what, before)
		}
	}
	agentConf := filepath.Join(data, "local", "machines", id, "root", "etc", "fm-agent.json")
	agents := cmdline.Find(agentConf, "agent")
	if len(agents) != 1 {
		t.Fatalf("the previous release's agents: %v", agents)
	}
	if err := old.proc.Interrupt(60 * time.Second); err != nil {
		t.Fatalf("the previous release's fm dev: %v", err)
	}

	d := startDevWith(t, fmBin(t), data, addr, "--heartbeat-seconds", "1")
	py = NewPython(t, d.url, d.keyFile)
	after := fleetRecords(t, py, id)
	for what, was := range before {
		if after[what] != was {
			t.Errorf("%s after the upgrade:\n%s\nbefore:\n%s", what, after[what], was)
		}
	}
	if got := cmdline.Find(agentConf, "agent"); !slices.Equal(got, agents) {
		t.Fatalf("the previous release's agent %v is not the one running: %v", agents, got)
	}
	since := time.Now()
	d.waitStatus(t, py, id, "reported by the previous release's agent", func(st map[string]any) bool {
		seen, _ := time.Parse(time.RFC3339Nano, str(st["lastSeen"]))
		return st["state"] == "running" && st["agentResponding"] == true && seen.After(since)
	})
	d.fm(t, "instance", "restart-dss", id, "--wait")
	d.waitStatus(t, py, id, "running DSS again", func(st map[string]any) bool {
		dss, _ := st["dss"].(map[string]any)
		return st["state"] == "running" && dss != nil && dss["state"] == string(protocol.DSSRunning)
	})

	js := d.jetStream(t)
	for _, name := range []string{protocol.StreamAudit, "KV_" + protocol.BucketInstances, "OBJ_" + protocol.ObjectStoreKits} {
		st, err := js.Stream(t.Context(), name)
		if err != nil {
			t.Fatal(err)
		}
		if got := st.CachedInfo().Config.Metadata[bus.LayoutKey]; got != strconv.Itoa(bus.LayoutVersion) {
			t.Errorf("stream %s: layout stamp %q after the upgrade", name, got)
		}
	}

	// A newer FM's layout (as if this one were the downgrade): refused,
	// with exit 2 (the units do not restart it), and the bus unchanged.
	st, err := js.Stream(t.Context(), protocol.StreamAudit)
	if err != nil {
		t.Fatal(err)
	}
	cfg := st.CachedInfo().Config
	cfg.Metadata[bus.LayoutKey] = strconv.Itoa(bus.LayoutVersion + 1)
	if _, err := js.UpdateStream(t.Context(), cfg); err != nil {
		t.Fatal(err)
	}
	if err := d.proc.Interrupt(60 * time.Second); err != nil {
		t.Fatal(err)
	}
	stored := streamConfigs(t, data)
	_, errOut, code := Run(t, fmBin(t), nil, "dev", "--data", data, "--listen", addr)
	if code != 2 || !strings.Contains(errOut, "downgrades are refused") {
		t.Fatalf("fm dev on a newer layout: exit %d\n%s", code, errOut)
	}
	if got := streamConfigs(t, data); !maps.Equal(got, stored) {
		t.Error("the refused start changed a stream's configuration on disk")
	}
}

// streamConfigs is every stream's configuration as JetStream stored it in
// the data folder (each stream's meta.inf, which a declaration rewrites).
func streamConfigs(t *testing.T, data string) map[string]string {
	t.Helper()
	configs := map[string]string{}
	err := filepath.WalkDir(data, func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if e.Name() == "meta.inf" && filepath.Base(filepath.Dir(filepath.Dir(path))) == "streams" {
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			configs[path] = string(b)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if want := len(bus.DefaultTopology().StreamNames()); len(configs) < want {
		t.Fatalf("%d streams' configurations in %s: FM declares %d", len(configs), data, want)
	}
	return configs
}

// fleetRecords is what the REST API shows of the fleet, by kind, in a
// form two versions can be compared in: each object's lasting fields.
func fleetRecords(t *testing.T, py *Python, id string) map[string]string {
	t.Helper()
	get := func(path string, fields ...string) string {
		t.Helper()
		var list []map[string]any
		if code := py.Do(t, "GET", path, "", &list); code != 200 {
			t.Fatalf("GET %s: %d", path, code)
		}
		var rows []string
		for _, o := range list {
			var row []string
			for _, f := range fields {
				b, _ := json.Marshal(o[f])
				row = append(row, f+"="+string(b))
			}
			rows = append(rows, strings.Join(row, " "))
		}
		slices.Sort(rows)
		return strings.Join(rows, "\n")
	}
	return map[string]string{
		"instances":  get("/instances", "id", "label", "imageId", "virtualNetworkId", "instanceSettingsTemplateId", "dssNodeType"),
		"networks":   get("/virtual-networks", "id", "label"),
		"templates":  get("/instance-settings-templates", "id", "label"),
		"snapshots":  get("/instances/"+id+"/snapshots", "id", "state", "dssVersion", "imageId", "sizeBytes"),
		"operations": get("/futures?targetId="+id, "jobId", "kind", "state", "hasResult"),
		"keys":       get("/api-keys", "id", "label", "role", "createdAt"),
	}
}

func str(v any) string { s, _ := v.(string); return s }
