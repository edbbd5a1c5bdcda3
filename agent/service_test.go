package agent

import (
	"bufio"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

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
	r.reachableBy("nobody")
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

	// Whoever runs as the DSS user can put links in its folders; the agent,
	// root, must not follow them to read or write a file of root's.
	secret := filepath.Join(t.TempDir(), "root-only")
	if err := os.WriteFile(secret, []byte("SECRET\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, rel := range []string{"bin/env-site.sh", "config/license.json"} {
		p := filepath.Join(r.dssDir(), rel)
		if err := os.Remove(p); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(secret, p); err != nil {
			t.Fatal(err)
		}
		if err := os.Lchown(p, uid, -1); err != nil {
			t.Fatal(err)
		}
	}
	r.gen++
	d2 := *d
	d2.Generation = r.gen
	d2.DSS.License = `{"content":{"licensee":"link-proof"}}`
	d2.SetupActions = []protocol.SetupAction{action(protocol.ActionAddEnvVariables, `{"variables":[{"key":"AS_USER","value":"again"}]}`)}
	r.put(&d2)
	r.waitStatus("generation 2 carried out or refused", 90*time.Second, func(s protocol.AgentStatus) bool {
		return (s.Phase == protocol.PhaseReady && s.Generation == d2.Generation) || (s.Phase == protocol.PhaseFailed && s.Target == d2.Generation)
	})
	if b, err := os.ReadFile(secret); err != nil || string(b) != "SECRET\n" {
		t.Fatalf("root's file behind a link of the DSS user became %q (%v)", b, err)
	}
	for _, rel := range []string{"bin/env-site.sh", "config/license.json"} {
		p := filepath.Join(r.dssDir(), rel)
		if st, err := os.Lstat(p); err != nil || st.Mode()&os.ModeSymlink != 0 {
			continue // the link is left as it was, unfollowed
		}
		if b, err := os.ReadFile(p); err == nil && strings.Contains(string(b), "SECRET") {
			t.Fatalf("%s took root's file into the DSS user's reach: %q", rel, b)
		}
	}
}

// reachableBy lets an unprivileged DSS user reach the rig's folders, as it
// reaches /data and / of a machine, and makes it the rig's DSS user.
func (r *rig) reachableBy(name string) {
	r.t.Helper()
	for _, d := range []string{r.root, r.data} {
		for p := d; p != "/" && p != os.TempDir(); p = filepath.Dir(p) {
			if err := os.Chmod(p, 0o755); err != nil {
				r.t.Fatal(err)
			}
		}
	}
	r.cfg.DSSUser = name
}

func TestDSSInstalledAsRootIsHandedToItsUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: only root installs DSS as root")
	}
	nobody, err := user.Lookup("nobody")
	if err != nil {
		t.Skipf("no unprivileged user to run DSS as: %v", err)
	}
	uid, _ := strconv.Atoi(nobody.Uid)
	r := newRig(t)
	// An agent whose DSS user is its own (root, in a folder standing for a
	// machine) installs DSS as root, as agents before the DSS user did.
	r.cfg.DSSUser = "root"
	r.startAgent()
	d := r.desire("14.0.0")
	r.waitReady(d.Generation)
	r.stopAgent()
	owner := func(p string) int {
		st, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		return int(st.Sys().(*syscall.Stat_t).Uid)
	}
	if owner(r.dssDir()) != 0 {
		t.Fatal("the first agent did not install DSS as root")
	}
	// A link root left in the tree stays a link: the hand-over does not
	// follow it.
	outside := filepath.Join(t.TempDir(), "outside")
	os.WriteFile(outside, nil, 0o600)
	os.Symlink(outside, filepath.Join(r.dssDir(), "link"))

	r.reachableBy("nobody")
	r.startAgent()
	d2 := r.desire("14.0.0", action(protocol.ActionAddEnvVariables, `{"variables":[{"key":"HANDED","value":"over"}]}`))
	r.waitReady(d2.Generation)
	err = filepath.WalkDir(filepath.Dir(r.dssDir()), func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if got := owner(p); got != uid {
			t.Errorf("%s is owned by uid %d, not the DSS user", p, got)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if owner(outside) != 0 {
		t.Error("the hand-over followed a link out of the DSS folder")
	}
	procs := cmdline.Find(r.dssDir(), "serve")
	if len(procs) != 1 {
		t.Fatalf("%d DSS processes", len(procs))
	}
	if got := processUID(t, procs[0]); got != uid {
		t.Fatalf("DSS runs as uid %d after the hand-over, want %d (nobody)", got, uid)
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
