package tarball

import (
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

// ErrNotStill is CatchUp finding the folder changing while nothing was to
// write to it (a process not paused): the archive is not of one point in
// time, and the caller tries again.
var ErrNotStill = errors.New("the folder changed while it was to hold still")

// RecentWindow is how far before the first pass a change may have been made
// without any timestamp saying so yet. A write through a shared mapping to
// a page already dirty changes no timestamp until the page is written back
// (by default within 30 s, looked for every 5 s) and written to again; and
// a timestamp may hold still for a clock tick. So a file whose change or
// modification time lies after the first pass's start less this window is
// read again by the catch-up pass, changed or not.
const RecentWindow = time.Minute

// LiveArchive archives a folder that changes while it is read, as it is at
// one point in time: FirstPass writes every entry as it is when read; then,
// with whatever writes to the folder stopped, CatchUp writes again what
// changed since (a later entry replaces an earlier one when extracted) and
// writes what went as deleted. Extracted as a snapshot (Options.Snapshot),
// the archive is the folder as it was during CatchUp.
type LiveArchive struct {
	w      *Writer
	dir    string
	stamps map[string]entryStamp // what the archive holds, by name
	recent int64                 // UnixNano: changes after it are read again
}

// NewLiveArchive starts a live archive of dir on w.
func NewLiveArchive(w io.Writer, dir string, c Codec) (*LiveArchive, error) {
	tw, err := NewWriter(w, c)
	if err != nil {
		return nil, err
	}
	return &LiveArchive{w: tw, dir: dir, stamps: map[string]entryStamp{}}, nil
}

// entryStamp tells whether an entry changed since it was written: a write
// moves a file's change time (which no one can set back), a replaced entry
// is another inode.
type entryStamp struct {
	typ, perm    fs.FileMode
	size         int64
	mtime, ctime int64
	ino          uint64
}

// stampOf is the stamp of what was written (its information from fstat).
func stampOf(info fs.FileInfo) entryStamp {
	st := info.Sys().(*syscall.Stat_t)
	return stamp(st.Mode, st.Size, st.Mtim.Nano(), st.Ctim.Nano(), st.Ino)
}

// stamp is an entry's stamp from its stat fields (the catch-up pass has
// them from fstatat, one system call per entry); typ is fs.ModeDir,
// fs.ModeSymlink, 0 for a regular file, or fs.ModeIrregular for what is
// not data.
func stamp(mode uint32, size, mtime, ctime int64, ino uint64) entryStamp {
	var typ fs.FileMode
	switch mode & syscall.S_IFMT {
	case syscall.S_IFDIR:
		typ = fs.ModeDir
	case syscall.S_IFLNK:
		typ = fs.ModeSymlink
	case syscall.S_IFREG:
	default:
		typ = fs.ModeIrregular
	}
	return entryStamp{typ: typ, perm: fs.FileMode(mode & 0o777), size: size, mtime: mtime, ctime: ctime, ino: ino}
}

// FirstPass writes every entry of the folder as it is when read.
func (la *LiveArchive) FirstPass() error {
	la.recent = time.Now().Add(-RecentWindow).UnixNano()
	return la.w.addTree(la.dir, func(rel string, info fs.FileInfo) { la.stamps[rel] = stampOf(info) })
}

// CatchUp brings the archive to the folder as it is now, which nothing may
// write to while it runs: what is new, changed, or changed recently enough
// that its timestamps may not show it (RecentWindow) is written again, then
// what the first pass wrote and is gone (or is no longer data: a pipe, a
// socket) is written as deleted, a folder once with what it held. Entries
// are looked at without following links, as FirstPass does, and a deletion
// never goes through a link when extracted, so the order of the two does
// not matter.
func (la *LiveArchive) CatchUp() error {
	top, err := os.OpenFile(la.dir, os.O_RDONLY|syscall.O_DIRECTORY, 0)
	if err != nil {
		return err
	}
	defer top.Close()
	now := map[string]bool{}
	err = walk(top, "", true, func(dir *os.File, name, rel string) (*fileID, error) {
		var sys unix.Stat_t
		if err := unix.Fstatat(int(dir.Fd()), name, &sys, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			if vanished(err) {
				return nil, fmt.Errorf("%w: %q went", ErrNotStill, rel)
			}
			return nil, &fs.PathError{Op: "fstatat", Path: rel, Err: err}
		}
		st := stamp(sys.Mode, sys.Size, sys.Mtim.Nano(), sys.Ctim.Nano(), sys.Ino)
		if st.typ == fs.ModeIrregular {
			return nil, nil // not data: what the archive holds of that name goes
		}
		now[rel] = true
		old, ok := la.stamps[rel]
		if !ok || old != st || st.typ == 0 && max(st.ctime, st.mtime) >= la.recent {
			written, err := la.w.addAt(dir, name, rel)
			if err != nil {
				return nil, err
			}
			if written == nil {
				return nil, fmt.Errorf("%w: %q changed", ErrNotStill, rel)
			}
			la.stamps[rel] = stampOf(written)
		}
		if st.typ != fs.ModeDir {
			return nil, nil
		}
		return &fileID{sys.Dev, sys.Ino}, nil
	})
	if err != nil {
		return err
	}
	var gone []string
	for rel := range la.stamps {
		if !now[rel] {
			gone = append(gone, rel)
		}
	}
	slices.Sort(gone) // a folder before what it held
	for i, rel := range gone {
		if i > 0 && under(rel, gone[:i]) {
			continue
		}
		if err := la.w.Deleted(rel); err != nil {
			return err
		}
	}
	return nil
}

// Close finishes the archive.
func (la *LiveArchive) Close() error { return la.w.Close() }

// Abort releases an archive that will not be finished.
func (la *LiveArchive) Abort() { la.w.Abort() }

// under says whether rel lies in one of the folders dirs (sorted, so its
// own folder, if there, is among them).
func under(rel string, dirs []string) bool {
	for d := path.Dir(rel); d != "."; d = path.Dir(d) {
		if _, found := slices.BinarySearch(dirs, d); found {
			return true
		}
	}
	return false
}
