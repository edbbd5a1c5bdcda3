package objects

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/nats-io/nats.go/jetstream"
)

const bucket = "test_objects"

// store is an object store on a fresh bus holding a 3 MiB object "big",
// and a client of the bus whose default API timeout is short.
func store(t *testing.T) (jetstream.JetStream, jetstream.ObjectStore, []byte) {
	short, _, obs, body, _ := stores(t)
	return short, obs, body
}

// stores is store, a client with the default timeout, and the bus.
func stores(t *testing.T) (short, normal jetstream.JetStream, obs jetstream.ObjectStore, body []byte, srv *bustest.Server) {
	t.Helper()
	ctx := context.Background()
	srv = bustest.RunBare(t)
	short, err := jetstream.New(srv.Connect(t), jetstream.WithDefaultTimeout(300*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	normal = srv.JetStream(t)
	obs, err = normal.CreateObjectStore(ctx, jetstream.ObjectStoreConfig{Bucket: bucket})
	if err != nil {
		t.Fatal(err)
	}
	body = make([]byte, 3<<20)
	if _, err := rand.Read(body); err != nil {
		t.Fatal(err)
	}
	if _, err := obs.Put(ctx, jetstream.ObjectMeta{Name: "big"}, bytes.NewReader(body)); err != nil {
		t.Fatal(err)
	}
	return short, normal, obs, body, srv
}

// TestAReadOutlastsTheClientTimeout: a slow reader takes longer than the
// client's default API timeout, which bounds a whole ObjectStore.Get.
func TestAReadOutlastsTheClientTimeout(t *testing.T) {
	js, _, body := store(t)
	r, err := Open(context.Background(), js, bucket, "big", 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	first := make([]byte, 1000)
	if _, err := io.ReadFull(r, first); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // a slow reader: longer than the client's timeout
	rest, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("read after a pause: %v", err)
	}
	if got := append(first, rest...); !bytes.Equal(got, body) {
		t.Fatalf("read back %d bytes, not what was put", len(got))
	}
	// It made no consumer (an agent may not).
	r.Close()
	stream, err := js.Stream(context.Background(), "OBJ_"+bucket)
	if err != nil {
		t.Fatal(err)
	}
	if info, err := stream.Info(context.Background()); err != nil || info.State.Consumers != 0 {
		t.Fatalf("consumers left after the read: %+v %v", info.State, err)
	}
}

// TestACancelledReadStops: a read waiting for the bus stops when its
// context ends, not at some deadline later (a provisioner or agent told to
// stop would hang); one whose chunks went while it read fails at once.
func TestACancelledReadStops(t *testing.T) {
	js, _, _, _, srv := stores(t)
	ctx, cancel := context.WithCancel(context.Background())
	r, err := Open(ctx, js, bucket, "big", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := io.ReadFull(r, make([]byte, 1000)); err != nil {
		t.Fatal(err)
	}
	// The bus goes away: the read waits for it.
	srv.Shutdown()
	done := make(chan error, 1)
	go func() { _, err := io.Copy(io.Discard, r); done <- err }()
	select {
	case err := <-done:
		t.Fatalf("the read did not wait for the bus: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("a cancelled read ended with %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a cancelled read still waits")
	}
}

// TestAReadWhoseChunksGoFailsAtOnce: the chunks still to come were purged
// (the object was replaced): the read fails with ErrIncomplete, without
// waiting for its idle time.
func TestAReadWhoseChunksGoFailsAtOnce(t *testing.T) {
	js, obs, _ := store(t)
	r, err := Open(context.Background(), js, bucket, "big", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := io.ReadFull(r, make([]byte, 1000)); err != nil {
		t.Fatal(err)
	}
	info, err := obs.GetInfo(context.Background(), "big")
	if err != nil {
		t.Fatal(err)
	}
	purge(t, js, chunkSubject(bucket, info.NUID), 0)
	done := make(chan error, 1)
	go func() { _, err := io.Copy(io.Discard, r); done <- err }()
	select {
	case err := <-done:
		if !errors.Is(err, ErrIncomplete) {
			t.Fatalf("a read whose chunks went ended with %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a read whose chunks went still waits")
	}
}

// TestWhatTheStoreCannotGiveBackWhole: an object missing chunks is refused
// at once (ErrIncomplete); one whose chunks were replaced reads as corrupted
// (ErrCorrupt), never as a short or a wrong object.
func TestWhatTheStoreCannotGiveBackWhole(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		damage func(t *testing.T, js jetstream.JetStream, chunks string, n uint32)
		want   error
	}{
		{"a chunk lost", func(t *testing.T, js jetstream.JetStream, chunks string, n uint32) {
			purge(t, js, chunks, uint64(n)-1)
		}, ErrIncomplete},
		{"chunks replaced by others as long", func(t *testing.T, js jetstream.JetStream, chunks string, n uint32) {
			purge(t, js, chunks, 0)
			other := make([]byte, (3<<20)/int(n)) // the object's chunks are all the same size
			for range n {
				if _, err := rand.Read(other); err != nil {
					t.Fatal(err)
				}
				if _, err := js.Publish(ctx, chunks, other); err != nil {
					t.Fatal(err)
				}
			}
		}, ErrCorrupt},
		{"chunks replaced by shorter ones", func(t *testing.T, js jetstream.JetStream, chunks string, n uint32) {
			purge(t, js, chunks, 0)
			for range n {
				if _, err := js.Publish(ctx, chunks, []byte("other bytes")); err != nil {
					t.Fatal(err)
				}
			}
		}, ErrCorrupt},
	} {
		t.Run(tc.name, func(t *testing.T) {
			js, normal, obs, _, _ := stores(t)
			info, err := obs.GetInfo(ctx, "big")
			if err != nil {
				t.Fatal(err)
			}
			tc.damage(t, normal, chunkSubject(bucket, info.NUID), info.Chunks)
			r, err := Open(ctx, js, bucket, "big", 10*time.Second)
			if err == nil {
				_, err = io.Copy(io.Discard, r)
				r.Close()
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
	js, _, _ := store(t)
	if _, err := Open(ctx, js, bucket, "nope", time.Second); !errors.Is(err, jetstream.ErrObjectNotFound) {
		t.Fatalf("a missing object: %v", err)
	}
}

func purge(t *testing.T, js jetstream.JetStream, subject string, keep uint64) {
	t.Helper()
	stream, err := js.Stream(context.Background(), "OBJ_"+bucket)
	if err != nil {
		t.Fatal(err)
	}
	opts := []jetstream.StreamPurgeOpt{jetstream.WithPurgeSubject(subject)}
	if keep > 0 {
		opts = append(opts, jetstream.WithPurgeKeep(keep))
	}
	if err := stream.Purge(context.Background(), opts...); err != nil {
		t.Fatal(err)
	}
}

// TestPutChunksBySize: an object larger than SmallObject goes in chunks
// all 4,000 of which the bus's ingest queue holds; a smaller one in the
// client's default chunks; a chunk size the caller set is kept. Each reads
// back whole through Open.
func TestPutChunksBySize(t *testing.T) {
	ctx := context.Background()
	_, js, obs, body, _ := stores(t)
	if got := uint64(4000 * LargeChunk); got > 128<<20 {
		t.Fatalf("4,000 large chunks are %d bytes, more than the bus's 128 MiB ingest queue", got)
	}
	for _, c := range []struct {
		name      string
		size      int64 // the size Put is told
		opts      *jetstream.ObjectMetaOptions
		wantChunk uint32
	}{
		{"small", int64(len(body)), nil, SmallChunk},
		{"at-the-bound", SmallObject, nil, SmallChunk},
		{"large", SmallObject + 1, nil, LargeChunk},
		{"callers-own", SmallObject + 1, &jetstream.ObjectMetaOptions{ChunkSize: 64 << 10}, 64 << 10},
	} {
		t.Run(c.name, func(t *testing.T) {
			info, err := Put(ctx, obs, jetstream.ObjectMeta{Name: c.name, Opts: c.opts}, bytes.NewReader(body), c.size)
			if err != nil {
				t.Fatal(err)
			}
			want := (len(body) + int(c.wantChunk) - 1) / int(c.wantChunk)
			if info.Opts == nil || info.Opts.ChunkSize != c.wantChunk || int(info.Chunks) != want {
				t.Fatalf("put in %d chunks of %v, want %d of %d", info.Chunks, info.Opts, want, c.wantChunk)
			}
			r, err := Open(ctx, js, bucket, c.name, time.Minute)
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(r)
			if err != nil || !bytes.Equal(got, body) {
				t.Fatalf("read back %d bytes (%v), want the %d put", len(got), err, len(body))
			}
		})
	}
}

// strayingReader hands Put one chunk per Read and, before every other
// one, publishes a message of another object into the store's stream on
// the same connection, so that the object's chunks are not one after the
// other in the stream (as when Puts run side by side).
type strayingReader struct {
	r     io.Reader
	chunk int
	reads int
	stray func() error
}

func (s *strayingReader) Read(p []byte) (int, error) {
	s.reads++
	if s.reads%2 == 0 {
		if err := s.stray(); err != nil {
			return 0, err
		}
	}
	return s.r.Read(p[:min(len(p), s.chunk)])
}

// TestAReadOfChunksNotSideBySide: the gets Open starts ahead assume the
// chunks follow one another; where others sit between them, the object
// still reads back whole and in order.
func TestAReadOfChunksNotSideBySide(t *testing.T) {
	ctx := context.Background()
	srv := bustest.RunBare(t)
	nc := srv.Connect(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	obs, err := js.CreateObjectStore(ctx, jetstream.ObjectStoreConfig{Bucket: bucket})
	if err != nil {
		t.Fatal(err)
	}
	body := make([]byte, 200<<10)
	if _, err := rand.Read(body); err != nil {
		t.Fatal(err)
	}
	const chunk = 1 << 10
	stray := chunkSubject(bucket, "stray")
	r := &strayingReader{r: bytes.NewReader(body), chunk: chunk, stray: func() error { return nc.Publish(stray, []byte("not yours")) }}
	info, err := obs.Put(ctx, jetstream.ObjectMeta{Name: "spread", Opts: &jetstream.ObjectMetaOptions{ChunkSize: chunk}}, r)
	if err != nil {
		t.Fatal(err)
	}
	st, err := js.Stream(ctx, "OBJ_"+bucket)
	if err != nil {
		t.Fatal(err)
	}
	si, err := st.Info(ctx, jetstream.WithSubjectFilter(stray))
	if err != nil || si.State.Subjects[stray] < uint64(info.Chunks)/3 {
		t.Fatalf("%v strays among %d chunks (%v): the chunks are not spread", si.State.Subjects, info.Chunks, err)
	}
	rd, err := Open(ctx, js, bucket, "spread", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	got, err := io.ReadAll(rd)
	if err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read back %d bytes (%v), want the %d put", len(got), err, len(body))
	}
}
