package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/fleetmanager/fm/internal/crashpoint/crashtable"
	"github.com/fleetmanager/fm/protocol"
)

// These tests kill the whole of fm dev (SIGKILL: the server, the
// provisioner and the bus at once) while operations run on several
// instances, start it again on the same folder and address, and check that
// every operation ends succeeded and each instance has one machine: one
// agent process, one DSS. Machines (agents, DSS) live on meanwhile, as
// machines do when FM goes down. FM_CRASH_FULL=1 kills at more moments.

// killDelays are the moments fm dev is killed after the operations start.
func killDelays(short, full []time.Duration) []time.Duration {
	if crashtable.Full() {
		return full
	}
	return short
}

// call is a REST call that may meet a dead server: it returns an error
// instead of failing the test (it runs in goroutines, and fm dev is killed
// under it on purpose).
func (p *Python) call(method, path string) (map[string]any, int, error) {
	req, err := http.NewRequest(method, p.Base+"/api/public/tenants/main"+path, nil)
	if err != nil {
		return nil, 0, err
	}
	req.SetBasicAuth(p.KeyID, p.Secret)
	client := http.Client{Timeout: 30 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	var out map[string]any
	_ = json.Unmarshal(data, &out)
	return out, resp.StatusCode, nil
}

// startAll sends one action per instance at once and returns the futures
// that came back (an instance whose call met the kill has none).
func startAll(py *Python, ids []string, path func(id string) (method, p string)) map[string]string {
	var mu sync.Mutex
	jobs := map[string]string{}
	var wg sync.WaitGroup
	for _, id := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			method, p := path(id)
			out, code, err := py.call(method, p)
			if err == nil && code == 200 {
				job, _ := out["jobId"].(string)
				if job == "" {
					job, _ = out["futureId"].(string) // a snapshot answers itself
				}
				mu.Lock()
				jobs[id] = job
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return jobs
}

// settle finishes what the kill interrupted, as a client does: it waits for
// every operation it got a future for, and for an instance whose call met
// the kill, for the operation the server has on record, or sends the
// action again. Every operation must succeed. It returns how many of them
// were under way when fm dev was killed at killedAt (started before, ended
// after): with none, the kill interrupted nothing. The operations of this
// round are those started since began.
func settleAfterKill(t *testing.T, py *Python, ids []string, jobs map[string]string, kind string, began, killedAt time.Time, again func(id string) (string, string)) int {
	t.Helper()
	deadline := time.Now().Add(4 * time.Minute)
	interrupted := 0
	for _, id := range ids {
		job := jobs[id]
		if job == "" {
			// Did the server start it before it died? Whatever its end,
			// that one is the client's operation.
			var list []map[string]any
			if code := py.Do(t, "GET", "/futures?targetId="+id, "", &list); code != 200 {
				t.Fatalf("futures of %s: %d", id, code)
			}
			var latest time.Time
			for _, f := range list {
				started, _ := time.Parse(time.RFC3339Nano, fmt.Sprint(f["startedAt"]))
				if f["kind"] == kind && !started.Before(began) && started.After(latest) {
					job, latest = f["jobId"].(string), started
				}
			}
		}
		for {
			if time.Now().After(deadline) {
				t.Fatalf("%s of %s not settled in 4 minutes (last operation %q)", kind, id, job)
			}
			if job == "" {
				method, p := again(id)
				out, code, err := py.call(method, p)
				if err != nil || code != 200 {
					t.Fatalf("%s of %s sent again: %d %v %v", kind, id, code, out, err)
				}
				job, _ = out["jobId"].(string)
				if job == "" {
					job, _ = out["futureId"].(string)
				}
			}
			var f map[string]any
			code := py.Do(t, "GET", "/futures/"+job+"?peek=True", "", &f)
			switch {
			case code == 200 && f["state"] == "succeeded":
				started, _ := time.Parse(time.RFC3339Nano, fmt.Sprint(f["startedAt"]))
				ended, _ := time.Parse(time.RFC3339Nano, fmt.Sprint(f["endedAt"]))
				if started.Before(killedAt) && ended.After(killedAt) {
					interrupted++
				}
			case code == 200 && f["state"] == "running":
				if time.Now().After(deadline) {
					t.Fatalf("%s of %s (%s) still running: %v", kind, id, job, f["progress"])
				}
				time.Sleep(200 * time.Millisecond)
				continue
			case code == 200 && f["state"] == "failed" && strings.Contains(fmt.Sprint(f["error"]), "Operation never started") && jobs[id] == "":
				// The server died before the operation was under way and
				// says so: nothing was done; the client starts it again. Any
				// other failure fails the test (default): fetch-kit failing
				// after the restart, as the probe found, is one.
				job = ""
				continue
			default:
				t.Fatalf("%s of %s (%s) ended %d %v: %v", kind, id, job, code, f["state"], f["error"])
			}
			break
		}
	}
	return interrupted
}

// interruptedSome fails a test whose kill, at a delay short enough that
// operations must have been under way, interrupted none of them.
func interruptedSome(t *testing.T, n int, delay, within time.Duration) {
	t.Helper()
	t.Logf("%d operations were under way at the kill", n)
	if n == 0 && delay <= within {
		t.Errorf("the kill %s after the start interrupted no operation: the test proved nothing", delay)
	}
}

// oneMachineEach checks that each instance runs exactly one agent and one
// DSS, of the version wanted.
func oneMachineEach(t *testing.T, d *devEnv, py *Python, ids []string, version string) {
	t.Helper()
	for _, id := range ids {
		st := d.waitStatus(t, py, id, "running and responding", func(st map[string]any) bool {
			return st["state"] == "running" && st["agentResponding"] == true
		})
		if dss, _ := st["dss"].(map[string]any); dss["version"] != version || dss["state"] != "running" {
			t.Errorf("%s: DSS %v", id, st["dss"])
		}
		cfg := filepath.Join(d.data, "local", "machines", id, "root", "etc", "fm-agent.json")
		if agents := cmdline.Find(cfg, "agent"); len(agents) != 1 {
			t.Errorf("%s: %d agent processes, want 1", id, len(agents))
		}
		if dss := cmdline.Find(filepath.Join(d.data, "local", "volumes", id, "dataiku", "dss_data"), "serve"); len(dss) != 1 {
			t.Errorf("%s: %d DSS processes, want 1", id, len(dss))
		}
	}
}

func kill(t *testing.T, d *devEnv) {
	t.Helper()
	if err := syscall.Kill(d.proc.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-d.proc.done
}

const crashInstances = 5

// newInstances creates crashInstances instances of image (and a network and
// a template for them) through the REST API.
func newInstances(t *testing.T, py *Python, image string) []string {
	t.Helper()
	var vn, tpl map[string]any
	if code := py.Do(t, "POST", "/virtual-networks?useDefaultValues=True", `{"label": "crash-net"}`, &vn); code != 200 {
		t.Fatalf("network: %d %v", code, vn)
	}
	if code := py.Do(t, "POST", "/instance-settings-templates", `{"label": "crash-tpl"}`, &tpl); code != 200 {
		t.Fatalf("template: %d %v", code, tpl)
	}
	var ids []string
	for i := range crashInstances {
		var in map[string]any
		body := fmt.Sprintf(`{"label": "crash%d", "instanceSettingsTemplateId": %q, "virtualNetworkId": %q, "imageId": %q}`, i, tpl["id"], vn["id"], image)
		if code := py.Do(t, "POST", "/instances", body, &in); code != 200 {
			t.Fatalf("instance: %d %v", code, in)
		}
		ids = append(ids, in["id"].(string))
	}
	return ids
}

// TestSIGKILLDuringProvisions is the probe of issue 12: fm dev killed a
// moment after several provisions began (agents fetching their kit from
// the bus as it goes), started again: every instance ends running, with one
// agent.
func TestSIGKILLDuringProvisions(t *testing.T) {
	for _, delay := range killDelays([]time.Duration{400 * time.Millisecond, 3 * time.Second},
		[]time.Duration{100 * time.Millisecond, 400 * time.Millisecond, 1500 * time.Millisecond, 3 * time.Second, 6 * time.Second}) {
		t.Run(delay.String(), func(t *testing.T) {
			data := filepath.Join(t.TempDir(), "fm")
			d := startDevFast(t, data)
			py := NewPython(t, d.url, d.keyFile)
			ids := newInstances(t, py, "dss-14.0.0-standin")
			reprovision := func(id string) (string, string) { return "GET", "/instances/" + id + "/actions/reprovision" }
			started := make(chan map[string]string, 1)
			began := time.Now()
			go func() { started <- startAll(py, ids, reprovision) }()
			time.Sleep(delay)
			killedAt := time.Now()
			kill(t, d)
			jobs := <-started
			d2 := d.restart(t)
			py2 := NewPython(t, d2.url, d2.keyFile)
			interruptedSome(t, settleAfterKill(t, py2, ids, jobs, "reprovision", began, killedAt, reprovision), delay, 1500*time.Millisecond)
			oneMachineEach(t, d2, py2, ids, "14.0.0")
		})
	}
}

// provisioned starts fm dev with n instances provisioned on image.
func provisioned(t *testing.T, image string) (*devEnv, *Python, []string) {
	t.Helper()
	data := filepath.Join(t.TempDir(), "fm")
	d := startDevFast(t, data)
	py := NewPython(t, d.url, d.keyFile)
	ids := newInstances(t, py, image)
	reprovision := func(id string) (string, string) { return "GET", "/instances/" + id + "/actions/reprovision" }
	began := time.Now()
	settleAfterKill(t, py, ids, startAll(py, ids, reprovision), "reprovision", began, time.Time{}, reprovision)
	return d, py, ids
}

// TestSIGKILLDuringUpgrades: fm dev killed while several instances upgrade
// (a snapshot first, then DSS upgraded in place): every upgrade ends
// succeeded, each instance runs the new version on one machine, and each
// kept exactly one pre-upgrade snapshot whose archive matches its digest.
func TestSIGKILLDuringUpgrades(t *testing.T) {
	for _, delay := range killDelays([]time.Duration{time.Second}, []time.Duration{300 * time.Millisecond, time.Second, 3 * time.Second}) {
		t.Run(delay.String(), func(t *testing.T) {
			d, py, ids := provisioned(t, "dss-13.4.0-standin")
			for _, id := range ids {
				var in map[string]any
				if code := py.Do(t, "GET", "/instances/"+id, "", &in); code != 200 {
					t.Fatalf("instance %s: %d", id, code)
				}
				in["imageId"] = "dss-14.0.0-standin"
				body, _ := json.Marshal(in)
				if code := py.Do(t, "PUT", "/instances/"+id, string(body), &in); code != 200 {
					t.Fatalf("update of %s: %d %v", id, code, in)
				}
			}
			reprovision := func(id string) (string, string) { return "GET", "/instances/" + id + "/actions/reprovision" }
			started := make(chan map[string]string, 1)
			began := time.Now()
			go func() { started <- startAll(py, ids, reprovision) }()
			time.Sleep(delay)
			killedAt := time.Now()
			kill(t, d)
			jobs := <-started
			d2 := d.restart(t)
			py2 := NewPython(t, d2.url, d2.keyFile)
			interruptedSome(t, settleAfterKill(t, py2, ids, jobs, "reprovision", began, killedAt, reprovision), delay, time.Second)
			oneMachineEach(t, d2, py2, ids, "14.0.0")
			snapshotsIntact(t, d2, py2, ids, 1)
		})
	}
}

// TestSIGKILLDuringSnapshots: fm dev killed while several snapshots are
// taken: each ends available, once, its archive matching its digest.
func TestSIGKILLDuringSnapshots(t *testing.T) {
	for _, delay := range killDelays([]time.Duration{500 * time.Millisecond}, []time.Duration{200 * time.Millisecond, 500 * time.Millisecond, 2 * time.Second}) {
		t.Run(delay.String(), func(t *testing.T) {
			d, py, ids := provisioned(t, "dss-14.0.0-standin")
			snapshot := func(id string) (string, string) {
				return "POST", "/instances/" + id + "/snapshots?reasonForSnapshot=crash"
			}
			started := make(chan map[string]string, 1)
			began := time.Now()
			go func() { started <- startAll(py, ids, snapshot) }()
			time.Sleep(delay)
			killedAt := time.Now()
			kill(t, d)
			jobs := <-started
			d2 := d.restart(t)
			py2 := NewPython(t, d2.url, d2.keyFile)
			interruptedSome(t, settleAfterKill(t, py2, ids, jobs, "snapshot", began, killedAt, snapshot), delay, 500*time.Millisecond)
			snapshotsIntact(t, d2, py2, ids, 1)
			oneMachineEach(t, d2, py2, ids, "14.0.0")
		})
	}
}

// snapshotsIntact checks that each instance has want available snapshots
// (those of failed or never-started operations aside), each archive in the
// store once, matching the digest recorded.
func snapshotsIntact(t *testing.T, d *devEnv, py *Python, ids []string, want int) {
	t.Helper()
	store := d.objectStore(t, protocol.ObjectStoreSnapshots)
	for _, id := range ids {
		var list []map[string]any
		if code := py.Do(t, "GET", "/instances/"+id+"/snapshots", "", &list); code != 200 {
			t.Fatalf("snapshots of %s: %d", id, code)
		}
		available := 0
		for _, sn := range list {
			if sn["state"] != "AVAILABLE" {
				continue
			}
			available++
			ref, _ := sn["storeRef"].(string)
			got, err := store.GetBytes(context.Background(), ref)
			if err != nil {
				t.Errorf("snapshot %v of %s: %v", sn["id"], id, err)
				continue
			}
			sum := sha256.Sum256(got)
			if hex.EncodeToString(sum[:]) != sn["sha256"] {
				t.Errorf("snapshot %v of %s: the archive does not match its recorded SHA-256", sn["id"], id)
			}
		}
		if available != want {
			t.Errorf("%s has %d available snapshots, want %d: %v", id, available, want, list)
		}
	}
}
