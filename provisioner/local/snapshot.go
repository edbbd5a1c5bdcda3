package local

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/internal/tarball"
	"github.com/fleetmanager/fm/internal/tarball/tarzstd"
	"github.com/fleetmanager/fm/internal/transfer"
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

// Snapshot implements provisioner.Backend. The volume folder is archived
// with the machine's processes (agent and DSS) paused only for the last of
// it (archiveLive), which gives a crash-consistent point in time as an EBS
// snapshot does. A snapshot whose archive is in the store already (a redelivery
// after a crash) is found and described, not taken again: taken again, it
// would hold other data under the same name than the digest a first report
// may have recorded, or the data after an upgrade it was meant to precede.
func (b *Backend) Snapshot(ctx context.Context, req provisioner.Request, cur protocol.MachineState, snap protocol.SnapshotRef) (protocol.SnapshotRef, error) {
	if b.cfg.Archives == nil {
		return snap, protocol.Errorf(protocol.CodeUnimplemented, "this provisioner has no snapshot store")
	}
	if b.cfg.SecretKey == nil {
		return snap, protocol.Errorf(protocol.CodeFailedPrecondition,
			"this provisioner has no secret key to seal snapshot archives with (fm provisioner --secret-key-file)")
	}
	inst := req.Instance
	name := archiveName(inst, snap.ID, sealedArchive)
	// What a try killed before the end left aside goes in any case.
	work := filepath.Join(b.cfg.Dir, "snapshots", snap.ID)
	if err := os.RemoveAll(work); err != nil {
		return snap, err
	}
	ref, found, err := b.storedArchive(ctx, name, snap, cur)
	if err == nil && !found {
		// A try by an FM from before zstd, killed after its Put, left a
		// gzipped archive that a report may have recorded: it is the one.
		// One its Put left part-way was never reported: it goes, and the
		// snapshot is taken anew, in today's name and format.
		legacy := archiveName(inst, snap.ID, tarball.Gzip)
		ref, found, err = b.storedArchive(ctx, legacy, snap, cur)
		if errors.Is(err, archive.ErrIncomplete) {
			req.Progress("archive", fmt.Sprintf("%s: the archive a try by an earlier FM left is not whole (%v); deleting it, taking the snapshot anew", snap.ID, err))
			if err = b.cfg.Archives.Delete(ctx, legacy); err != nil {
				return snap, protocol.Errorf(protocol.CodeUnavailable, "the snapshot store could not delete %s: %v", legacy, err)
			}
		}
	}
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
	if err := os.MkdirAll(work, 0o700); err != nil {
		return snap, err
	}
	f, err := os.Create(filepath.Join(work, "volume"+sealedArchive.Ext))
	if err != nil {
		return snap, err
	}
	defer f.Close()
	h := sha256.New()
	var (
		paused int
		took   time.Duration
	)
	if err := b.crash.Around("local/snapshot/archive-volume", func() (err error) {
		paused, took, err = b.archiveLive(inst, vol, io.MultiWriter(f, h), b.sealedCodec(name))
		return err
	}); err != nil {
		return snap, fmt.Errorf("archive the data volume: %w", err)
	}
	req.Progress("freeze", fmt.Sprintf("data volume archived with %d processes paused for %s", paused, took.Round(time.Millisecond)))
	size, err := f.Seek(0, io.SeekCurrent)
	if err != nil {
		return snap, err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return snap, err
	}
	upload := transfer.ReadSeeker(f, size, b.cfg.ProgressEvery, func(done, total int64) {
		req.Advance("upload", transfer.Describe("snapshot archive to "+b.cfg.Archives.Name(), done, total))
	})
	if err := b.crash.Around("local/snapshot/put-archive", func() error { return b.cfg.Archives.Put(ctx, name, upload) }); err != nil {
		return snap, protocol.Errorf(protocol.CodeUnavailable, "the snapshot store did not take the archive: %v", err)
	}
	if size > 0 {
		req.Advance("upload", transfer.Describe("snapshot archive to "+b.cfg.Archives.Name(), size, size))
	}
	ref = protocol.SnapshotRef{ID: snap.ID, Store: b.cfg.Archives.Name(), Ref: name, SHA256: hex.EncodeToString(h.Sum(nil)),
		SizeBytes: size, VolumeSizeGB: cur.VolumeSizeGB}
	req.Progress("archive", fmt.Sprintf("%s: %d bytes in %s, sha256 %s", snap.ID, size, ref.Store, ref.SHA256))
	return ref, nil
}

// sealedArchive names the archives snapshots are taken in: a tar
// compressed with zstd (where gzip took most of a snapshot's time,
// docs/benchmarks.md), sealed with FM's secret key for the archive's name
// (seal.NewStreamWriter). Restores read these and the gzipped tars taken
// before, as Extract tells them apart.
// Only sealedCodec's copy, which holds the key, reads or writes.
var sealedArchive = tarball.Codec{Name: "sealed zstd", Ext: ".tar.zst.sealed", Magic: seal.StreamMagic()}

// restoreCodecs is what the archive of that name may be in: its name (FM's
// own record), not its first bytes, says, so that a gzipped tar put under a
// sealed archive's name is refused unread.
func (b *Backend) restoreCodecs(snap protocol.SnapshotRef) ([]tarball.Codec, error) {
	switch {
	case strings.HasSuffix(snap.Ref, sealedArchive.Ext):
		if b.cfg.SecretKey == nil {
			return nil, protocol.Errorf(protocol.CodeFailedPrecondition,
				"snapshot %s is sealed, and this provisioner has no secret key to open it with (fm provisioner --secret-key-file)", snap.ID)
		}
		return []tarball.Codec{b.sealedCodec(snap.Ref)}, nil
	case strings.HasSuffix(snap.Ref, tarball.Gzip.Ext):
		return []tarball.Codec{tarball.Gzip}, nil
	}
	return nil, protocol.Errorf(protocol.CodeDataLoss, "snapshot %s: %q is not the name of an archive this provisioner takes", snap.ID, snap.Ref)
}

// sealedCodec is sealedArchive for the archive name, with FM's secret key.
func (b *Backend) sealedCodec(name string) tarball.Codec {
	c := sealedArchive
	c.NewWriter = func(w io.Writer) (io.WriteCloser, error) {
		sw, err := seal.NewStreamWriter(w, b.cfg.SecretKey, name)
		if err != nil {
			return nil, err
		}
		zw, err := tarzstd.Codec.NewWriter(sw)
		if err != nil {
			return nil, err
		}
		return closeBoth{zw, sw}, nil
	}
	c.NewReader = func(r io.Reader) (io.Reader, func(), error) {
		if b.cfg.SecretKey == nil {
			return nil, nil, errors.New("this provisioner has no secret key to open it with (fm provisioner --secret-key-file)")
		}
		sr, err := seal.NewStreamReader(r, b.cfg.SecretKey, name)
		if err != nil {
			return nil, nil, err
		}
		return tarzstd.Codec.NewReader(sr)
	}
	return c
}

// countingReader counts what is read through it.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// closeBoth closes the compressor, then the seal under it.
type closeBoth struct {
	io.WriteCloser
	under io.Closer
}

func (c closeBoth) Close() error {
	err := c.WriteCloser.Close()
	if uerr := c.under.Close(); err == nil {
		err = uerr
	}
	return err
}

// archiveName is the store's name of a snapshot's archive.
func archiveName(inst, snapID string, c tarball.Codec) string {
	return inst + "/" + snapID + c.Ext
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
	var size int64
	if strings.HasSuffix(name, sealedArchive.Ext) {
		// Found, it becomes the snapshot: it must open with FM's key, for
		// this name (not be put there by someone else).
		counted := &countingReader{r: io.TeeReader(rc, h)}
		var sr io.Reader
		if sr, err = seal.NewStreamReader(counted, b.cfg.SecretKey, name); err == nil {
			_, err = io.Copy(io.Discard, sr)
		}
		size = counted.n
		if errors.Is(err, seal.ErrStreamBroken) {
			return snap, false, fmt.Errorf("%w: %s does not open with FM's key for its name", archive.ErrCorrupt, name)
		}
	} else {
		size, err = io.Copy(h, rc)
	}
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
	codecs, err := b.restoreCodecs(snap)
	if err != nil {
		return err
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
	exErr := tarball.Extract(body, dst, tarball.Options{Folder: "volume", Codecs: codecs, Snapshot: true})
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
