package archive

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner/ec2/mototest"
	"github.com/nats-io/nats.go/jetstream"
)

type store interface {
	Name() string
	Put(ctx context.Context, name string, r io.ReadSeeker) error
	Open(ctx context.Context, name string) (io.ReadCloser, error)
	Delete(ctx context.Context, name string) error
}

// TestStores runs the same checks on the object store and on S3 (moto).
func TestStores(t *testing.T) {
	ctx := context.Background()
	stores := map[string]func(t *testing.T) store{
		"object-store": func(t *testing.T) store {
			js := bustest.Run(t).JetStream(t)
			if err := bus.DefaultTopology().Declare(ctx, js); err != nil {
				t.Fatal(err)
			}
			st, err := NewObjectStore(ctx, js)
			if err != nil {
				t.Fatal(err)
			}
			return st
		},
		"s3": func(t *testing.T) store {
			m := mototest.Run(t)
			m.SetEnv(t)
			st, err := NewS3(ctx, S3Config{Bucket: "fm-snapshots", Prefix: "fm/", Region: mototest.Region, Endpoint: m.URL})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := st.client.(*s3.Client).CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String("fm-snapshots")}); err != nil {
				t.Fatal(err)
			}
			return st
		},
	}
	for name, open := range stores {
		t.Run(name, func(t *testing.T) {
			st := open(t)
			if st.Name() != name {
				t.Fatalf("name %q", st.Name())
			}
			body := strings.Repeat("archive bytes ", 100000)
			if err := st.Put(ctx, "in-1/snap-1.tar.gz", strings.NewReader(body)); err != nil {
				t.Fatal(err)
			}
			rc, err := st.Open(ctx, "in-1/snap-1.tar.gz")
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(rc)
			rc.Close()
			if err != nil || string(got) != body {
				t.Fatalf("read back %d bytes, %v", len(got), err)
			}
			if _, err := st.Open(ctx, "in-1/nope.tar.gz"); !errors.Is(err, ErrNotFound) {
				t.Fatalf("missing archive: %v", err)
			}
			if err := st.Delete(ctx, "in-1/snap-1.tar.gz"); err != nil {
				t.Fatal(err)
			}
			if err := st.Delete(ctx, "in-1/snap-1.tar.gz"); err != nil {
				t.Fatalf("deleting twice: %v", err)
			}
			if _, err := st.Open(ctx, "in-1/snap-1.tar.gz"); !errors.Is(err, ErrNotFound) {
				t.Fatalf("deleted archive: %v", err)
			}
		})
	}
}

// objectStore is an ObjectStore on a fresh bus, and one on the same bus
// whose client's default API timeout is timeout.
func objectStore(t *testing.T, timeout time.Duration) (st, short *ObjectStore, js jetstream.JetStream) {
	t.Helper()
	ctx := context.Background()
	srv := bustest.Run(t)
	js = srv.JetStream(t)
	if err := bus.DefaultTopology().Declare(ctx, js); err != nil {
		t.Fatal(err)
	}
	shortJS, err := jetstream.New(srv.Connect(t), jetstream.WithDefaultTimeout(timeout))
	if err != nil {
		t.Fatal(err)
	}
	if st, err = NewObjectStore(ctx, js); err != nil {
		t.Fatal(err)
	}
	if short, err = NewObjectStore(ctx, shortJS); err != nil {
		t.Fatal(err)
	}
	return st, short, js
}

// TestAnArchiveReadOutlastsTheClientTimeout: reading a large archive on a
// busy machine takes longer than the client's default API timeout, which
// bounded the whole read (a restore then took the cut-short archive for a
// corrupted one).
func TestAnArchiveReadOutlastsTheClientTimeout(t *testing.T) {
	ctx := context.Background()
	st, short, _ := objectStore(t, 300*time.Millisecond)
	body := make([]byte, 3<<20)
	if _, err := rand.Read(body); err != nil {
		t.Fatal(err)
	}
	if err := st.Put(ctx, "in-1/snap-1.tar.gz", bytes.NewReader(body)); err != nil {
		t.Fatal(err)
	}
	rc, err := short.Open(ctx, "in-1/snap-1.tar.gz")
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	first := make([]byte, 1000)
	if _, err := io.ReadFull(rc, first); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // a slow reader: longer than the client's timeout
	rest, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("read after a pause: %v", err)
	}
	if got := append(first, rest...); !bytes.Equal(got, body) {
		t.Fatalf("read back %d bytes, not what was put", len(got))
	}
}

// TestAnIncompleteArchiveIsRefused: an archive whose description is in the
// store but whose chunks are not (a Put cut short) is refused at once as
// incomplete, rather than read until the deadline.
func TestAnIncompleteArchiveIsRefused(t *testing.T) {
	ctx := context.Background()
	st, _, js := objectStore(t, 5*time.Second)
	if err := st.Put(ctx, "in-1/snap-1.tar.gz", strings.NewReader(strings.Repeat("archive bytes ", 100000))); err != nil {
		t.Fatal(err)
	}
	info, err := st.store.GetInfo(ctx, "in-1/snap-1.tar.gz")
	if err != nil {
		t.Fatal(err)
	}
	stream, err := js.Stream(ctx, "OBJ_"+protocol.ObjectStoreSnapshots)
	if err != nil {
		t.Fatal(err)
	}
	// One chunk lost.
	if err := stream.Purge(ctx, jetstream.WithPurgeSubject("$O."+protocol.ObjectStoreSnapshots+".C."+info.NUID), jetstream.WithPurgeKeep(uint64(info.Chunks)-1)); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Open(ctx, "in-1/snap-1.tar.gz"); !errors.Is(err, ErrIncomplete) {
		t.Fatalf("open of an incomplete archive: %v", err)
	}
	// Put again, it is whole again.
	if err := st.Put(ctx, "in-1/snap-1.tar.gz", strings.NewReader("whole")); err != nil {
		t.Fatal(err)
	}
	rc, err := st.Open(ctx, "in-1/snap-1.tar.gz")
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || string(got) != "whole" {
		t.Fatalf("read back %q, %v", got, err)
	}
}

// countingReader counts, in active, the readers being read at once, and
// keeps in most the largest count seen.
type countingReader struct {
	io.ReadSeeker
	active, most *atomic.Int32
	started      bool
}

func (c *countingReader) Read(p []byte) (int, error) {
	if !c.started {
		c.started = true
		n := c.active.Add(1)
		for m := c.most.Load(); n > m && !c.most.CompareAndSwap(m, n); m = c.most.Load() {
		}
		// Long enough for a Put beside it to start reading if it may.
		time.Sleep(50 * time.Millisecond)
	}
	n, err := c.ReadSeeker.Read(p)
	if err == io.EOF {
		c.active.Add(-1)
	}
	return n, err
}

// TestPutsTakeTurns: archives put at once (snapshots of several instances)
// go into the store one after the other, so that their chunks in flight
// together stay within what the bus's ingest queue holds; each is whole,
// read from where its reader stood.
func TestPutsTakeTurns(t *testing.T) {
	ctx := context.Background()
	st, _, _ := objectStore(t, 5*time.Second)
	var active, most atomic.Int32
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := bytes.NewReader([]byte(fmt.Sprintf("skip-%d|archive %d", i, i)))
			_, _ = r.Seek(int64(len(fmt.Sprintf("skip-%d|", i))), io.SeekStart)
			errs <- st.Put(ctx, fmt.Sprintf("in-%d/snap.tar.zst.sealed", i), &countingReader{ReadSeeker: r, active: &active, most: &most})
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if most.Load() != 1 {
		t.Fatalf("%d Puts read at once, want 1", most.Load())
	}
	for i := range 4 {
		rc, err := st.Open(ctx, fmt.Sprintf("in-%d/snap.tar.zst.sealed", i))
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(rc)
		rc.Close()
		if want := fmt.Sprintf("archive %d", i); err != nil || string(got) != want {
			t.Fatalf("archive %d reads %q (%v), want %q", i, got, err, want)
		}
	}
}
