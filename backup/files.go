package backup

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"

	"github.com/fleetmanager/fm/internal/atomicfile"
)

// ErrFolderNotFresh is returned by RestoreFiles when the data folder holds
// one of the backup's files with other content: a restore goes into a fresh
// data folder only.
var ErrFolderNotFresh = errors.New("the data folder is in use")

// ErrBadFileName is returned by RestoreFiles for a backup holding a file
// whose name is not a plain path inside the data folder ("../x", "/x").
var ErrBadFileName = errors.New("a file of the backup is not named as a path inside the data folder")

// RestoreFiles writes the files of a backup (as ReadFiles returns them) into
// the data folder dir, creating it if needed, each file replaced whole
// (0600, its folders 0700). Before it writes any, it refuses a backup with a
// file named outside dir (ErrBadFileName) and a data folder that holds one
// of the files with other content (ErrFolderNotFresh). Every file is written
// through an os.Root of dir: nothing outside it is written, also through a
// link in it. Files already there with the same content are written again,
// so that a restore cut short can be run again.
func RestoreFiles(dir string, files map[string][]byte) error {
	names := make([]string, 0, len(files))
	for name := range files {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if !fs.ValidPath(name) || name == "." {
			return fmt.Errorf("%w: %q; nothing was restored", ErrBadFileName, name)
		}
		for d := path.Dir(name); d != "."; d = path.Dir(d) {
			if _, ok := files[d]; ok {
				return fmt.Errorf("%w: %q is a file and the folder of %q; nothing was restored", ErrBadFileName, d, name)
			}
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("data folder: %w", err)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return fmt.Errorf("data folder: %w", err)
	}
	defer root.Close()
	for _, name := range names {
		cur, err := root.ReadFile(filepath.FromSlash(name))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("data folder %s: %s cannot be checked: %w; nothing was restored", dir, name, err)
		}
		if !bytes.Equal(cur, files[name]) {
			return fmt.Errorf("%w: %s already holds %s, different from the backup's: restore into a fresh data folder", ErrFolderNotFresh, dir, name)
		}
	}
	for _, name := range names {
		// Each file in one step (a crash leaves the old or the new one).
		if err := atomicfile.WriteFileIn(root, filepath.FromSlash(name), files[name], 0o600); err != nil {
			return fmt.Errorf("data folder %s: write %s: %w", dir, name, err)
		}
	}
	return nil
}
