package local

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/fleetmanager/fm/internal/tarball"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
	"github.com/fleetmanager/fm/provisioner/archive"
)

// Archives is the snapshot store: where archives of data volumes are kept.
type Archives interface {
	// Name is the store's name in snapshot records ("object-store", "s3").
	Name() string
	Put(ctx context.Context, name string, r io.ReadSeeker) error
	// Open fails with an error wrapping archive.ErrNotFound for a missing
	// archive.
	Open(ctx context.Context, name string) (io.ReadCloser, error)
	Delete(ctx context.Context, name string) error
}

var (
	_ Archives = (*archive.ObjectStore)(nil)
	_ Archives = (*archive.S3)(nil)
)

// Snapshot implements provisioner.Backend. The volume folder is copied
// aside with the machine's processes (agent and DSS) paused only for the
// last of it (pausedCopy), which gives a crash-consistent point in time as
// an EBS snapshot does; the archive is then made from the copy while they
// run on. A snapshot whose archive is in the store already (a redelivery
// after a crash) is found and described, not taken again: taken again, it
// would hold other data under the same name than the digest a first report
// may have recorded, or the data after an upgrade it was meant to precede.
func (b *Backend) Snapshot(ctx context.Context, req provisioner.Request, cur protocol.MachineState, snap protocol.SnapshotRef) (protocol.SnapshotRef, error) {
	if b.cfg.Archives == nil {
		return snap, protocol.Errorf(protocol.CodeUnimplemented, "this provisioner has no snapshot store")
	}
	inst := req.Instance
	name := inst + "/" + snap.ID + ".tar.gz"
	// What a try killed before the end left aside goes in any case.
	work := filepath.Join(b.cfg.Dir, "snapshots", snap.ID)
	if err := os.RemoveAll(work); err != nil {
		return snap, err
	}
	ref, found, err := b.storedArchive(ctx, name, snap, cur)
	switch {
	case errors.Is(err, archive.ErrIncomplete):
		// Left by a try whose Put failed part-way: nothing was reported
		// from it (a report follows a Put that succeeded), so it is taken
		// again and replaced.
		req.Progress("archive", fmt.Sprintf("%s: the archive a previous try left is not whole (%v); taking it again", snap.ID, err))
	case errors.Is(err, archive.ErrCorrupt):
		// Stored whole and perhaps reported: taken again, it would differ
		// from the digest on record.
		return snap, protocol.Errorf(protocol.CodeDataLoss, "the archive of snapshot %s is corrupted in the store: %v", snap.ID, err)
	case err != nil:
		return snap, err
	case found:
		req.Progress("archive", fmt.Sprintf("%s: already in %s (%d bytes, sha256 %s)", snap.ID, ref.Store, ref.SizeBytes, ref.SHA256))
		return ref, nil
	}
	vol := b.volumeDir(inst)
	if _, err := os.Stat(vol); err != nil {
		return snap, protocol.Errorf(protocol.CodeFailedPrecondition, "instance %s has no data volume to snapshot", inst)
	}
	defer os.RemoveAll(work)
	var (
		paused int
		took   time.Duration
	)
	if err := b.crash.Around("local/snapshot/copy-volume", func() (err error) {
		paused, took, err = b.pausedCopy(inst, vol, filepath.Join(work, "volume"))
		return err
	}); err != nil {
		return snap, fmt.Errorf("copy the data volume: %w", err)
	}
	req.Progress("freeze", fmt.Sprintf("data volume copied with %d processes paused for %s", paused, took.Round(time.Millisecond)))
	f, err := os.Create(filepath.Join(work, "volume.tar.gz"))
	if err != nil {
		return snap, err
	}
	defer f.Close()
	h := sha256.New()
	if err := tarball.Write(io.MultiWriter(f, h), filepath.Join(work, "volume")); err != nil {
		return snap, fmt.Errorf("archive the data volume: %w", err)
	}
	size, err := f.Seek(0, io.SeekCurrent)
	if err != nil {
		return snap, err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return snap, err
	}
	if err := b.crash.Around("local/snapshot/put-archive", func() error { return b.cfg.Archives.Put(ctx, name, f) }); err != nil {
		return snap, protocol.Errorf(protocol.CodeUnavailable, "the snapshot store did not take the archive: %v", err)
	}
	ref = protocol.SnapshotRef{ID: snap.ID, Store: b.cfg.Archives.Name(), Ref: name, SHA256: hex.EncodeToString(h.Sum(nil)),
		SizeBytes: size, VolumeSizeGB: cur.VolumeSizeGB}
	req.Progress("archive", fmt.Sprintf("%s: %d bytes in %s, sha256 %s", snap.ID, size, ref.Store, ref.SHA256))
	return ref, nil
}

// storedArchive describes the archive name if the store holds it: its
// digest and size, read back from the store. An archive the store holds
// but cannot give back whole is an error wrapping archive.ErrIncomplete or
// archive.ErrCorrupt.
func (b *Backend) storedArchive(ctx context.Context, name string, snap protocol.SnapshotRef, cur protocol.MachineState) (protocol.SnapshotRef, bool, error) {
	rc, err := b.cfg.Archives.Open(ctx, name)
	if errors.Is(err, archive.ErrNotFound) {
		return snap, false, nil
	}
	if notWhole(err) {
		return snap, false, err
	}
	if err != nil {
		return snap, false, protocol.Errorf(protocol.CodeUnavailable, "the snapshot store could not be read: %v", err)
	}
	defer rc.Close()
	h := sha256.New()
	size, err := io.Copy(h, rc)
	if notWhole(err) {
		return snap, false, err
	}
	if err != nil {
		return snap, false, protocol.Errorf(protocol.CodeUnavailable, "the archive %s could not be read back: %v", name, err)
	}
	return protocol.SnapshotRef{ID: snap.ID, Store: b.cfg.Archives.Name(), Ref: name, SHA256: hex.EncodeToString(h.Sum(nil)),
		SizeBytes: size, VolumeSizeGB: cur.VolumeSizeGB}, true, nil
}

// keeps says whether snap is in this backend's snapshot store.
func (b *Backend) keeps(snap protocol.SnapshotRef) error {
	if b.cfg.Archives == nil || snap.Store != b.cfg.Archives.Name() {
		return protocol.Errorf(protocol.CodeFailedPrecondition, "snapshot %s is kept in %q, which this provisioner does not use", snap.ID, snap.Store)
	}
	return nil
}

// DeleteSnapshot implements provisioner.Backend.
func (b *Backend) DeleteSnapshot(ctx context.Context, req provisioner.Request, snap protocol.SnapshotRef) error {
	if snap.Ref == "" {
		return nil // never taken
	}
	if err := b.keeps(snap); err != nil {
		return err
	}
	if err := b.crash.Around("local/delete-snapshot/delete-archive", func() error { return b.cfg.Archives.Delete(ctx, snap.Ref) }); err != nil {
		return protocol.Errorf(protocol.CodeUnavailable, "%v", err)
	}
	req.Progress("delete-archive", snap.Ref+" deleted")
	return nil
}

// pausedCopy copies the volume folder to dst, and says how many of the
// machine's processes it paused and for how long. The folder is copied
// first while they run; then they are stopped only while what changed
// since is copied again, so the pause lasts as long as the copy of what
// DSS wrote meanwhile, not of the whole volume.
func (b *Backend) pausedCopy(inst, vol, dst string) (int, time.Duration, error) {
	stamps := map[string]fileStamp{}
	if err := syncTree(vol, dst, stamps); err != nil {
		return 0, 0, err
	}
	pids := append(cmdline.Find(b.configPath(inst), "agent"), cmdline.Find(b.dssDir(inst))...)
	start := time.Now()
	var stopped []int
	for _, pid := range pids {
		if syscall.Kill(pid, syscall.SIGSTOP) == nil {
			stopped = append(stopped, pid)
		}
	}
	defer func() {
		for _, pid := range stopped {
			_ = syscall.Kill(pid, syscall.SIGCONT)
		}
	}()
	// A provisioner killed here leaves the machine paused: the next one
	// resumes every machine when it starts (resumeMachines).
	b.crash.At("local/snapshot/machine-paused")
	err := syncTree(vol, dst, stamps)
	return len(stopped), time.Since(start), err
}

// fileStamp tells whether a file changed: any write changes its ctime,
// which no one can set back.
type fileStamp struct {
	size         int64
	mtime, ctime int64
}

func stampOf(info fs.FileInfo) fileStamp {
	st := fileStamp{size: info.Size(), mtime: info.ModTime().UnixNano()}
	if sys, ok := info.Sys().(*syscall.Stat_t); ok {
		st.ctime = sys.Ctim.Nano()
	}
	return st
}

// syncTree makes dst a copy of src: directories, regular files and symbolic
// links, with modes and modification times; what src no longer has goes.
// A regular file whose stamp (taken before it was copied) is unchanged in
// stamps is not copied again. What vanishes from src while it is read (a
// running DSS's temporary files) is skipped.
func syncTree(src, dst string, stamps map[string]fileStamp) error {
	seen := map[string]bool{}
	err := filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		seen[rel] = true
		to := filepath.Join(dst, rel)
		info, err := d.Info()
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			return os.MkdirAll(to, info.Mode().Perm()|0o700)
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(path)
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			if err != nil {
				return err
			}
			_ = os.Remove(to)
			return os.Symlink(target, to)
		case d.Type().IsRegular():
			st := stampOf(info)
			if old, ok := stamps[rel]; ok && old == st {
				return nil
			}
			stamps[rel] = st
			if err := copyFile(path, to, info.Mode().Perm()); errors.Is(err, fs.ErrNotExist) {
				return nil
			} else if err != nil {
				return err
			}
			return os.Chtimes(to, info.ModTime(), info.ModTime())
		}
		return nil // sockets, pipes: not data
	})
	if err != nil {
		return err
	}
	var gone []string
	err = filepath.WalkDir(dst, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dst, path)
		if !seen[rel] {
			gone = append(gone, path)
			if d.IsDir() {
				return filepath.SkipDir
			}
		}
		return nil
	})
	for _, p := range gone {
		if rerr := os.RemoveAll(p); rerr != nil && err == nil {
			err = rerr
		}
	}
	return err
}

func copyFile(src, dst string, mode fs.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// restoreArchive extracts a snapshot's archive into dst, checking its
// SHA-256 against the one recorded when it was taken. Any failure is a
// DataLoss error: the archive is missing, corrupted or not an archive.
func (b *Backend) restoreArchive(ctx context.Context, snap protocol.SnapshotRef, dst string) error {
	if err := b.keeps(snap); err != nil {
		return err
	}
	if snap.SHA256 == "" {
		return protocol.Errorf(protocol.CodeDataLoss, "snapshot %s has no recorded digest to check its archive against", snap.ID)
	}
	rc, err := b.cfg.Archives.Open(ctx, snap.Ref)
	if errors.Is(err, archive.ErrNotFound) {
		return protocol.Errorf(protocol.CodeDataLoss, "the archive of snapshot %s is missing from the snapshot store (%v)", snap.ID, err)
	}
	if notWhole(err) {
		return protocol.Errorf(protocol.CodeDataLoss, "the archive of snapshot %s is corrupted: %v", snap.ID, err)
	}
	if err != nil {
		return protocol.Errorf(protocol.CodeUnavailable, "the archive of snapshot %s could not be read: %v", snap.ID, err)
	}
	defer rc.Close()
	h := sha256.New()
	store := &readFailure{r: rc}
	body := io.TeeReader(store, h)
	exErr := tarball.Extract(body, dst, tarball.Options{Folder: "volume"})
	// The digest covers every byte, also what follows the end of the tar.
	_, _ = io.Copy(io.Discard, body)
	switch {
	case errors.Is(store.err, archive.ErrCorrupt):
		return protocol.Errorf(protocol.CodeDataLoss, "the archive of snapshot %s is corrupted: %v", snap.ID, store.err)
	case store.err != nil:
		// Cut short by the store (slow, out of reach), not corrupted: the
		// digest of what was read says nothing. It may pass.
		return protocol.Errorf(protocol.CodeUnavailable, "the archive of snapshot %s could not be read: %v", snap.ID, store.err)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != snap.SHA256 {
		return protocol.Errorf(protocol.CodeDataLoss, "the archive of snapshot %s is corrupted: its SHA-256 is %s, %s was recorded when it was taken",
			snap.ID, got, snap.SHA256)
	}
	if exErr != nil {
		return protocol.Errorf(protocol.CodeDataLoss, "the archive of snapshot %s could not be extracted: %v", snap.ID, exErr)
	}
	return nil
}

// notWhole says whether err is the store's for an archive it holds but
// cannot give back whole (incomplete or corrupted), not a failure that may
// pass.
func notWhole(err error) bool {
	return errors.Is(err, archive.ErrIncomplete) || errors.Is(err, archive.ErrCorrupt)
}

// readFailure keeps the first error other than io.EOF its reader gave,
// which is the store's: what reads through it (an extraction that stops
// at the end of the tar, a copy) may not pass it on.
type readFailure struct {
	r   io.Reader
	err error
}

func (f *readFailure) Read(p []byte) (int, error) {
	if f.err != nil {
		return 0, f.err
	}
	n, err := f.r.Read(p)
	if err != nil && err != io.EOF {
		f.err = err
	}
	return n, err
}
