// Package objects reads an object of a JetStream object store chunk by
// chunk, for objects of gigabytes read by a process that must stop when it
// is told to: the DSS kits an agent fetches and the snapshot archives of
// the local backend.
//
// The client's own ObjectStore.Get does not fit them: without a deadline of
// the caller's it bounds the whole read by its default API timeout (5 s),
// which a large object on a busy machine outlasts; with one, a read blocked
// waiting for a chunk ignores the caller's cancellation until that
// deadline (an hour), so a provisioner or agent told to stop would hang.
// Here every wait for a chunk ends when the caller's context does or when
// no chunk came for the idle time, and the object's size and digest are
// checked as it is read.
//
// Only this module's packages may import it (it is internal): the agent
// and provisioner/archive. It imports the NATS client only.
package objects

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Errors Open and Read return for callers to branch on; any other error
// (the bus slow, away, or the caller's context ended) may pass.
var (
	// ErrIncomplete: the store holds the object's description but not all
	// of its chunks (a Put cut short after its description went in).
	ErrIncomplete = errors.New("object incomplete")
	// ErrCorrupt: the bytes read differ from the object's recorded size or
	// digest.
	ErrCorrupt = errors.New("object corrupted")
)

// Reader reads one object. It is not safe for concurrent use.
type Reader struct {
	ctx    context.Context
	idle   time.Duration
	name   string
	info   *jetstream.ObjectInfo
	it     jetstream.MessagesContext
	buf    []byte
	chunks uint32
	size   uint64
	digest hash.Hash
	err    error
}

// Open opens the object name of the store bucket for reading. It fails
// with an error wrapping jetstream.ErrObjectNotFound for an object the
// store does not hold, and ErrIncomplete for one missing chunks. A read
// waits at most idle for each chunk, and no longer than ctx lasts.
func Open(ctx context.Context, js jetstream.JetStream, bucket, name string, idle time.Duration) (*Reader, error) {
	store, err := js.ObjectStore(ctx, bucket)
	if err != nil {
		return nil, fmt.Errorf("object store %s: %w", bucket, err)
	}
	info, err := store.GetInfo(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("object %s in %s: %w", name, bucket, err)
	}
	if info.NUID == "" {
		return nil, fmt.Errorf("object %s in %s: %w", name, bucket, jetstream.ErrBadObjectMeta)
	}
	r := &Reader{ctx: ctx, idle: idle, name: name, info: info, digest: sha256.New()}
	if info.Chunks == 0 {
		return r, nil
	}
	streamName := "OBJ_" + bucket
	chunks := "$O." + bucket + ".C." + info.NUID
	stream, err := js.Stream(ctx, streamName)
	if err != nil {
		return nil, fmt.Errorf("object store %s: %w", bucket, err)
	}
	si, err := stream.Info(ctx, jetstream.WithSubjectFilter(chunks))
	if err != nil {
		return nil, fmt.Errorf("object %s in %s: %w", name, bucket, err)
	}
	if held := si.State.Subjects[chunks]; held != uint64(info.Chunks) {
		return nil, fmt.Errorf("%w: %s in %s has %d of its %d chunks", ErrIncomplete, name, bucket, held, info.Chunks)
	}
	// Bounded resets: a bus that stays away fails the read (a failure that
	// may pass) rather than holding it.
	cons, err := js.OrderedConsumer(ctx, streamName, jetstream.OrderedConsumerConfig{FilterSubjects: []string{chunks}, MaxResetAttempts: 5})
	if err != nil {
		return nil, fmt.Errorf("object %s in %s: %w", name, bucket, err)
	}
	if r.it, err = cons.Messages(); err != nil {
		return nil, fmt.Errorf("object %s in %s: %w", name, bucket, err)
	}
	return r, nil
}

// Info describes the object as the store recorded it.
func (r *Reader) Info() *jetstream.ObjectInfo { return r.info }

// Read implements io.Reader. Its errors wrap ErrCorrupt for an object
// whose bytes differ from what the store recorded.
func (r *Reader) Read(p []byte) (int, error) {
	for len(r.buf) == 0 {
		if r.err != nil {
			return 0, r.err
		}
		if r.chunks == r.info.Chunks {
			r.err = r.check()
			continue
		}
		r.err = r.next()
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}

// next waits for the next chunk.
func (r *Reader) next() error {
	if err := r.ctx.Err(); err != nil {
		return fmt.Errorf("object %s: %w", r.name, err)
	}
	waiting, cancel := context.WithTimeout(r.ctx, r.idle)
	defer cancel()
	msg, err := r.it.Next(jetstream.NextContext(waiting))
	switch {
	case err == nil:
	case r.ctx.Err() != nil:
		return fmt.Errorf("object %s: %w", r.name, r.ctx.Err())
	case errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("object %s: no chunk came for %s after %d of %d: %w", r.name, r.idle, r.chunks, r.info.Chunks, err)
	default:
		return fmt.Errorf("object %s: %w", r.name, err)
	}
	r.chunks++
	r.size += uint64(len(msg.Data()))
	r.digest.Write(msg.Data())
	r.buf = msg.Data()
	if r.size > r.info.Size {
		return fmt.Errorf("%w: %s is longer than the %d bytes recorded", ErrCorrupt, r.name, r.info.Size)
	}
	return nil
}

// check ends a read: io.EOF if the object is what the store recorded.
func (r *Reader) check() error {
	if r.size != r.info.Size {
		return fmt.Errorf("%w: %s has %d bytes, %d were recorded", ErrCorrupt, r.name, r.size, r.info.Size)
	}
	if got := jetstream.GetObjectDigestValue(r.digest); got != r.info.Digest {
		return fmt.Errorf("%w: %s has digest %s, %s was recorded", ErrCorrupt, r.name, got, r.info.Digest)
	}
	return io.EOF
}

// Close stops the read; the store's consumer goes with it.
func (r *Reader) Close() error {
	if r.it != nil {
		r.it.Stop()
	}
	return nil
}
