package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// treeDigest lists every file under dir with the SHA-256 of its content and
// its mode, sorted: two folders with the same listing are the same bytes.
func treeDigest(t *testing.T, dir string) string {
	t.Helper()
	var lines []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		info, err := d.Info()
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			lines = append(lines, fmt.Sprintf("%s %v %s", rel, info.Mode(), hex.EncodeToString(sum[:])))
		} else {
			lines = append(lines, fmt.Sprintf("%s %v", rel, info.Mode()))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// hammer asks DSS for its health until stopped, counting the failures.
func hammer(url string) (stop func() (ok, failed int64)) {
	var okN, failN atomic.Int64
	done := make(chan struct{})
	client := &http.Client{Timeout: 5 * time.Second}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-done:
				return
			default:
			}
			resp, err := client.Get(url + "/api/health")
			if err != nil || resp.StatusCode != 200 {
				failN.Add(1)
			} else {
				okN.Add(1)
			}
			if resp != nil {
				resp.Body.Close()
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	return func() (int64, int64) { close(done); wg.Wait(); return okN.Load(), failN.Load() }
}

// objectStore opens one of fm dev's object stores.
func (d *devEnv) objectStore(t *testing.T, bucket string) jetstream.ObjectStore {
	t.Helper()
	st, err := d.jetStream(t).ObjectStore(context.Background(), bucket)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func TestSnapshotRestoreAndUpgradeOnTheLocalBackend(t *testing.T) {
	data := filepath.Join(t.TempDir(), "fm")
	d := startDevFast(t, data)
	py := NewPython(t, d.url, d.keyFile)
	id := d.newInstance(t, "snap1", "dss-13.4.0-standin")
	var f, sn map[string]any
	py.Do(t, "GET", "/instances/"+id+"/actions/reprovision", "", &f)
	if res, code := py.wait(t, f); code != 200 {
		t.Fatalf("provision: %d %v", code, res)
	}
	url := d.status(t, py, id)["publicURL"].(string)
	known := filepath.Join(data, "local", "volumes", id, "dataiku", "dss_data", "known")
	write := func(name, content string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(filepath.Join(known, name)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(known, name), []byte(content), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	write("a.txt", "alpha")
	write("sub/b.bin", strings.Repeat("\x00\x01binary", 5000))
	before := treeDigest(t, known)

	// A snapshot while DSS serves: no request fails.
	stop := hammer(url)
	time.Sleep(200 * time.Millisecond)
	if code := py.Do(t, "POST", "/instances/"+id+"/snapshots?reasonForSnapshot=e2e", "", &sn); code != 200 || sn["id"] == nil || sn["state"] != "CREATING" {
		t.Fatalf("snapshot: %d %v", code, sn)
	}
	res, code := py.wait(t, map[string]any{"jobId": sn["futureId"]})
	time.Sleep(200 * time.Millisecond)
	served, failed := stop()
	if code != 200 || failed != 0 || served == 0 {
		t.Fatalf("snapshot: %d %v; DSS answered %d requests and failed %d during it", code, res, served, failed)
	}
	snapID := sn["id"].(string)
	py.Do(t, "GET", "/instances/"+id+"/snapshots/"+snapID, "", &sn)
	if sn["state"] != "AVAILABLE" || len(fmt.Sprint(sn["sha256"])) != 64 || sn["reasonForSnapshot"] != "e2e" || sn["dssVersion"] != "13.4.0" {
		t.Fatalf("snapshot record: %v", sn)
	}

	// Change the files, restore: the folder is what it was.
	write("a.txt", "changed")
	write("c.txt", "new")
	os.Remove(filepath.Join(known, "sub", "b.bin"))
	restore := func(snapID string) (map[string]any, int) {
		t.Helper()
		if code := py.Do(t, "POST", "/instances/"+id+"/snapshots/"+snapID+"/reprovision", "", &f); code != 200 {
			t.Fatalf("restore: %d %v", code, f)
		}
		return py.wait(t, f)
	}
	if res, code := restore(snapID); code != 200 {
		t.Fatalf("restore: %d %v", code, res)
	}
	if after := treeDigest(t, known); after != before {
		t.Fatalf("restored folder differs:\n%s\nwant\n%s", after, before)
	}
	if _, err := os.Stat(filepath.Join(data, "local", "volumes", id+".previous", "dataiku", "dss_data", "known", "c.txt")); err != nil {
		t.Fatalf("the replaced volume was not kept aside: %v", err)
	}

	// A corrupted archive is refused, and the instance is left as it was.
	write("marker.txt", "after the restore")
	objects := d.objectStore(t, "fm_snapshot_archives")
	archive := fmt.Sprint(sn["storeRef"])
	if _, err := objects.PutString(context.Background(), archive, "not an archive"); err != nil {
		t.Fatal(err)
	}
	res, code = restore(snapID)
	if code < 400 || res["errorType"] != "DataLoss" || !strings.Contains(fmt.Sprint(res["detailedMessage"]), "corrupted") {
		t.Fatalf("restore of a corrupted archive: %d %v", code, res)
	}
	st := d.waitStatus(t, py, id, "running again", func(st map[string]any) bool { return st["state"] == "running" && st["operation"] == nil })
	if readFile(t, filepath.Join(known, "marker.txt")) != "after the restore" {
		t.Fatalf("a refused restore changed the volume; status %v", st)
	}
	if code, _ := dss(t, url, "/api/health", ""); code != 200 {
		t.Fatal("DSS stopped after a refused restore")
	}

	// An upgrade takes a snapshot first; restoring it with the old image
	// gives the old version and its data.
	d.fm(t, "instance", "update", id, "--image", "dss-14.0.0-standin")
	py.Do(t, "GET", "/instances/"+id+"/actions/reprovision", "", &f)
	if res, code := py.wait(t, f); code != 200 {
		t.Fatalf("upgrade: %d %v", code, res)
	}
	if code, body := dss(t, url, "/api/health", ""); code != 200 || !strings.Contains(body, `"version":"14.0.0"`) {
		t.Fatalf("after the upgrade: %d %s", code, body)
	}
	var list []map[string]any
	py.Do(t, "GET", "/instances/"+id+"/snapshots", "", &list)
	var pre map[string]any
	for _, s := range list {
		if strings.Contains(fmt.Sprint(s["reasonForSnapshot"]), "before changing DSS from 13.4.0 to 14.0.0") {
			pre = s
		}
	}
	if len(list) != 2 || pre == nil || pre["state"] != "AVAILABLE" || pre["dssVersion"] != "13.4.0" {
		t.Fatalf("snapshots after the upgrade: %v", list)
	}
	write("after-upgrade.txt", "14")
	d.fm(t, "instance", "update", id, "--image", "dss-13.4.0-standin")
	if res, code := restore(pre["id"].(string)); code != 200 {
		t.Fatalf("restore of the pre-upgrade snapshot: %d %v", code, res)
	}
	if code, body := dss(t, url, "/api/health", ""); code != 200 || !strings.Contains(body, `"version":"13.4.0"`) {
		t.Fatalf("after restoring the pre-upgrade snapshot: %d %s", code, body)
	}
	if readFile(t, filepath.Join(known, "marker.txt")) != "after the restore" {
		t.Fatal("the pre-upgrade snapshot does not hold the data of before the upgrade")
	}
	if _, err := os.Stat(filepath.Join(known, "after-upgrade.txt")); !os.IsNotExist(err) {
		t.Fatal("a file written after the upgrade survived the restore")
	}

	// Delete: the record and the archive go.
	py.Do(t, "DELETE", "/instances/"+id+"/snapshots/"+snapID, "", &f)
	if res, code := py.wait(t, f); code != 200 {
		t.Fatalf("delete: %d %v", code, res)
	}
	if code := py.Do(t, "GET", "/instances/"+id+"/snapshots/"+snapID, "", &sn); code != 404 {
		t.Fatalf("a deleted snapshot is still there: %d", code)
	}
	if _, err := objects.GetInfo(context.Background(), archive); err == nil {
		t.Fatal("the archive of a deleted snapshot is still stored")
	}

	// The same through the CLI.
	out := d.fm(t, "snapshot", "create", id, "--reason", "from the cli", "--wait")
	if !strings.Contains(out, "succeeded") {
		t.Fatalf("fm snapshot create: %s", out)
	}
	table := d.fm(t, "snapshot", "list", id)
	if !strings.Contains(table, "from the cli") || !strings.Contains(table, "AVAILABLE") || !strings.Contains(table, pre["id"].(string)) {
		t.Fatalf("fm snapshot list:\n%s", table)
	}
	d.fm(t, "snapshot", "delete", id, pre["id"].(string), "--wait")
	if _, errOut, code := Run(t, fmBin(t), d.env, "snapshot", "get", id, pre["id"].(string)); code == 0 || !strings.Contains(errOut, "NotFound") {
		t.Fatalf("fm snapshot get of a deleted snapshot: %d %s", code, errOut)
	}
}
