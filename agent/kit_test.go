package agent

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/internal/objects"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// TestAKitFetchRemovesWhatAnInterruptedOneLeft: an agent killed while it
// downloaded or extracted a kit leaves a partial archive in the cache and a
// partial extraction beside the kits (each up to gigabytes); the next kit
// fetch removes them, and nothing else.
func TestAKitFetchRemovesWhatAnInterruptedOneLeft(t *testing.T) {
	m := newMachine(Config{Instance: "in-kit", RootDir: t.TempDir(), DataDir: t.TempDir()}, zerolog.Nop())
	k := &kits{m: m}
	stale := []string{
		filepath.Join(m.kitCache, ".0123abcd.tar.gz.4242"),    // a download from a URL
		filepath.Join(m.kitCache, ".object-dss-14.tar.gz.77"), // from the object store
		filepath.Join(m.kitRoot, ".extract-99", "dataiku-dss-14.0.0", "installer.sh"),
	}
	kept := []string{filepath.Join(m.kitCache, "object-dss-13.tar.gz"), filepath.Join(m.kitRoot, "other", "file")}
	for _, p := range append(stale, kept...) {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("partial"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := k.prepare(context.Background(), standinKit(t, "14.0.0"), nil); err != nil {
		t.Fatal(err)
	}
	for _, p := range stale {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s is left (%v)", p, err)
		}
	}
	for _, p := range kept {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s was removed: %v", p, err)
		}
	}
}

// slowStart is a kit being read whose reading begins some time after it
// was opened, as on a busy machine.
type slowStart struct {
	kitObject
	wait    time.Duration
	started bool
}

func (s *slowStart) Read(p []byte) (int, error) {
	if !s.started {
		time.Sleep(s.wait)
		s.started = true
	}
	return s.kitObject.Read(p)
}

// TestAKitReadOutlastsTheClientTimeout: a kit from the object store takes
// longer to read than the client's default API timeout, which bounded the
// whole read (every fetch of a real kit, gigabytes, failed). A read that
// long says how far it got.
func TestAKitReadOutlastsTheClientTimeout(t *testing.T) {
	ctx := context.Background()
	srv := bustest.Run(t)
	if err := bus.DefaultTopology().Declare(ctx, srv.JetStream(t)); err != nil {
		t.Fatal(err)
	}
	store, err := srv.JetStream(t).ObjectStore(ctx, protocol.ObjectStoreKits)
	if err != nil {
		t.Fatal(err)
	}
	src := standinKit(t, "14.0.0")
	f, err := os.Open(src.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	info, err := store.Put(ctx, jetstream.ObjectMeta{Name: "dataiku-dss-14.0.0-standin.tar.gz"}, f)
	if err != nil {
		t.Fatal(err)
	}
	js, err := jetstream.New(srv.Connect(t), jetstream.WithDefaultTimeout(200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	m := newMachine(Config{Instance: "in-kit", RootDir: t.TempDir(), DataDir: t.TempDir()}, zerolog.Nop())
	k := &kits{m: m, progressEvery: 100 * time.Millisecond, open: func(ctx context.Context, name string) (kitObject, error) {
		r, err := objects.Open(ctx, js, protocol.ObjectStoreKits, name, kitChunkWait)
		if err != nil {
			return nil, err
		}
		return &slowStart{kitObject: r, wait: 500 * time.Millisecond}, nil
	}}
	// A read slower than progressEvery says how far it got.
	var reports [][2]int64
	got, err := k.fetch(ctx, protocol.KitSource{Object: info.Name}, func(done, total int64) {
		reports = append(reports, [2]int64{done, total})
	})
	if err != nil {
		t.Fatalf("fetch: %v", err)
	}
	if len(reports) == 0 || reports[0][1] != int64(info.Size) || reports[0][0] <= 0 || reports[0][0] > reports[0][1] {
		t.Fatalf("progress of a %d-byte kit: %v", info.Size, reports)
	}

	if err := checkDigest(got, src.SHA256); err != nil {
		t.Fatal(err)
	}
}
