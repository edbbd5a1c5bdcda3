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
// installation asks for one; elsewhere it is an error. A data volume kept
// from an earlier machine has its dataiku folder owned by that machine's
// DSS user, whose uid useradd may not pick again on a new image: the user
// is made with that uid when no account has it (newUserArgs).
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
		args, aerr := m.newUserArgs(name)
		if aerr != nil {
			return nil, fmt.Errorf("create the DSS user %s: %w", name, aerr)
		}
		if out, err := exec.CommandContext(ctx, "useradd", args...).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("create the DSS user %s: %v: %s", name, err, out)
		}
		m.log.Info().Str("user", name).Strs("useradd", args).Msg("DSS user created")
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
	acc := &account{name: name, uid: uint32(uid), gid: uint32(gid), home: u.HomeDir}
	if err := m.handOver(acc); err != nil {
		return nil, err
	}
	return acc, nil
}

// newUserArgs are useradd's arguments to make the DSS user: with the uid
// that owns the data volume's dataiku folder, when one that is not root's
// does and no account has it (the volume's DSS user, from the machine
// before). A folder of root's is handed over once the user exists; one
// whose uid another account has is refused then (handOver), with what to
// do.
func (m *machine) newUserArgs(name string) ([]string, error) {
	args := []string{"--system", "--create-home", "--shell", "/bin/bash"}
	st, err := os.Lstat(m.dssFolder())
	if errors.Is(err, os.ErrNotExist) {
		return append(args, name), nil
	}
	if err != nil {
		return nil, err
	}
	uid := st.Sys().(*syscall.Stat_t).Uid
	if uid == 0 || !st.IsDir() {
		return append(args, name), nil
	}
	_, err = user.LookupId(strconv.FormatUint(uint64(uid), 10))
	var unknown user.UnknownUserIdError
	if !errors.As(err, &unknown) {
		return append(args, name), nil
	}
	return append(args, "--uid", strconv.FormatUint(uint64(uid), 10), name), nil
}

// handOver gives the DSS account the data volume's dataiku folder when root
// still owns it: DSS installed by an agent that ran it as root. It runs
// before anything runs as the account. Children go before their folder, so
// that every folder above the one being changed is still root's and nobody
// can swap a link in under the walk; an interrupted hand-over finds the top
// folder still root's and carries on, skipping the folders already given.
// What belongs to neither root nor the account is left alone.
func (m *machine) handOver(acc *account) error {
	top := filepath.Dir(m.dssDir)
	st, err := os.Lstat(top)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	owner := st.Sys().(*syscall.Stat_t).Uid
	switch {
	case owner == acc.uid:
		return nil
	case owner != 0 || !st.IsDir():
		return fmt.Errorf("%s belongs to uid %d, not to root or the DSS user %s: give it to %s (chown -R) and start the agent again", top, owner, acc.name, acc.name)
	}
	n, err := chownTree(top, acc)
	if err != nil {
		return fmt.Errorf("give %s to the DSS user %s: %w", top, acc.name, err)
	}
	m.log.Warn().Str("folder", top).Str("user", acc.name).Int("entries", n).Msg("DSS folders root owned were given to the DSS user")
	return nil
}

// chownTree gives the account dir and what root owns in it, children first.
func chownTree(dir string, acc *account) (int, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, e := range entries {
		p := filepath.Join(dir, e.Name())
		st, err := os.Lstat(p)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return n, err
		}
		if st.Sys().(*syscall.Stat_t).Uid != 0 {
			continue
		}
		if st.IsDir() {
			k, err := chownTree(p, acc)
			n += k
			if err != nil {
				return n, err
			}
			continue
		}
		if err := os.Lchown(p, int(acc.uid), int(acc.gid)); err != nil {
			return n, err
		}
		n++
	}
	if err := os.Lchown(dir, int(acc.uid), int(acc.gid)); err != nil {
		return n, err
	}
	return n + 1, nil
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

// giveToDSS gives the DSS account a folder the agent made in a folder only
// root may write (the data volume's dataiku folder, at install): nobody
// else can have put a link there.
func (m *machine) giveToDSS(ctx context.Context, path string) error {
	acc, err := m.dssAccount(ctx)
	if err != nil || acc == nil {
		return err
	}
	if err := os.Lchown(path, int(acc.uid), int(acc.gid)); err != nil {
		return fmt.Errorf("give %s to %s: %w", path, acc.name, err)
	}
	return nil
}

// giveFileToDSS gives the DSS account a file the agent made and holds open
// (the license it hands the installer).
func (m *machine) giveFileToDSS(ctx context.Context, f *os.File) error {
	acc, err := m.dssAccount(ctx)
	if err != nil || acc == nil {
		return err
	}
	return f.Chown(int(acc.uid), int(acc.gid))
}
