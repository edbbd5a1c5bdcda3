// Package archive holds the snapshot stores of the local backend: where the
// compressed archives of data volumes are kept. ObjectStore keeps them in
// the bus's object store (the embedded default); S3 keeps them in a bucket
// of S3 or an S3-compatible store, which is where a clustered FM keeps bulk
// bytes (an object store keeps a full copy on every replica).
//
// cmd/fm and the local backend's tests import it; it imports protocol and
// the NATS and AWS clients.
package archive

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// ErrNotFound is returned by Open for an archive the store does not hold.
var ErrNotFound = errors.New("archive not found")

// ErrCorrupt is returned by Open, or by a read of what it opened, for an
// archive the store holds but cannot give back whole: its bytes no longer
// match the digest the store recorded, or part of it is missing (a Put
// that failed after its description went in). A read that fails for any
// other reason (the store slow or out of reach) does not wrap it: that
// may pass, a corrupted archive does not.
var ErrCorrupt = errors.New("archive corrupted")

// objectTimeout bounds a whole Put or read of an archive whose caller's
// context sets no deadline. The object store's client otherwise bounds it
// by its default API timeout (5 s), which reading or writing a large
// archive on a busy machine outlasts: the read stopped part-way, and a
// restore took a cut-short archive for a corrupted one.
const objectTimeout = time.Hour

// ObjectStore keeps archives in the bus's fm_snapshot_archives object store.
type ObjectStore struct {
	store  jetstream.ObjectStore
	stream jetstream.Stream
}

// NewObjectStore opens the object store (the topology declares it).
func NewObjectStore(ctx context.Context, js jetstream.JetStream) (*ObjectStore, error) {
	st, err := js.ObjectStore(ctx, protocol.ObjectStoreSnapshots)
	if err != nil {
		return nil, fmt.Errorf("snapshot store %s: %w", protocol.ObjectStoreSnapshots, err)
	}
	stream, err := js.Stream(ctx, "OBJ_"+protocol.ObjectStoreSnapshots)
	if err != nil {
		return nil, fmt.Errorf("snapshot store %s: %w", protocol.ObjectStoreSnapshots, err)
	}
	return &ObjectStore{store: st, stream: stream}, nil
}

// Name is the store's name in snapshot records.
func (s *ObjectStore) Name() string { return "object-store" }

// bounded gives ctx the deadline of a whole archive's transfer if it has
// none.
func bounded(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, objectTimeout)
}

// Put stores an archive under name, replacing one of that name. A Put that
// fails takes away what it may have left under the name (its description
// can be in while its chunks are not).
func (s *ObjectStore) Put(ctx context.Context, name string, r io.ReadSeeker) error {
	putting, cancel := bounded(ctx)
	defer cancel()
	if _, err := s.store.Put(putting, jetstream.ObjectMeta{Name: name}, r); err != nil {
		cleaning, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		_ = s.Delete(cleaning, name) // if this fails too, Open finds it incomplete
		return fmt.Errorf("store archive %s: %w", name, err)
	}
	return nil
}

// Open reads an archive. It checks first that the store holds every chunk
// of it: an archive with missing chunks would otherwise be read until the
// deadline, waiting for chunks that never come.
func (s *ObjectStore) Open(ctx context.Context, name string) (io.ReadCloser, error) {
	info, err := s.store.GetInfo(ctx, name)
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		return nil, fmt.Errorf("%w: %s in %s", ErrNotFound, name, protocol.ObjectStoreSnapshots)
	}
	if err != nil {
		return nil, fmt.Errorf("read archive %s: %w", name, err)
	}
	if info.Chunks > 0 {
		subject := "$O." + protocol.ObjectStoreSnapshots + ".C." + info.NUID
		si, err := s.stream.Info(ctx, jetstream.WithSubjectFilter(subject))
		if err != nil {
			return nil, fmt.Errorf("read archive %s: %w", name, err)
		}
		if held := si.State.Subjects[subject]; held != uint64(info.Chunks) {
			return nil, fmt.Errorf("%w: %s in %s has %d of its %d chunks", ErrCorrupt, name, protocol.ObjectStoreSnapshots, held, info.Chunks)
		}
	}
	reading, cancel := bounded(ctx)
	res, err := s.store.Get(reading, name)
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		cancel()
		return nil, fmt.Errorf("%w: %s in %s", ErrNotFound, name, protocol.ObjectStoreSnapshots)
	}
	if err != nil {
		cancel()
		return nil, fmt.Errorf("read archive %s: %w", name, err)
	}
	return &objectReader{res: res, name: name, cancel: cancel}, nil
}

// objectReader reads an archive from the object store; its errors say
// whether the archive is corrupted (ErrCorrupt) or could not be read.
type objectReader struct {
	res    jetstream.ObjectResult
	name   string
	cancel context.CancelFunc
}

func (r *objectReader) Read(p []byte) (int, error) {
	n, err := r.res.Read(p)
	switch {
	case err == nil || err == io.EOF:
		return n, err
	case errors.Is(err, jetstream.ErrDigestMismatch):
		return n, fmt.Errorf("%w: %s does not match the digest the store recorded", ErrCorrupt, r.name)
	}
	return n, fmt.Errorf("read archive %s: %w", r.name, err)
}

func (r *objectReader) Close() error {
	err := r.res.Close()
	r.cancel()
	return err
}

// Delete removes an archive; one already gone is not an error.
func (s *ObjectStore) Delete(ctx context.Context, name string) error {
	if err := s.store.Delete(ctx, name); err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
		return fmt.Errorf("delete archive %s: %w", name, err)
	}
	return nil
}
