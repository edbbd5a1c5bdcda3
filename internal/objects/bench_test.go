package objects

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/nats-io/nats.go/jetstream"
)

// BenchmarkRead reads a 64 MiB object (512 chunks of 128 KiB) through
// Open's direct gets, and through the client's own ObjectStore.Get (an
// ordered consumer, which an agent may not make) for comparison; and the
// same bytes in the chunks Put gives an object above SmallObject
// (LargeChunk), through direct gets.
func BenchmarkRead(b *testing.B) {
	ctx := context.Background()
	srv := bustest.RunBare(b)
	js := srv.JetStream(b)
	obs, err := js.CreateObjectStore(ctx, jetstream.ObjectStoreConfig{Bucket: bucket})
	if err != nil {
		b.Fatal(err)
	}
	body := make([]byte, 64<<20)
	if _, err := rand.Read(body); err != nil {
		b.Fatal(err)
	}
	if _, err := obs.Put(ctx, jetstream.ObjectMeta{Name: "big"}, bytes.NewReader(body)); err != nil {
		b.Fatal(err)
	}
	if _, err := Put(ctx, obs, jetstream.ObjectMeta{Name: "big-large-object-chunks"}, bytes.NewReader(body), SmallObject+1); err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		name string
		open func() (io.ReadCloser, error)
	}{
		{"direct-gets", func() (io.ReadCloser, error) { return Open(ctx, js, bucket, "big", time.Minute) }},
		{"ordered-consumer", func() (io.ReadCloser, error) { return obs.Get(ctx, "big") }},
		{"direct-gets-large-object-chunks", func() (io.ReadCloser, error) {
			return Open(ctx, js, bucket, "big-large-object-chunks", time.Minute)
		}},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(int64(len(body)))
			for b.Loop() {
				r, err := c.open()
				if err != nil {
					b.Fatal(err)
				}
				if n, err := io.Copy(io.Discard, r); err != nil || n != int64(len(body)) {
					b.Fatalf("read %d bytes: %v", n, err)
				}
				r.Close()
			}
		})
	}
}
