package backup

import (
	"bytes"
	"context"
	"errors"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

func sortedDump(t *testing.T, js jetstream.JetStream) string {
	lines := strings.Split(bustest.Dump(t, js), "\n")
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// TestBackupAndRestore fills FM's topology (buckets with history, updates
// and deletes, a multi-chunk object, a work queue and a stream with headers),
// backs it up, restores it on a fresh bus, and finds the same state.
func TestBackupAndRestore(t *testing.T) {
	ctx := context.Background()
	src := bustest.Run(t).JetStream(t)
	if err := bus.DefaultTopology().Declare(ctx, src); err != nil {
		t.Fatal(err)
	}
	kv, _ := src.KeyValue(ctx, protocol.BucketInstances)
	rev, _ := kv.Put(ctx, "in-1", []byte(`{"label":"one"}`))
	if _, err := kv.Update(ctx, "in-1", []byte(`{"label":"one, renamed"}`), rev); err != nil {
		t.Fatal(err)
	}
	kv.Put(ctx, "in-2", []byte(`{"label":"two"}`))
	kv.Delete(ctx, "in-2")
	ops, _ := src.KeyValue(ctx, protocol.BucketOps)
	ops.Put(ctx, "op-1", []byte(`{"state":"succeeded"}`))
	objects, _ := src.ObjectStore(ctx, protocol.ObjectStoreSnapshots)
	archive := bytes.Repeat([]byte("archive-bytes-"), 200000) // several chunks
	if _, err := objects.PutBytes(ctx, "in-1/snap-1.tar.gz", archive); err != nil {
		t.Fatal(err)
	}
	if _, err := src.Publish(ctx, protocol.ProvisionSubject("in-1", protocol.ProvisionReprovision), []byte(`{"id":"r1"}`)); err != nil {
		t.Fatal(err)
	}
	if _, err := src.Publish(ctx, protocol.EventSubject("in-1", protocol.EventMachine), []byte(`{"id":"e1"}`), jetstream.WithMsgID("e1")); err != nil {
		t.Fatal(err)
	}

	sessions, _ := src.KeyValue(ctx, protocol.BucketSessions)
	if _, err := sessions.Put(ctx, "0a1b", []byte(`{"keyId":"k"}`)); err != nil {
		t.Fatal(err)
	}

	var file bytes.Buffer
	m, err := Write(ctx, src, map[string][]byte{"secrets.key": []byte("key"), "nats-auth/operator.nk": []byte("seed")}, &file)
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Streams) == 0 || len(m.Files) != 2 {
		t.Fatalf("manifest %+v", m)
	}
	_, files, err := ReadFiles(bytes.NewReader(file.Bytes()))
	if err != nil || string(files["secrets.key"]) != "key" || string(files["nats-auth/operator.nk"]) != "seed" {
		t.Fatalf("files %v %v", files, err)
	}

	dst := bustest.Run(t).JetStream(t)
	if _, err := Restore(ctx, dst, bytes.NewReader(file.Bytes())); err != nil {
		t.Fatal(err)
	}
	// Every stream but the console's sessions, which a restored FM does
	// not take back.
	if st, err := dst.Stream(ctx, "KV_"+protocol.BucketSessions); err == nil {
		if n := st.CachedInfo().State.Msgs; n != 0 {
			t.Fatalf("the console's sessions were restored: %d", n)
		}
	} else if !errors.Is(err, jetstream.ErrStreamNotFound) {
		t.Fatal(err)
	}
	if err := sessions.Delete(ctx, "0a1b"); err != nil {
		t.Fatal(err)
	}
	if err := src.DeleteStream(ctx, "KV_"+protocol.BucketSessions); err != nil {
		t.Fatal(err)
	}
	if got, want := sortedDump(t, dst), sortedDump(t, src); got != want {
		t.Fatalf("restored state differs:\n%s\nwant\n%s", got, want)
	}
	kv2, _ := dst.KeyValue(ctx, protocol.BucketInstances)
	if e, err := kv2.Get(ctx, "in-1"); err != nil || string(e.Value()) != `{"label":"one, renamed"}` {
		t.Fatalf("in-1: %v", err)
	}
	if _, err := kv2.Get(ctx, "in-2"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("a deleted key came back: %v", err)
	}
	if h, _ := kv2.History(ctx, "in-1"); len(h) != 2 {
		t.Fatalf("history of in-1: %d revisions", len(h))
	}
	objects2, _ := dst.ObjectStore(ctx, protocol.ObjectStoreSnapshots)
	if got, err := objects2.GetBytes(ctx, "in-1/snap-1.tar.gz"); err != nil || !bytes.Equal(got, archive) {
		t.Fatalf("object: %d bytes, %v", len(got), err)
	}
	// A restored FM keeps working: a key's revision-checked update.
	e, _ := kv2.Get(ctx, "in-1")
	if _, err := kv2.Update(ctx, "in-1", []byte(`{}`), e.Revision()); err != nil {
		t.Fatal(err)
	}

	// A second restore onto the same bus is refused, and changes nothing.
	before := sortedDump(t, dst)
	if _, err := Restore(ctx, dst, bytes.NewReader(file.Bytes())); !errors.Is(err, ErrNotEmpty) {
		t.Fatalf("restore onto a used FM: %v", err)
	}
	if sortedDump(t, dst) != before {
		t.Fatal("a refused restore changed the bus")
	}
	if _, _, err := ReadFiles(strings.NewReader("not a backup")); err == nil {
		t.Fatal("a file that is not a backup was read")
	}
}

// TestBackupOfAStreamWhoseLastMessageIsGone: a stream whose last sequence
// was deleted (FM_LOGS after a purge of one source, a message aged out) is
// copied whole, up to the last message there is, instead of the backup
// waiting for a sequence that will never come and failing.
func TestBackupOfAStreamWhoseLastMessageIsGone(t *testing.T) {
	ctx := context.Background()
	src := bustest.Run(t).JetStream(t)
	for i, subject := range []string{"fm.log.in-1.agent", "fm.log.in-1.dss", "fm.log.in-2.agent"} {
		if _, err := src.Publish(ctx, subject, []byte{byte('a' + i)}); err != nil {
			t.Fatal(err)
		}
	}
	st, err := src.Stream(ctx, protocol.StreamLogs)
	if err != nil {
		t.Fatal(err)
	}
	// The last message goes, as a purge of its subject does.
	if err := st.Purge(ctx, jetstream.WithPurgeSubject("fm.log.in-2.agent")); err != nil {
		t.Fatal(err)
	}
	var file bytes.Buffer
	done := make(chan error, 1)
	go func() { _, err := Write(ctx, src, nil, &file); done <- err }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the backup never finished")
	}
	dst := bustest.Run(t).JetStream(t)
	if _, err := Restore(ctx, dst, bytes.NewReader(file.Bytes())); err != nil {
		t.Fatal(err)
	}
	if got, want := sortedDump(t, dst), sortedDump(t, src); got != want {
		t.Fatalf("restored state differs:\n%s\nwant\n%s", got, want)
	}
}

// TestRestoreRefusesANewerLayout: a backup of a bus a newer FM laid out (a
// stream stamped with a later layout) is refused when read, and a restore
// of it creates no stream: this FM could not start on what it would make.
func TestRestoreRefusesANewerLayout(t *testing.T) {
	ctx := context.Background()
	src := bustest.Run(t).JetStream(t)
	st, err := src.Stream(ctx, protocol.StreamAudit)
	if err != nil {
		t.Fatal(err)
	}
	cfg := st.CachedInfo().Config
	cfg.Metadata[bus.LayoutKey] = strconv.Itoa(bus.LayoutVersion + 1)
	if _, err := src.UpdateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	var file bytes.Buffer
	if _, err := Write(ctx, src, nil, &file); err != nil {
		t.Fatal(err)
	}
	if _, _, err := ReadFiles(bytes.NewReader(file.Bytes())); !errors.Is(err, bus.ErrNewerLayout) {
		t.Fatalf("read a newer layout's backup: %v", err)
	}
	dst := bustest.RunBare(t).JetStream(t)
	if _, err := Restore(ctx, dst, bytes.NewReader(file.Bytes())); !errors.Is(err, bus.ErrNewerLayout) {
		t.Fatalf("restore a newer layout's backup: %v", err)
	}
	for name := range dst.StreamNames(ctx).Name() {
		t.Errorf("the refused restore created stream %s", name)
	}
}
