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

func stampOf(info fs.FileInfo) entryStamp {
	st := entryStamp{typ: info.Mode().Type(), perm: info.Mode().Perm(), size: info.Size(), mtime: info.ModTime().UnixNano()}
	if sys, ok := info.Sys().(*syscall.Stat_t); ok {
		st.ctime, st.ino = sys.Ctim.Nano(), sys.Ino
	}
	return st
}

// statStamp is stampOf for what fstatat gives, which the catch-up pass
// uses for one system call per entry; typ is fs.ModeDir, fs.ModeSymlink, 0
// for a regular file, or fs.ModeIrregular for what is not data.
func statStamp(st *unix.Stat_t) entryStamp {
	var typ fs.FileMode
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		typ = fs.ModeDir
	case unix.S_IFLNK:
		typ = fs.ModeSymlink
	case unix.S_IFREG:
	default:
		typ = fs.ModeIrregular
	}
	return entryStamp{typ: typ, perm: fs.FileMode(st.Mode & 0o777), size: st.Size,
		mtime: st.Mtim.Nano(), ctime: st.Ctim.Nano(), ino: st.Ino}
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
	if err := la.catchUpUnder(top, "", now); err != nil {
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

func (la *LiveArchive) catchUpUnder(dir *os.File, rel string, now map[string]bool) error {
	names, err := dir.Readdirnames(-1)
	if err != nil {
		return fmt.Errorf("read folder %q: %w", rel, err)
	}
	slices.Sort(names)
	for _, name := range names {
		entry := path.Join(rel, name)
		var sys unix.Stat_t
		if err := unix.Fstatat(int(dir.Fd()), name, &sys, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			if vanished(err) {
				return fmt.Errorf("%w: %q went", ErrNotStill, entry)
			}
			return &fs.PathError{Op: "fstatat", Path: entry, Err: err}
		}
		st := statStamp(&sys)
		if st.typ == fs.ModeIrregular {
			continue // not data: what the archive holds of that name goes
		}
		now[entry] = true
		old, ok := la.stamps[entry]
		if !ok || old != st || st.typ == 0 && max(st.ctime, st.mtime) >= la.recent {
			written, err := la.w.addAt(dir, name, entry)
			if err != nil {
				return err
			}
			if written == nil {
				return fmt.Errorf("%w: %q changed", ErrNotStill, entry)
			}
			la.stamps[entry] = stampOf(written)
		}
		if st.typ != fs.ModeDir {
			continue
		}
		sub, err := openAt(dir, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW)
		if vanished(err) {
			return fmt.Errorf("%w: folder %q went", ErrNotStill, entry)
		}
		if err != nil {
			return err
		}
		err = la.catchUpUnder(sub, entry, now)
		sub.Close()
		if err != nil {
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
