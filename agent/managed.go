package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
)

// Setup actions that edit a shared file (env-site.sh, dip.properties,
// authorized_keys) write only inside blocks marked as Fleet Manager's. Every
// run of the actions starts by clearing those blocks, so that an action
// removed from the template stops having an effect, and a run twice gives
// the same file.
const (
	blockBegin = "# BEGIN fleet-manager "
	blockEnd   = "# END fleet-manager "
)

// managedFiles are the files whose FM blocks one run of the actions owns.
type managedFiles struct {
	m     *machine
	paths []string
}

func (m *machine) managedFiles() managedFiles {
	return managedFiles{m: m, paths: []string{
		filepath.Join(m.dssDir, "bin", "env-site.sh"),
		filepath.Join(m.dssDir, "config", "dip.properties"),
		m.rooted("home", m.cfg.LoginUser, ".ssh", "authorized_keys"),
	}}
}

// clear removes every FM block from the files that exist.
func (f managedFiles) clear(ctx context.Context) error {
	for _, p := range f.paths {
		b, err := f.m.readFile(ctx, p)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		cleaned := removeBlocks(string(b))
		if cleaned != string(b) {
			perm := os.FileMode(0o644)
			if st, err := os.Stat(p); err == nil {
				perm = st.Mode().Perm()
			}
			if err := f.m.writeFile(ctx, p, []byte(cleaned), perm); err != nil {
				return err
			}
		}
	}
	return nil
}

func removeBlocks(s string) string {
	var out []string
	inBlock := false
	for _, line := range strings.SplitAfter(s, "\n") {
		t := strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(t, strings.TrimSpace(blockBegin)):
			inBlock = true
		case inBlock && strings.HasPrefix(t, strings.TrimSpace(blockEnd)):
			inBlock = false
		case !inBlock:
			out = append(out, line)
		}
	}
	return strings.Join(out, "")
}

// appendBlock adds a block named id holding lines to the file at path,
// creating the file (and its folder) with perm if needed.
func (m *machine) appendBlock(ctx context.Context, path, id string, lines []string, perm os.FileMode) error {
	b, err := m.readFile(ctx, path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	s := string(b)
	if s != "" && !strings.HasSuffix(s, "\n") {
		s += "\n"
	}
	s += blockBegin + id + " (managed by Fleet Manager; edits inside are replaced)\n"
	for _, l := range lines {
		s += l + "\n"
	}
	s += blockEnd + id + "\n"
	if st, err := os.Stat(path); err == nil {
		perm = st.Mode().Perm()
	}
	return m.writeFile(ctx, path, []byte(s), perm)
}

// shellQuote quotes s for a POSIX shell.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
