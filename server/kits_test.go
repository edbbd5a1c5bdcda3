package server_test

import (
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/fleetmanager/fm/internal/objects"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// TestAKitUploadCutShortIsMended: a kit whose upload was cut short after
// its description went in (the description of the whole file, not all of
// its chunks) is uploaded again at the next start, not taken for the same
// kit because its digest matches: agents would wait for it for ever.
func TestAKitUploadCutShortIsMended(t *testing.T) {
	f := start(t)
	ctx := context.Background()
	dir := t.TempDir()
	body := make([]byte, 1<<20)
	if _, err := rand.Read(body); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "dataiku-dss-14.0.0-mend.tar.gz"), body, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := f.env.Server.RegisterKits(ctx, dir); err != nil {
		t.Fatal(err)
	}
	js := f.env.Bus.JetStream(t)
	store, err := js.ObjectStore(ctx, protocol.ObjectStoreKits)
	if err != nil {
		t.Fatal(err)
	}
	info, err := store.GetInfo(ctx, "dataiku-dss-14.0.0-mend.tar.gz")
	if err != nil {
		t.Fatal(err)
	}
	stream, err := js.Stream(ctx, "OBJ_"+protocol.ObjectStoreKits)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Purge(ctx, jetstream.WithPurgeSubject("$O."+protocol.ObjectStoreKits+".C."+info.NUID), jetstream.WithPurgeKeep(1)); err != nil {
		t.Fatal(err)
	}
	if err := objects.Complete(ctx, js, protocol.ObjectStoreKits, info); err == nil {
		t.Fatal("the kit is still whole: nothing was cut short")
	}
	if _, err := f.env.Server.RegisterKits(ctx, dir); err != nil {
		t.Fatal(err)
	}
	info, err = store.GetInfo(ctx, "dataiku-dss-14.0.0-mend.tar.gz")
	if err != nil {
		t.Fatal(err)
	}
	if err := objects.Complete(ctx, js, protocol.ObjectStoreKits, info); err != nil {
		t.Fatalf("the kit was not uploaded again: %v", err)
	}
}
