// Package atomicfile writes files so that a reader, or a crash, never sees a
// half-written one: the data goes to a temporary file beside the target,
// which is synced and renamed into place. Only this module's packages may import it (it is internal).
package atomicfile

import (
	"crypto/rand"
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
	defer os.Remove(f.Name()) // after the rename, there is nothing to remove
	if err := fill(f, data, perm); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

// WriteFileIn is WriteFile confined to root: name is relative to it, and
// nothing outside it (through a link) is created or written; the folder is
// made 0700.
func WriteFileIn(root *os.Root, name string, data []byte, perm os.FileMode) error {
	if err := root.MkdirAll(filepath.Dir(name), 0o700); err != nil {
		return err
	}
	tmp := filepath.Join(filepath.Dir(name), "."+filepath.Base(name)+"."+rand.Text()+".tmp")
	f, err := root.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return err
	}
	defer root.Remove(tmp) // after the rename, there is nothing to remove
	if err := fill(f, data, perm); err != nil {
		return err
	}
	return root.Rename(tmp, name)
}

// fill writes data to a new temporary file, with mode perm, syncs and
// closes it.
func fill(f *os.File, data []byte, perm os.FileMode) error {
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
	return f.Close()
}
