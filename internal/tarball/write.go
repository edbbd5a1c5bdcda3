package tarball

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"slices"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Write writes the folder dir (directories, regular files and symbolic
// links, with their modes and modification times) to w as a compressed tar.
func Write(w io.Writer, dir string, c Codec) error {
	tw, err := NewWriter(w, c)
	if err != nil {
		return err
	}
	if err := tw.addTree(dir, nil); err != nil {
		tw.Abort()
		return err
	}
	return tw.Close()
}

// Writer writes a compressed tar entry by entry. A later entry for a name
// replaces an earlier one when extracted, and Deleted removes one (in
// snapshots), so that an archive of a live folder can be brought to a later
// point in time by appending what changed (LiveArchive).
type Writer struct {
	zw io.WriteCloser
	tw *tar.Writer
}

// NewWriter starts an archive on w. Close finishes it; Abort, after an
// error, releases it.
func NewWriter(w io.Writer, c Codec) (*Writer, error) {
	zw, err := c.NewWriter(w)
	if err != nil {
		return nil, err
	}
	return &Writer{zw: zw, tw: tar.NewWriter(zw)}, nil
}

// added is called with every entry addTree wrote, and its information as
// written.
type added func(rel string, info fs.FileInfo)

// addTree writes every entry under dir (walk), and calls done with each.
// What vanishes while it is read is skipped.
func (w *Writer) addTree(dir string, done added) error {
	top, err := os.OpenFile(dir, os.O_RDONLY|syscall.O_DIRECTORY, 0)
	if err != nil {
		return err
	}
	defer top.Close()
	return walk(top, "", false, func(dir *os.File, name, rel string) (*fileID, error) {
		info, err := w.addAt(dir, name, rel)
		if err != nil || info == nil {
			return nil, err
		}
		if done != nil {
			done(rel, info)
		}
		if !info.IsDir() {
			return nil, nil
		}
		return idOf(info.Sys().(*syscall.Stat_t)), nil
	})
}

// fileID is a file's identity: its device and inode.
type fileID struct{ dev, ino uint64 }

func idOf(st *syscall.Stat_t) *fileID { return &fileID{st.Dev, st.Ino} }

// walk calls visit with every entry under the folder open as dir, names in
// order, a folder before what it holds; visit returns the identity of a
// folder to enter (nil: none). The walk never follows a symbolic link: it
// opens the folder from its parent's descriptor without following a link
// in its place, and enters it only if it is still that folder, so a folder
// swapped for a link (or another folder) while the walk runs is not
// entered. A folder gone or swapped meanwhile is skipped; when strict
// (nothing may change), it is ErrNotStill.
func walk(dir *os.File, rel string, strict bool, visit func(dir *os.File, name, rel string) (*fileID, error)) error {
	// changed is a folder gone or replaced since it was looked at.
	changed := func(folder string) error {
		if strict {
			return fmt.Errorf("%w: folder %q went or was replaced", ErrNotStill, folder)
		}
		return nil
	}
	names, err := dir.Readdirnames(-1)
	if vanished(err) {
		return changed(rel)
	}
	if err != nil {
		return fmt.Errorf("read folder %q: %w", rel, err)
	}
	slices.Sort(names)
	for _, name := range names {
		entry := path.Join(rel, name)
		id, err := visit(dir, name, entry)
		if err != nil {
			return err
		}
		if id == nil {
			continue
		}
		sub, err := openAt(dir, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW)
		if vanished(err) {
			if err := changed(entry); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return err
		}
		var st syscall.Stat_t
		if err = syscall.Fstat(int(sub.Fd()), &st); err == nil {
			if *idOf(&st) == *id {
				err = walk(sub, entry, strict, visit)
			} else {
				err = changed(entry)
			}
		}
		sub.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

// openAt opens name in the folder dir with flags (close-on-exec added).
func openAt(dir *os.File, name string, flags int) (*os.File, error) {
	fd, err := unix.Openat(int(dir.Fd()), name, flags|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &fs.PathError{Op: "openat", Path: name, Err: err}
	}
	return os.NewFile(uintptr(fd), name), nil
}

// vanished says whether err is an entry gone, or replaced by something an
// O_NOFOLLOW or O_DIRECTORY open refuses, since it was listed: the next
// look at the folder sees what is there now.
func vanished(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ELOOP) || errors.Is(err, syscall.ENOTDIR)
}

// addAt writes the entry name of the folder dir (a directory, regular file
// or symbolic link; anything else is skipped) as rel, and returns its
// information as written, or nil if it is gone or not data. Nothing is
// followed: the entry is opened as itself (O_PATH, O_NOFOLLOW). A regular
// file is written as long as it was when opened: what it gains meanwhile is
// left out, what it loses is written as zeros, so an archive of a live
// folder stays readable (LiveArchive writes such a file again).
func (w *Writer) addAt(dir *os.File, name, rel string) (fs.FileInfo, error) {
	self, err := openAt(dir, name, unix.O_PATH|unix.O_NOFOLLOW)
	if vanished(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer self.Close()
	info, err := self.Stat()
	if err != nil {
		return nil, err
	}
	var (
		link string
		data *os.File
	)
	switch {
	case info.Mode()&fs.ModeSymlink != 0:
		buf := make([]byte, 4096)
		n, err := unix.Readlinkat(int(self.Fd()), "", buf)
		if err != nil {
			return nil, fmt.Errorf("read link %q: %w", rel, err)
		}
		link = string(buf[:n])
	case info.Mode().IsRegular():
		// Opened again to be read; not waiting on a pipe, should the entry
		// have been replaced by one since.
		data, err = openAt(dir, name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK)
		if vanished(err) {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		defer data.Close()
		// What is read is the file opened, so its information is taken
		// from it, before it is read.
		now, err := data.Stat()
		if err != nil {
			return nil, err
		}
		if !os.SameFile(now, info) {
			return nil, nil // replaced meanwhile: the next look sees it
		}
		info = now
	case !info.IsDir():
		return nil, nil // sockets, pipes, devices: not data
	}
	hdr, err := tar.FileInfoHeader(info, link)
	if err != nil {
		return nil, err
	}
	hdr.Name = rel
	// USTAR keeps whole seconds, and the writer would round up: a restored
	// time must not be later than the file's.
	hdr.ModTime = hdr.ModTime.Truncate(time.Second)
	if info.IsDir() {
		hdr.Name += "/"
	}
	if err := w.tw.WriteHeader(hdr); err != nil {
		return nil, err
	}
	if data != nil {
		n, err := io.CopyN(w.tw, data, hdr.Size)
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
		if _, err := io.CopyN(w.tw, zeros{}, hdr.Size-n); err != nil {
			return nil, err
		}
	}
	return info, nil
}

// deletedKey marks an entry that removes its name (a PAX record of FM's
// own, VENDOR.keyword as PAX asks). Extract applies it only to snapshots
// (Options.Snapshot).
const deletedKey = "FM.deleted"

// Deleted writes an entry that removes name, and what is under it, when
// extracted.
func (w *Writer) Deleted(name string) error {
	return w.tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o600,
		PAXRecords: map[string]string{deletedKey: "1"}, Format: tar.FormatPAX})
}

// Close finishes the archive.
func (w *Writer) Close() error {
	if err := w.tw.Close(); err != nil {
		w.zw.Close()
		return err
	}
	return w.zw.Close()
}

// Abort releases an archive that will not be finished (a compressor's
// workers).
func (w *Writer) Abort() { w.zw.Close() }

// zeros reads as endless zero bytes.
type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
