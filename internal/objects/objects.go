// Package objects reads an object of a JetStream object store chunk by
// chunk, for objects of gigabytes read by a process that must stop when it
// is told to: the DSS kits an agent fetches (and the server checks whole),
// and the snapshot archives of the local backend.
//
// The client's own ObjectStore.Get does not fit them: without a deadline of
// the caller's it bounds the whole read by its default API timeout (5 s),
// which a large object on a busy machine outlasts; with one, a read blocked
// waiting for a chunk ignores the caller's cancellation until that
// deadline (an hour), so a provisioner or agent told to stop would hang.
// And it reads through a consumer, which an agent may not make (its
// delivery subject would be the FM account's: natsauth). Here each chunk is
// a direct get, the next message on the object's chunk subject, with the
// gets for the chunks after it in flight meanwhile (readAhead): a get that
// fails for a reason that may pass (the bus away) is asked again until no
// chunk came for the idle time, every wait ends when the caller's context
// does, and the object's size and digest are checked as it is read.
//
// Put writes an object in chunks few enough in flight for the bus's ingest
// queue to hold them however far its disk falls behind (PutChunkSize), as
// long as the caller runs one Put at a time into a stream.
//
// Only this module's packages may import it (it is internal): the agent,
// the server (server/kits.go) and provisioner/archive. It imports the NATS
// client only.
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

// Chunk sizes Put chooses from. The client's ObjectStore.Put keeps up to
// 4,000 chunks in flight, in a JetStream context of its own that the
// caller's options do not reach, and a stream refuses publishes (429, too
// many requests) once its ingest queue holds 128 MiB (nats-server's
// max_buffered_size), which it does when the bus's disk writes slower than
// the chunks come. An object larger than SmallObject is therefore put in
// chunks of LargeChunk, all 4,000 of which fit in the queue; a smaller one,
// whole in the queue in any case, keeps the client's default, which reads
// in fewer round trips.
const (
	SmallObject = 96 << 20
	SmallChunk  = 128 << 10
	LargeChunk  = 24 << 10
)

// PutChunkSize is the chunk size Put gives an object of size bytes.
func PutChunkSize(size int64) uint32 {
	if size > SmallObject {
		return LargeChunk
	}
	return SmallChunk
}

// Put writes the size bytes of r as the object meta.Name of store, in
// chunks of PutChunkSize(size) (unless meta sets a chunk size).
func Put(ctx context.Context, store jetstream.ObjectStore, meta jetstream.ObjectMeta, r io.Reader, size int64) (*jetstream.ObjectInfo, error) {
	if meta.Opts == nil || meta.Opts.ChunkSize == 0 {
		opts := jetstream.ObjectMetaOptions{}
		if meta.Opts != nil {
			opts = *meta.Opts
		}
		opts.ChunkSize = PutChunkSize(size)
		meta.Opts = &opts
	}
	return store.Put(ctx, meta, r)
}

// readAhead is how many direct gets a Reader keeps in flight: one round
// trip per chunk bounds a read by the latency, not the bandwidth.
const readAhead = 16

// Reader reads one object. It is not safe for concurrent use.
type Reader struct {
	ctx    context.Context
	cancel context.CancelFunc // ends the gets in flight
	ahead  []*get             // in flight, by the sequence each starts at
	stream jetstream.Stream
	chunk  string // the subject of the object's chunks
	seq    uint64 // where the next chunk is looked for
	idle   time.Duration
	name   string
	info   *jetstream.ObjectInfo
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
	stream, err := js.Stream(ctx, "OBJ_"+bucket)
	if err != nil {
		return nil, fmt.Errorf("object store %s: %w", bucket, err)
	}
	if err := complete(ctx, stream, bucket, info); errors.Is(err, ErrIncomplete) {
		// Replaced meanwhile (a Put of the same name purges the chunks of
		// the one it replaces once its own are in): the new one, once.
		again, gerr := store.GetInfo(ctx, name)
		if gerr != nil || again.NUID == info.NUID {
			return nil, err
		}
		if info = again; complete(ctx, stream, bucket, info) != nil {
			return nil, err
		}
	} else if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	return &Reader{ctx: ctx, cancel: cancel, stream: stream, chunk: chunkSubject(bucket, info.NUID), idle: idle, name: name, info: info, digest: sha256.New()}, nil
}

func chunkSubject(bucket, nuid string) string { return "$O." + bucket + ".C." + nuid }

// Complete says whether the store holds every chunk of the object info
// describes: nil, or an error wrapping ErrIncomplete.
func Complete(ctx context.Context, js jetstream.JetStream, bucket string, info *jetstream.ObjectInfo) error {
	if info.Chunks == 0 {
		return nil
	}
	stream, err := js.Stream(ctx, "OBJ_"+bucket)
	if err != nil {
		return fmt.Errorf("object store %s: %w", bucket, err)
	}
	return complete(ctx, stream, bucket, info)
}

func complete(ctx context.Context, stream jetstream.Stream, bucket string, info *jetstream.ObjectInfo) error {
	if info.Chunks == 0 {
		return nil
	}
	chunks := chunkSubject(bucket, info.NUID)
	si, err := stream.Info(ctx, jetstream.WithSubjectFilter(chunks))
	if err != nil {
		return fmt.Errorf("object %s in %s: %w", info.Name, bucket, err)
	}
	if held := si.State.Subjects[chunks]; held != uint64(info.Chunks) {
		return fmt.Errorf("%w: %s in %s has %d of its %d chunks", ErrIncomplete, info.Name, bucket, held, info.Chunks)
	}
	return nil
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

// get is a direct get in flight: the object's first chunk at or after
// sequence from.
type get struct {
	from uint64
	done chan struct{}
	msg  *jetstream.RawStreamMsg
	err  error
}

// next reads the next chunk. The chunks of an object usually sit one
// after the other in the stream (unless Puts ran side by side), so gets
// for the chunks after it start at the sequences after it, before it
// comes back. A get's answer is the next chunk if the get started no
// later than just after the chunk read before it, and found a chunk past
// that one; otherwise the gets in flight are dropped and the chunk is
// asked for where it is known to start.
func (r *Reader) next() error {
	r.readAhead()
	g := r.ahead[0]
	r.ahead = r.ahead[1:]
	select {
	case <-g.done:
	case <-r.ctx.Done():
		return fmt.Errorf("object %s: %w", r.name, r.ctx.Err())
	}
	if g.err == nil && g.from <= r.seq && g.msg.Sequence >= r.seq {
		return r.took(g.msg)
	}
	r.ahead = nil // started too far on, or failed: asked again, one at a time
	return r.nextOne()
}

// readAhead starts gets for the chunks after the next one, up to
// readAhead in flight and no more than the object has left.
func (r *Reader) readAhead() {
	from := r.seq
	if n := len(r.ahead); n > 0 {
		from = r.ahead[n-1].from + 1
	}
	for len(r.ahead) < readAhead && uint32(len(r.ahead)) < r.info.Chunks-r.chunks {
		g := &get{from: from, done: make(chan struct{})}
		go func() {
			defer close(g.done)
			ctx, cancel := context.WithTimeout(r.ctx, 10*time.Second)
			defer cancel()
			g.msg, g.err = r.stream.GetMsg(ctx, g.from, jetstream.WithGetMsgSubject(r.chunk))
		}()
		r.ahead = append(r.ahead, g)
		from++
	}
}

// nextOne reads the next chunk with one get at a time, asked again while
// the bus may answer later.
func (r *Reader) nextOne() error {
	giveUp := time.Now().Add(r.idle)
	backoff := 50 * time.Millisecond
	for {
		if err := r.ctx.Err(); err != nil {
			return fmt.Errorf("object %s: %w", r.name, err)
		}
		// Each get within the client's usual bound, however long idle is.
		get, cancel := context.WithTimeout(r.ctx, min(time.Until(giveUp), 10*time.Second))
		msg, err := r.stream.GetMsg(get, r.seq, jetstream.WithGetMsgSubject(r.chunk))
		cancel()
		switch {
		case err == nil:
			return r.took(msg)
		case r.ctx.Err() != nil:
			return fmt.Errorf("object %s: %w", r.name, r.ctx.Err())
		case errors.Is(err, jetstream.ErrMsgNotFound):
			// Purged meanwhile (a Put of the same name replaced it).
			return fmt.Errorf("%w: %s lost its chunks after %d of %d were read", ErrIncomplete, r.name, r.chunks, r.info.Chunks)
		case !time.Now().Before(giveUp):
			return fmt.Errorf("object %s: no chunk came for %s after %d of %d: %w", r.name, r.idle, r.chunks, r.info.Chunks, err)
		}
		select {
		case <-r.ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, time.Second)
	}
}

// took adds a chunk read to what was read.
func (r *Reader) took(msg *jetstream.RawStreamMsg) error {
	r.seq = msg.Sequence + 1
	r.chunks++
	r.size += uint64(len(msg.Data))
	r.digest.Write(msg.Data)
	r.buf = msg.Data
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

// Close ends the read and the gets it has in flight; it holds nothing on
// the bus.
func (r *Reader) Close() error {
	r.cancel()
	return nil
}
