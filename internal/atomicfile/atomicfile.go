// Package atomicfile writes files so that a reader, or a crash, never sees a
// half-written one: the data goes to a temporary file beside the target,
// which is synced and renamed into place. Only this module's packages may import it (it is internal).
package atomicfile

import (
	"os"
	"path/filepath"
)

// WriteFile writes data to path with mode perm, creating the folder (0755)
// if needed, and replacing any file there in one step.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}
