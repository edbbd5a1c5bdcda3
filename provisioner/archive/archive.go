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

	"github.com/fleetmanager/fm/internal/objects"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// ErrNotFound is returned by Open for an archive the store does not hold.
var ErrNotFound = errors.New("archive not found")

// Errors Open, or a read of what it opened, return for an archive the store
// holds but cannot give back whole. A read that fails for any other reason
// (the store slow or out of reach) wraps neither: that may pass.
var (
	// ErrIncomplete: some of the archive is missing from the store (a Put
	// that failed after its description went in). Such an archive was
	// never reported: a report follows a Put that succeeded.
	ErrIncomplete = objects.ErrIncomplete
	// ErrCorrupt: the archive's bytes differ from what the store recorded.
	ErrCorrupt = objects.ErrCorrupt
)

// chunkWait bounds the wait for each part of an archive being read: a
// store that sends nothing for that long fails the read (which may pass and
// is tried again), where a wait for the whole archive would have to last
// as long as the largest archive takes.
const chunkWait = time.Minute

// ObjectStore keeps archives in the bus's fm_snapshot_archives object store.
type ObjectStore struct {
	js    jetstream.JetStream
	store jetstream.ObjectStore
	// putting lets one Put run at a time. The bus's ingest queue is per
	// stream and objects.Put bounds the chunks in flight of one Put to
	// what it holds: two side by side (snapshots of several instances
	// taken at once) could pass it, and the bus would refuse chunks (429).
	putting chan struct{}
}

// chunkAckWait is how long a Put waits for the bus to take each chunk of
// an archive. The client's default (5 s) fails a large archive's Put on a
// busy machine, and the snapshot is then taken again (its processes paused
// again); a deadline on the whole Put would wait out its length for an
// acknowledgement lost in a bus restart.
const chunkAckWait = time.Minute

// NewObjectStore opens the object store (the topology declares it).
func NewObjectStore(ctx context.Context, js jetstream.JetStream) (*ObjectStore, error) {
	putting, err := jetstream.New(js.Conn(), jetstream.WithDefaultTimeout(chunkAckWait))
	if err != nil {
		return nil, fmt.Errorf("snapshot store %s: %w", protocol.ObjectStoreSnapshots, err)
	}
	st, err := putting.ObjectStore(ctx, protocol.ObjectStoreSnapshots)
	if err != nil {
		return nil, fmt.Errorf("snapshot store %s: %w", protocol.ObjectStoreSnapshots, err)
	}
	return &ObjectStore{js: js, store: st, putting: make(chan struct{}, 1)}, nil
}

// Name is the store's name in snapshot records.
func (s *ObjectStore) Name() string { return "object-store" }

// Put stores an archive under name, replacing one of that name. A Put that
// fails takes away what it may have left under the name (its description
// can be in while its chunks are not).
func (s *ObjectStore) Put(ctx context.Context, name string, r io.ReadSeeker) error {
	// From where r is to its end, as the S3 store reads it.
	at, err := r.Seek(0, io.SeekCurrent)
	var end int64
	if err == nil {
		end, err = r.Seek(0, io.SeekEnd)
	}
	if err == nil {
		_, err = r.Seek(at, io.SeekStart)
	}
	if err != nil {
		return fmt.Errorf("store archive %s: %w", name, err)
	}
	select {
	case s.putting <- struct{}{}:
		defer func() { <-s.putting }()
	case <-ctx.Done():
		return fmt.Errorf("store archive %s: %w", name, ctx.Err())
	}
	size := end - at
	if _, err := objects.Put(ctx, s.store, jetstream.ObjectMeta{Name: name}, r, size); err != nil {
		cleaning, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		_ = s.Delete(cleaning, name) // if this fails too, Open finds it incomplete
		return fmt.Errorf("store archive %s: %w", name, err)
	}
	return nil
}

// Open reads an archive (objects.Open: no bound on the whole read, each
// part waited for at most chunkWait and no longer than ctx lasts).
func (s *ObjectStore) Open(ctx context.Context, name string) (io.ReadCloser, error) {
	r, err := objects.Open(ctx, s.js, protocol.ObjectStoreSnapshots, name, chunkWait)
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		return nil, fmt.Errorf("%w: %s in %s", ErrNotFound, name, protocol.ObjectStoreSnapshots)
	}
	if err != nil {
		return nil, fmt.Errorf("read archive: %w", err)
	}
	return r, nil
}

// Delete removes an archive; one already gone is not an error.
func (s *ObjectStore) Delete(ctx context.Context, name string) error {
	if err := s.store.Delete(ctx, name); err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
		return fmt.Errorf("delete archive %s: %w", name, err)
	}
	return nil
}
