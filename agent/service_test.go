package agent

import (
	"bufio"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/fleetmanager/fm/protocol"
)

// fakeSystemctl puts a systemctl on PATH that logs its arguments and
// carries out start, stop and restart of a unit in dir by running the
// unit's ExecStart and ExecStop lines, as systemd would (without a user
// switch or a cgroup).
func fakeSystemctl(t *testing.T, dir string) (log string) {
	t.Helper()
	bin := t.TempDir()
	log = filepath.Join(bin, "calls.log")
	script := fmt.Sprintf(`#!/bin/sh
echo "$@" >>%[1]s
unit=%[2]s/"$2"
run() { cmd=$(sed -n "s/^$1=//p" "$unit"); [ -n "$cmd" ] && $cmd; }
case "$1" in
start) run ExecStart ;;
stop) run ExecStop ;;
restart) run ExecStop; run ExecStart ;;
esac
`, log, dir)
	if err := os.WriteFile(filepath.Join(bin, "systemctl"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))
	return log
}

// TestDSSRunsInItsOwnUnit: with systemd, DSS is started, stopped and
// restarted through a unit of its own that the agent writes, not as the
// agent's child, so that it outlives the agent's unit.
func TestDSSRunsInItsOwnUnit(t *testing.T) {
	r := newRig(t)
	r.cfg.ServiceManager = "systemd"
	unitDir := filepath.Join(r.root, "etc", "systemd", "system")
	calls := fakeSystemctl(t, unitDir)
	r.startAgent()
	r.waitReady(r.desire("14.0.0").Generation)
	unit, err := os.ReadFile(filepath.Join(unitDir, dssUnitName))
	if err != nil {
		t.Fatal(err)
	}
	dss := filepath.Join(r.dssDir(), "bin", "dss")
	for _, want := range []string{"Type=forking", "ExecStart=" + dss + " start", "ExecStop=" + dss + " stop", "RequiresMountsFor=" + r.data} {
		if !strings.Contains(string(unit), want) {
			t.Errorf("the unit has no %q:\n%s", want, unit)
		}
	}
	if res := r.result(r.command(protocol.CommandRestartDSS, nil)); res.Status != protocol.StatusOK {
		t.Fatalf("restart-dss: %+v", res)
	}
	got, _ := os.ReadFile(calls)
	for _, want := range []string{"daemon-reload", "start " + dssUnitName, "stop " + dssUnitName} {
		if !strings.Contains(string(got), want) {
			t.Errorf("systemctl was not asked to %q: %s", want, got)
		}
	}
	if r.login("admin", "admin") == 0 {
		t.Fatal("DSS does not answer")
	}
}

// TestDSSRunsAsItsOwnUser: an agent running as root runs DSS's installer and
// DSS as the DSS user, never as root, and gives it the files it needs (the
// data folder, the license, what setup actions write). Run as root (CI is).
func TestDSSRunsAsItsOwnUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the agent switches to the DSS user only as root")
	}
	dssUser, err := user.Lookup("nobody")
	if err != nil {
		t.Skipf("no unprivileged user to run DSS as: %v", err)
	}
	r := newRig(t)
	// Folders the DSS user can reach, as /data and / are.
	for _, d := range []string{r.root, r.data} {
		for p := d; p != "/" && p != os.TempDir(); p = filepath.Dir(p) {
			if err := os.Chmod(p, 0o755); err != nil {
				t.Fatal(err)
			}
		}
	}
	r.cfg.DSSUser = "nobody"
	r.startAgent()
	license := `{"content":{"licensee":"crash-proof"}}`
	r.gen++
	d := &protocol.DesiredState{Instance: r.instance, Generation: r.gen, NodeType: "design", HeartbeatSeconds: 1,
		DSS:          protocol.DSSTarget{ImageID: "dss-14.0.0-standin", Version: "14.0.0", Port: r.port, Kit: standinKit(t, "14.0.0"), License: license},
		SetupActions: []protocol.SetupAction{action(protocol.ActionAddEnvVariables, `{"variables":[{"key":"AS_USER","value":"yes"}]}`)}}
	r.put(d)
	r.waitReady(d.Generation)
	uid, _ := strconv.Atoi(dssUser.Uid)
	procs := cmdline.Find(r.dssDir(), "serve")
	if len(procs) != 1 {
		t.Fatalf("%d DSS processes", len(procs))
	}
	if got := processUID(t, procs[0]); got != uid {
		t.Fatalf("DSS runs as uid %d, want %d (nobody)", got, uid)
	}
	for _, p := range []string{r.dssDir(), filepath.Join(r.dssDir(), "dss-version.json"), filepath.Join(r.dssDir(), "config", "license.json"),
		filepath.Join(r.dssDir(), "bin", "env-site.sh")} {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if owner := int(st.Sys().(*syscall.Stat_t).Uid); owner != uid {
			t.Errorf("%s is owned by uid %d, not the DSS user", p, owner)
		}
	}
	// The credentials the agent set (through dsscli, as the DSS user) work.
	var s dssSecrets
	if _, err := loadJSON(filepath.Join(r.data, "fm-agent", "dss-credentials.json"), &s); err != nil || r.login("admin", s.InitialPassword) != 200 {
		t.Fatalf("the initial password does not open DSS: %v", err)
	}
}

// processUID is the real uid of a process.
func processUID(t *testing.T, pid int) int {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) > 1 && fields[0] == "Uid:" {
			n, _ := strconv.Atoi(fields[1])
			return n
		}
	}
	t.Fatalf("no Uid for process %d", pid)
	return -1
}
