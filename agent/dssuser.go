package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
)

// account is the user DSS's programs (its installer, bin/dss, dsscli,
// dssadmin) run as.
type account struct {
	name     string
	uid, gid uint32
	home     string
}

// dssAccount is the account DSS runs as when it is not the agent's own: the
// agent runs as root and the DSS user (dssUser, "dataiku" by default) is
// another. DSS never runs as root on a real machine; a folder standing for
// one (the local backend) runs it as the user the local backend names, its
// own. A missing DSS user is made on a real machine (useradd), as DSS's
// installation asks for one; elsewhere it is an error.
func (m *machine) dssAccount(ctx context.Context) (*account, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	name := m.cfg.DSSUser
	if me, err := user.Current(); err == nil && me.Username == name && !m.isRealRoot() {
		return nil, nil
	}
	if name == "root" || name == "" {
		return nil, fmt.Errorf("DSS must not run as root: set dssUser to its own account (e.g. dataiku)")
	}
	u, err := user.Lookup(name)
	var unknown user.UnknownUserError
	if errors.As(err, &unknown) && m.isRealRoot() {
		if out, err := exec.CommandContext(ctx, "useradd", "--system", "--create-home", "--shell", "/bin/bash", name).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("create the DSS user %s: %v: %s", name, err, out)
		}
		m.log.Info().Str("user", name).Msg("DSS user created")
		u, err = user.Lookup(name)
	}
	if err != nil {
		return nil, fmt.Errorf("the DSS user %s: %w", name, err)
	}
	uid, _ := strconv.ParseUint(u.Uid, 10, 32)
	gid, _ := strconv.ParseUint(u.Gid, 10, 32)
	if uid == 0 {
		return nil, fmt.Errorf("DSS must not run as root, and %s is uid 0", name)
	}
	return &account{name: name, uid: uint32(uid), gid: uint32(gid), home: u.HomeDir}, nil
}

// apply makes cmd run as the account (nil: as the agent).
func (a *account) apply(cmd *exec.Cmd) {
	if a == nil {
		return
	}
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Credential = &syscall.Credential{Uid: a.uid, Gid: a.gid}
	cmd.Env = append(cmd.Env, "HOME="+a.home, "USER="+a.name, "LOGNAME="+a.name)
}

// giveToDSS gives paths the agent wrote to the DSS account, so that DSS,
// which does not run as root, reads (and may rewrite) them.
func (m *machine) giveToDSS(ctx context.Context, paths ...string) error {
	acc, err := m.dssAccount(ctx)
	if err != nil || acc == nil {
		return err
	}
	for _, p := range paths {
		if err := os.Lchown(p, int(acc.uid), int(acc.gid)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("give %s to %s: %w", p, acc.name, err)
		}
	}
	return nil
}

// handDSSFiles gives the DSS account the files of the data directory the
// agent writes (setup actions, the license, the base port), whoever wrote
// them last.
func (m *machine) handDSSFiles(ctx context.Context) error {
	paths := []string{
		filepath.Join(m.dssDir, "bin", "env-site.sh"), filepath.Join(m.dssDir, "config", "dip.properties"),
		filepath.Join(m.dssDir, "install.ini"), m.licensePath(), filepath.Join(m.dssDir, "lib", "jdbc"),
	}
	drivers, _ := filepath.Glob(filepath.Join(m.dssDir, "lib", "jdbc", "*"))
	return m.giveToDSS(ctx, append(paths, drivers...)...)
}
