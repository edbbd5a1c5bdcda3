package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

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
	return accountFiles{acc: acc}, nil
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
// links resolve with its rights, not root's.
type accountFiles struct{ acc *account }

// exitMissing is the shell's exit status for a file that does not exist.
const exitMissing = 3

const readScript = `if [ -e "$1" ]; then exec cat -- "$1"; else exit 3; fi`

// writeScript writes its input next to the file, then renames it into
// place, so that a reader never sees half of it.
const writeScript = `umask 077
d=$(dirname -- "$1") && mkdir -p -- "$d" &&
cat >"$1.fm-new" && chmod "$2" "$1.fm-new" && { sync -- "$1.fm-new" 2>/dev/null; true; } && mv -f -- "$1.fm-new" "$1"`

// mkdirScript makes a folder and any missing parent, none of them readable
// by others unless the folder asked for it.
const mkdirScript = `umask 077 && mkdir -p -m "$2" -- "$1"`

func (f accountFiles) run(ctx context.Context, stdin []byte, script string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "/bin/sh", append([]string{"-c", script, "sh"}, args...)...)
	cmd.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin"}
	f.acc.apply(cmd)
	var out, errb bytes.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = bytes.NewReader(stdin), &out, &errb
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) && ee.ExitCode() == exitMissing {
			return nil, os.ErrNotExist
		}
		return nil, fmt.Errorf("as %s: %v: %s", f.acc.name, err, strings.TrimSpace(errb.String()))
	}
	return out.Bytes(), nil
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
