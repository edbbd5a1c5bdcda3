package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestFMBackupAndRestore backs up a populated FM while it runs, loses its
// data folder, restores the backup into a fresh one, and finds every object
// and snapshot, with the running machine's agent back and at work.
func TestFMBackupAndRestore(t *testing.T) {
	data := filepath.Join(t.TempDir(), "fm")
	d := startDevFast(t, data)
	py := NewPython(t, d.url, d.keyFile)
	id := d.newInstance(t, "bk1", "dss-14.0.0-standin")
	var f, sn map[string]any
	py.Do(t, "GET", "/instances/"+id+"/actions/reprovision", "", &f)
	if res, code := py.wait(t, f); code != 200 {
		t.Fatalf("provision: %d %v", code, res)
	}
	py.Do(t, "POST", "/instances/"+id+"/snapshots?reasonForSnapshot=before-backup", "", &sn)
	if res, code := py.wait(t, map[string]any{"jobId": sn["futureId"]}); code != 200 {
		t.Fatalf("snapshot: %d %v", code, res)
	}
	instancesBefore := d.fm(t, "instance", "list", "--output", "json")

	file := filepath.Join(t.TempDir(), "fm-backup.tar.gz")
	out, errOut, code := Run(t, fmBin(t), nil, "admin", "backup", "--data", data, "--out", file)
	if code != 0 || !strings.Contains(out, "backed up") {
		t.Fatalf("backup: %d %s %s", code, out, errOut)
	}
	if info, err := os.Stat(file); err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("backup file: %v %v", info, err)
	}
	// Restoring into a folder in use is refused.
	if _, errOut, code := Run(t, fmBin(t), nil, "admin", "restore", file, "--data", data); code != 2 || !strings.Contains(errOut, "fresh data folder") {
		t.Fatalf("restore into a used folder: %d %s", code, errOut)
	}

	// FM stops and everything it kept is lost; the machine runs on. Its disks
	// (DATA/local) are not FM's state and stay where they are: the running
	// agent writes there by path.
	if err := d.proc.Interrupt(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	lost := t.TempDir()
	entries, err := os.ReadDir(data)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name() == "local" {
			continue
		}
		if err := os.Rename(filepath.Join(data, e.Name()), filepath.Join(lost, e.Name())); err != nil {
			t.Fatal(err)
		}
	}
	out, errOut, code = Run(t, fmBin(t), nil, "admin", "restore", file, "--data", data)
	if code != 0 || !strings.Contains(out, "restored") {
		t.Fatalf("restore: %d %s %s", code, out, errOut)
	}
	d = d.restart(t)
	if got := d.fm(t, "instance", "list", "--output", "json"); got != instancesBefore {
		t.Fatalf("instances after the restore:\n%s\nbefore:\n%s", got, instancesBefore)
	}
	var list []map[string]any
	py.Do(t, "GET", "/instances/"+id+"/snapshots", "", &list)
	if len(list) != 1 || list[0]["id"] != sn["id"] || list[0]["state"] != "AVAILABLE" {
		t.Fatalf("snapshots after the restore: %v", list)
	}
	d.waitStatus(t, py, id, "running with its agent back", func(st map[string]any) bool {
		return st["state"] == "running" && st["agentResponding"] == true
	})
	py.Do(t, "GET", "/instances/"+id+"/actions/restart-dss", "", &f)
	if res, code := py.wait(t, f); code != 200 {
		t.Fatalf("restart-dss after the restore: %d %v", code, res)
	}
	// The snapshot's archive came back too: restoring it works.
	py.Do(t, "POST", "/instances/"+id+"/snapshots/"+sn["id"].(string)+"/reprovision", "", &f)
	if res, code := py.wait(t, f); code != 200 {
		t.Fatalf("restore of the snapshot after FM's restore: %d %v", code, res)
	}
}
