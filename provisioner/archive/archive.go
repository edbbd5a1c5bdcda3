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

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// ErrNotFound is returned by Open for an archive the store does not hold.
var ErrNotFound = errors.New("archive not found")

// ObjectStore keeps archives in the bus's fm_snapshot_archives object store.
type ObjectStore struct {
	store jetstream.ObjectStore
}

// NewObjectStore opens the object store (the topology declares it).
func NewObjectStore(ctx context.Context, js jetstream.JetStream) (*ObjectStore, error) {
	st, err := js.ObjectStore(ctx, protocol.ObjectStoreSnapshots)
	if err != nil {
		return nil, fmt.Errorf("snapshot store %s: %w", protocol.ObjectStoreSnapshots, err)
	}
	return &ObjectStore{store: st}, nil
}

// Name is the store's name in snapshot records.
func (s *ObjectStore) Name() string { return "object-store" }

// Put stores an archive under name, replacing one of that name.
func (s *ObjectStore) Put(ctx context.Context, name string, r io.ReadSeeker) error {
	if _, err := s.store.Put(ctx, jetstream.ObjectMeta{Name: name}, r); err != nil {
		return fmt.Errorf("store archive %s: %w", name, err)
	}
	return nil
}

// Open reads an archive.
func (s *ObjectStore) Open(ctx context.Context, name string) (io.ReadCloser, error) {
	res, err := s.store.Get(ctx, name)
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		return nil, fmt.Errorf("%w: %s in %s", ErrNotFound, name, protocol.ObjectStoreSnapshots)
	}
	if err != nil {
		return nil, fmt.Errorf("read archive %s: %w", name, err)
	}
	return res, nil
}

// Delete removes an archive; one already gone is not an error.
func (s *ObjectStore) Delete(ctx context.Context, name string) error {
	if err := s.store.Delete(ctx, name); err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
		return fmt.Errorf("delete archive %s: %w", name, err)
	}
	return nil
}
