package agent

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/fleetmanager/fm/internal/atomicfile"
)

// fileIO reads and writes whole files.
type fileIO interface {
	readFile(ctx context.Context, path string) ([]byte, error)
	writeFile(ctx context.Context, path string, data []byte, perm os.FileMode) error
	mkdirAll(ctx context.Context, path string, perm os.FileMode) error
}

// filesFor is how the agent reads and writes path. In the folders the DSS
// account owns (the data volume's dataiku folder, DSS's data directory in
// it, and the account's home) an agent running as root reads and writes as
// that account: whoever runs as it can put links there, and root following
// them would read or overwrite any file of the machine. Elsewhere, and when
// DSS runs as the agent's own user, the agent reads and writes itself.
func (m *machine) filesFor(ctx context.Context, path string) (fileIO, error) {
	if !within(filepath.Dir(m.dssDir), path) && !within(m.rooted("home", m.cfg.DSSUser), path) {
		return rootFiles{}, nil
	}
	acc, err := m.dssAccount(ctx)
	if err != nil || acc == nil {
		return rootFiles{}, err
	}
	return accountFiles{acc: acc, timeout: accountFileTimeout}, nil
}

// dssHomeFiles is the DSS account's home and how to read and write there:
// as the account when the agent runs as root and DSS as another account
// (on a real machine its home from the system's accounts, wherever it is),
// as the agent otherwise (an agent that is the DSS account: its own home);
// a folder standing for a machine has its home folder in it.
func (m *machine) dssHomeFiles(ctx context.Context) (fileIO, string, error) {
	acc, err := m.dssAccount(ctx)
	if err != nil {
		return nil, "", err
	}
	home := m.rooted("home", m.cfg.DSSUser)
	if acc != nil {
		if m.isRealRoot() && acc.home != "" {
			home = acc.home
		}
		return accountFiles{acc: acc, timeout: accountFileTimeout}, home, nil
	}
	if m.isRealRoot() {
		if me, err := user.Current(); err == nil && me.Username == m.cfg.DSSUser && me.HomeDir != "" {
			return rootFiles{}, me.HomeDir, nil
		}
	}
	return rootFiles{}, home, nil
}

// within reports whether path is dir or in it.
func within(dir, path string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

// rootFiles are the agent's own reads and writes.
type rootFiles struct{}

func (rootFiles) readFile(_ context.Context, path string) ([]byte, error) { return os.ReadFile(path) }

func (rootFiles) writeFile(_ context.Context, path string, data []byte, perm os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return atomicfile.WriteFile(path, data, perm)
}

func (rootFiles) mkdirAll(_ context.Context, path string, perm os.FileMode) error {
	return os.MkdirAll(path, perm)
}

// accountFiles read and write as an account, through a shell run as it:
// links resolve with its rights, not root's. Each shell call is bounded in
// time (timeout, accountFileTimeout if zero) and a read in size
// (maxDSSFileBytes): the account can put a FIFO or a link to a device
// where a file is expected, and the agent must not wait or read for ever.
type accountFiles struct {
	acc     *account
	timeout time.Duration
}

// accountFileTimeout bounds one read or write as the DSS account: the
// largest file written so is a JDBC driver (maxDriverBytes).
const accountFileTimeout = 2 * time.Minute

// exitMissing is the shell's exit status for a file that does not exist.
const exitMissing = 3

// readScript reads a regular file only: not a FIFO, whose open would wait
// for a writer, nor a device (exit status 4, with a message).
const readScript = `if [ ! -e "$1" ]; then exit 3; fi
if [ ! -f "$1" ]; then echo "not a regular file" >&2; exit 4; fi
exec cat -- "$1"`

// writeScript writes its input next to the file, then renames it into
// place, so that a reader never sees half of it. Whatever was left next to
// it (a FIFO the account put there, on which cat would wait) goes first.
const writeScript = `umask 077
d=$(dirname -- "$1") && mkdir -p -- "$d" && rm -f -- "$1.fm-new" &&
cat >"$1.fm-new" && chmod "$2" "$1.fm-new" && { sync -- "$1.fm-new" 2>/dev/null; true; } && mv -f -- "$1.fm-new" "$1"`

// mkdirScript makes a folder and any missing parent, none of them readable
// by others unless the folder asked for it.
const mkdirScript = `umask 077 && mkdir -p -m "$2" -- "$1"`

func (f accountFiles) run(ctx context.Context, stdin []byte, script string, args ...string) ([]byte, error) {
	timeout := cmp.Or(f.timeout, accountFileTimeout)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/bin/sh", append([]string{"-c", script, "sh"}, args...)...)
	cmd.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin"}
	// Its own process group, killed whole when the time is up: the shell's
	// children (cat) would otherwise live on, holding the output pipe.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	f.acc.apply(cmd)
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	out := &cappedBuffer{max: maxDSSFileBytes}
	var errb bytes.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = bytes.NewReader(stdin), out, &errb
	err := cmd.Run()
	switch {
	case out.over:
		return nil, fmt.Errorf("as %s: %s is larger than %d bytes: not read", f.acc.name, args[0], maxDSSFileBytes)
	case ctx.Err() != nil:
		return nil, fmt.Errorf("as %s: %s: not done within %s (a FIFO or a device where a file should be?): %w", f.acc.name, args[0], timeout, ctx.Err())
	case err != nil:
		var ee *exec.ExitError
		if errors.As(err, &ee) && ee.ExitCode() == exitMissing {
			return nil, os.ErrNotExist
		}
		return nil, fmt.Errorf("as %s: %v: %s", f.acc.name, err, strings.TrimSpace(errb.String()))
	}
	return out.buf.Bytes(), nil
}

// cappedBuffer keeps what is written to it up to max bytes, and fails the
// write that would pass them, which ends the copy from the reading program.
// (Only Write: a ReadFrom, as bytes.Buffer has, would be used instead.)
type cappedBuffer struct {
	buf  bytes.Buffer
	max  int
	over bool
}

func (c *cappedBuffer) Write(p []byte) (int, error) {
	if c.buf.Len()+len(p) > c.max {
		c.over = true
		return 0, errors.New("too much output")
	}
	return c.buf.Write(p)
}

func (f accountFiles) readFile(ctx context.Context, path string) ([]byte, error) {
	b, err := f.run(ctx, nil, readScript, path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, &os.PathError{Op: "open", Path: path, Err: os.ErrNotExist}
	}
	return b, err
}

func (f accountFiles) writeFile(ctx context.Context, path string, data []byte, perm os.FileMode) error {
	_, err := f.run(ctx, data, writeScript, path, fmt.Sprintf("%o", perm.Perm()))
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func (f accountFiles) mkdirAll(ctx context.Context, path string, perm os.FileMode) error {
	if _, err := f.run(ctx, nil, mkdirScript, path, fmt.Sprintf("%o", perm.Perm())); err != nil {
		return fmt.Errorf("make %s: %w", path, err)
	}
	return nil
}

// readFile, writeFile and mkdirAll read and write path the way filesFor
// says.
func (m *machine) readFile(ctx context.Context, path string) ([]byte, error) {
	io, err := m.filesFor(ctx, path)
	if err != nil {
		return nil, err
	}
	return io.readFile(ctx, path)
}

func (m *machine) writeFile(ctx context.Context, path string, data []byte, perm os.FileMode) error {
	io, err := m.filesFor(ctx, path)
	if err != nil {
		return err
	}
	return io.writeFile(ctx, path, data, perm)
}

func (m *machine) mkdirAll(ctx context.Context, path string, perm os.FileMode) error {
	io, err := m.filesFor(ctx, path)
	if err != nil {
		return err
	}
	return io.mkdirAll(ctx, path, perm)
}

// Bounds of what the agent reads of the DSS folder: a file read whole
// (dss-version.json, install.ini, the license, a file a setup action
// edits: a few KiB each) and the entries of a folder.
const (
	maxDSSFileBytes = 16 << 20
	maxDirEntries   = 10000
)

// dssFolder is the data volume's dataiku folder, which the DSS account owns
// (DSS's data directory is in it).
func (m *machine) dssFolder() string { return filepath.Dir(m.dssDir) }

// openDSSFile opens a regular file of the DSS folder for the agent itself
// to read. Whoever runs as the DSS account owns that folder and can put
// anything there: a link to a file of root's (which the agent would read,
// and ship as DSS's log or in a diagnosis bundle), a FIFO (on which an
// open waits for ever, with the machine and the install lock held), a
// link to a device (endless). So the path is resolved inside the folder
// (os.Root: no link leads out of it), opened without waiting, and kept
// only if it is a regular file. The agent reads there as root only
// through it (and readDSSDir); what it writes there, it writes as the
// account (filesFor).
func (m *machine) openDSSFile(path string) (*os.File, fs.FileInfo, error) {
	return m.openInDSSFolder(path, false)
}

func (m *machine) openInDSSFolder(path string, dir bool) (*os.File, fs.FileInfo, error) {
	top := m.dssFolder()
	rel, err := filepath.Rel(top, path)
	if err != nil || !within(top, path) {
		return nil, nil, fmt.Errorf("%s is not in the DSS folder %s", path, top)
	}
	root, err := os.OpenRoot(top)
	if err != nil {
		return nil, nil, err
	}
	defer root.Close()
	flag := os.O_RDONLY | syscall.O_NONBLOCK
	if dir {
		flag |= syscall.O_DIRECTORY
	}
	f, err := root.OpenFile(rel, flag, 0)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			err = fmt.Errorf("%s: not read (%w)", path, err)
		}
		return nil, nil, err
	}
	st, err := f.Stat()
	if err == nil && !st.Mode().IsRegular() && !(dir && st.IsDir()) {
		err = fmt.Errorf("%s is not a regular file (%s): not read", path, st.Mode().Type())
	}
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return f, st, nil
}

// openDSSLog opens DSS's log for the log shipper (openDSSFile).
func (m *machine) openDSSLog(path string) (*os.File, error) {
	f, _, err := m.openDSSFile(path)
	return f, err
}

// readDSSFile reads a file of the DSS folder (openDSSFile) whole, failing
// if it is larger than limit.
func (m *machine) readDSSFile(path string, limit int64) ([]byte, error) {
	f, _, err := m.openDSSFile(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%s is larger than %d bytes: not read", path, limit)
	}
	return b, nil
}

// readDSSDir lists at most n entries of a folder of the DSS folder, opened
// as openDSSFile opens a file, sorted by name.
func (m *machine) readDSSDir(path string, n int) ([]fs.DirEntry, error) {
	f, _, err := m.openInDSSFolder(path, true)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	entries, err := f.ReadDir(n)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	slices.SortFunc(entries, func(a, b fs.DirEntry) int { return strings.Compare(a.Name(), b.Name()) })
	return entries, nil
}
