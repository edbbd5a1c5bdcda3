package agent

import (
	"bufio"
	"context"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/fleetmanager/fm/protocol"
	"github.com/rs/zerolog"
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

// TestTheUnitIsReadOncePerAgentStart: an agent killed between writing DSS's
// unit and systemctl daemon-reload leaves the file as wanted and systemd
// unaware of it; the next agent has systemd read it once, then only when it
// changes.
func TestTheUnitIsReadOncePerAgentStart(t *testing.T) {
	cfg := Config{Instance: "in-unit", RootDir: t.TempDir(), DataDir: t.TempDir(), ServiceManager: "systemd", DSSUser: currentUser(t)}
	cfg.setDefaults()
	m := newMachine(cfg, zerolog.Nop())
	calls := fakeSystemctl(t, filepath.Dir(m.unitPath()))
	// As the killed agent left it.
	if err := os.MkdirAll(filepath.Dir(m.unitPath()), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(m.unitPath(), []byte(m.dssUnit(nil)), 0o644); err != nil {
		t.Fatal(err)
	}
	reloads := func() int {
		b, _ := os.ReadFile(calls)
		return strings.Count(string(b), "daemon-reload")
	}
	for i, want := range []int{1, 1} {
		if out, err := m.ensureUnit(context.Background()); err != nil {
			t.Fatalf("ensureUnit: %v: %s", err, out)
		}
		if got := reloads(); got != want {
			t.Fatalf("after ensureUnit %d: %d daemon-reloads, want %d", i+1, got, want)
		}
	}
	// The next agent.
	if _, err := newMachine(cfg, zerolog.Nop()).ensureUnit(context.Background()); err != nil || reloads() != 2 {
		t.Fatalf("a new agent: %d daemon-reloads (%v), want 2", reloads(), err)
	}
}

// TestANewDSSUserTakesTheUIDOfTheKeptVolume: on a new machine (a new image,
// where useradd may pick another uid) the DSS user is made with the uid that
// owns the kept volume's dataiku folder when no account has it, so that the
// volume is its own; a folder of root's is handed over to a user made with
// any uid; one whose uid another account has is refused with what to do.
// It makes real users (useradd, removed with userdel): root only.
func TestANewDSSUserTakesTheUIDOfTheKeptVolume(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: it makes users")
	}
	for _, tool := range []string{"useradd", "userdel"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("no %s", tool)
		}
	}
	nobody, err := user.Lookup("nobody")
	if err != nil {
		t.Skipf("no account to own a folder: %v", err)
	}
	nobodyUID, _ := strconv.Atoi(nobody.Uid)
	freeUID := 0
	for uid := 64000; uid > 60000 && freeUID == 0; uid-- {
		if _, err := user.LookupId(strconv.Itoa(uid)); err != nil {
			freeUID = uid
		}
	}
	if freeUID == 0 {
		t.Skip("no free uid")
	}
	tests := []struct {
		name    string
		owner   int
		wantUID int    // 0: any but root
		wantErr string // "" for none
	}{
		{"the folder's uid has no account", freeUID, freeUID, ""},
		{"the folder is root's", 0, 0, ""},
		{"the folder's uid is another account's", nobodyUID, 0, "belongs to uid " + nobody.Uid},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			name := fmt.Sprintf("fmtest%d%s", i, strings.ToLower(protocol.NewID("u")[2:8]))
			t.Cleanup(func() { _ = exec.Command("userdel", "--remove", name).Run() })
			cfg := Config{Instance: "in-user", RootDir: "/", DataDir: t.TempDir(), DSSUser: name}
			m := newMachine(cfg, zerolog.Nop())
			if err := os.MkdirAll(m.dssDir, 0o755); err != nil {
				t.Fatal(err)
			}
			for _, p := range []string{m.dssDir, m.dssFolder()} {
				if err := os.Lchown(p, tc.owner, tc.owner); err != nil {
					t.Fatal(err)
				}
			}
			acc, err := m.dssAccount(context.Background())
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one saying %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if acc.uid == 0 || tc.wantUID != 0 && int(acc.uid) != tc.wantUID {
				t.Fatalf("the DSS user was made with uid %d, want %d", acc.uid, tc.wantUID)
			}
			st, err := os.Lstat(m.dssDir)
			if err != nil {
				t.Fatal(err)
			}
			if owner := st.Sys().(*syscall.Stat_t).Uid; owner != acc.uid {
				t.Fatalf("the data directory belongs to uid %d, not the DSS user's %d", owner, acc.uid)
			}
		})
	}
}
