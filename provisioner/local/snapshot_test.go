package local

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/fleetmanager/fm/agent"
	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/internal/tarball"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
	"github.com/fleetmanager/fm/provisioner/archive"
	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
)

// TestSnapshotAndRestore takes a snapshot of a volume, changes the volume,
// restores it byte for byte, and refuses a corrupted or missing archive
// without touching the volume.
func TestSnapshotAndRestore(t *testing.T) {
	srv := bustest.Run(t)
	ctx := context.Background()
	store, err := archive.NewObjectStore(ctx, srv.JetStream(t))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	arch := &faultyArchives{Archives: store}
	b, err := New(Config{Dir: dir, AgentBinary: binary(t), NATSURL: srv.URL(), Archives: arch, SecretKey: seal.NewKey(), Logger: zerolog.Nop(),
		ProgressEvery: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.stopMachine(ctx, "in-local1") })
	var steps []string
	st, err := b.Reprovision(ctx, request("op-1-reprovision", protocol.ProvisionReprovision, &steps), protocol.MachineState{})
	if err != nil {
		t.Fatal(err)
	}
	st.RequestID = "op-1-reprovision"
	vol := b.volumeDir("in-local1")
	write := func(name, content string) {
		t.Helper()
		p := filepath.Join(vol, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	read := func(name string) string {
		b, _ := os.ReadFile(filepath.Join(vol, name))
		return string(b)
	}
	gzipped := func(users string) []byte {
		t.Helper()
		src := t.TempDir()
		if err := os.MkdirAll(filepath.Join(src, "dataiku/dss_data/config"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(src, "dataiku/dss_data/config/users.json"), []byte(users), 0o640); err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		if err := tarball.Write(&buf, src, tarball.Gzip); err != nil {
			t.Fatal(err)
		}
		return buf.Bytes()
	}
	write("dataiku/dss_data/config/users.json", "v1 users")
	write("dataiku/dss_data/projects/P1/params.json", "v1 project")
	if err := os.Symlink("projects/P1", filepath.Join(vol, "dataiku/dss_data/current")); err != nil {
		t.Fatal(err)
	}

	snapReq := request("op-2-snapshot", protocol.ProvisionSnapshot, &steps)
	var ongoing []string
	snapReq.Ongoing = func(step, msg string) { ongoing = append(ongoing, step+": "+msg) }
	ref, err := b.Snapshot(ctx, snapReq, st, protocol.SnapshotRef{ID: "snap-1"})
	if err != nil {
		t.Fatal(err)
	}
	// The upload says how far it got (here at every read).
	if len(ongoing) == 0 || !strings.HasPrefix(ongoing[len(ongoing)-1], "upload: snapshot archive to object-store: ") ||
		!strings.HasSuffix(ongoing[len(ongoing)-1], "(100%)") {
		t.Fatalf("the upload's progress: %q", ongoing)
	}
	if ref.Store != "object-store" || ref.Ref != "in-local1/snap-1.tar.zst.sealed" || len(ref.SHA256) != 64 || ref.SizeBytes == 0 {
		t.Fatalf("snapshot %+v", ref)
	}
	if !strings.Contains(strings.Join(steps, "|"), "processes paused") {
		t.Fatalf("steps %v", steps)
	}
	// The archive is sealed: nothing of the volume is in it in clear.
	if rc, err := store.Open(ctx, ref.Ref); err != nil {
		t.Fatal(err)
	} else {
		stored, err := io.ReadAll(rc)
		rc.Close()
		if err != nil || !bytes.HasPrefix(stored, seal.StreamMagic()) || bytes.Contains(stored, []byte("v1 users")) || bytes.Contains(stored, []byte("users.json")) {
			t.Fatalf("the stored archive (%d bytes, %v) is not sealed", len(stored), err)
		}
	}
	// Without FM's secret key, no snapshot (and a restore of a sealed one
	// fails, changing nothing).
	keyless := *b
	keyless.cfg.SecretKey = nil
	if _, err := keyless.Snapshot(ctx, snapReq, st, protocol.SnapshotRef{ID: "snap-nokey"}); err == nil || !strings.Contains(err.Error(), "secret key") {
		t.Fatalf("a snapshot without the secret key: %v", err)
	}

	restore := func(id string, snap protocol.SnapshotRef) (protocol.MachineState, error) {
		req := request(id, protocol.ProvisionReprovision, &steps)
		req.FromSnapshot = &snap
		return b.Reprovision(ctx, req, st)
	}

	// Taken again (a redelivery) over an archive a failed Put left broken:
	// the archive is replaced, and the digest reported is the new one's.
	arch.openErr = fmt.Errorf("%w: in-local1/snap-1.tar.zst.sealed has 1 of its 2 chunks", archive.ErrIncomplete)
	again, err := b.Snapshot(ctx, snapReq, st, protocol.SnapshotRef{ID: "snap-1"})
	arch.openErr = nil
	if err != nil || !strings.Contains(strings.Join(steps, "|"), "not whole") {
		t.Fatalf("snapshot over a broken archive: %v %v", err, steps)
	}
	if stored, found, err := b.storedArchive(ctx, ref.Ref, protocol.SnapshotRef{ID: "snap-1"}, st); err != nil || !found || stored.SHA256 != again.SHA256 {
		t.Fatalf("stored archive %+v %v %v, reported %+v", stored, found, err, again)
	}
	ref = again

	write("dataiku/dss_data/config/users.json", "v2 users")
	write("dataiku/dss_data/projects/P2/params.json", "new project")
	tests := []struct {
		name     string
		snap     func() protocol.SnapshotRef
		cutShort bool // the store fails part-way through the read
		code     protocol.Code
	}{
		{"wrong digest", func() protocol.SnapshotRef { r := ref; r.SHA256 = strings.Repeat("0", 64); return r }, false, protocol.CodeDataLoss},
		{"missing archive", func() protocol.SnapshotRef { r := ref; r.Ref = "in-local1/nope.tar.gz"; return r }, false, protocol.CodeDataLoss},
		{"another store", func() protocol.SnapshotRef { r := ref; r.Store = "s3"; return r }, false, protocol.CodeFailedPrecondition},
		// Under a sealed archive's name, only a sealed archive is read: a
		// gzipped tar put there is refused before anything is extracted.
		{"a gzipped tar under a sealed name", func() protocol.SnapshotRef {
			r := ref
			r.Ref = "in-local1/planted.tar.zst.sealed"
			planted := gzipped("planted users")
			if err := store.Put(ctx, r.Ref, bytes.NewReader(planted)); err != nil {
				t.Fatal(err)
			}
			r.SHA256 = sha256Hex(planted) // even with its digest on record
			return r
		}, false, protocol.CodeDataLoss},
		// Sealed for its own name: the same bytes under another name do not
		// open (the digest matches, the seal does not).
		{"moved to another name", func() protocol.SnapshotRef {
			r := ref
			r.Ref = "in-local1/moved.tar.zst.sealed"
			rc, err := store.Open(ctx, ref.Ref)
			if err != nil {
				t.Fatal(err)
			}
			defer rc.Close()
			body, _ := io.ReadAll(rc)
			if err := store.Put(ctx, r.Ref, bytes.NewReader(body)); err != nil {
				t.Fatal(err)
			}
			return r
		}, false, protocol.CodeDataLoss},
		// Not corrupted: it may pass, and is tried again.
		{"read cut short", func() protocol.SnapshotRef { return ref }, true, protocol.CodeUnavailable},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			arch.cutShort = tc.cutShort
			defer func() { arch.cutShort = false }()
			_, err := restore("op-bad-reprovision", tc.snap())
			var pe *protocol.Error
			if !provisioner.IsUntouched(err) || !errors.As(err, &pe) || pe.Code != tc.code {
				t.Fatalf("restore: %v", err)
			}
			if read("dataiku/dss_data/config/users.json") != "v2 users" || len(b.agentPIDs()) != 1 {
				t.Fatal("a refused restore changed the instance")
			}
		})
	}

	st, err = restore("op-3-reprovision", ref)
	if err != nil {
		t.Fatal(err)
	}
	if read("dataiku/dss_data/config/users.json") != "v1 users" || read("dataiku/dss_data/projects/P1/params.json") != "v1 project" {
		t.Fatal("the restored volume is not the snapshot's")
	}
	if _, err := os.Stat(filepath.Join(vol, "dataiku/dss_data/projects/P2")); !os.IsNotExist(err) {
		t.Fatal("a file made after the snapshot survived the restore")
	}
	if target, _ := os.Readlink(filepath.Join(vol, "dataiku/dss_data/current")); target != "projects/P1" {
		t.Fatalf("symlink restored as %q", target)
	}
	if info, _ := os.Stat(filepath.Join(vol, "dataiku/dss_data/config/users.json")); info.Mode().Perm() != 0o640 {
		t.Fatalf("mode %v", info.Mode())
	}
	prev := b.previousVolumeDir("in-local1")
	if got, _ := os.ReadFile(filepath.Join(prev, "dataiku/dss_data/config/users.json")); string(got) != "v2 users" || st.Details["previousVolume"] != prev {
		t.Fatalf("the replaced volume was not kept aside: %q %+v", got, st.Details)
	}
	// A redelivery of the restore keeps the restored volume and the one aside.
	st.RequestID = "op-3-reprovision"
	b.stopMachine(ctx, "in-local1")
	if _, err := restore("op-3-reprovision", ref); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(filepath.Join(prev, "dataiku/dss_data/config/users.json")); string(got) != "v2 users" || read("dataiku/dss_data/config/users.json") != "v1 users" {
		t.Fatal("a redelivered restore lost a volume")
	}

	// Growth raises the nominal size the agent measures against.
	grown, err := b.GrowVolume(ctx, request("op-3b-grow-volume", protocol.ProvisionGrowVolume, &steps), st, 7)
	if err != nil || grown.VolumeSizeGB != 7 {
		t.Fatalf("grow: %+v %v", grown, err)
	}
	if cfg, err := agent.LoadConfigFile(b.configPath("in-local1")); err != nil || cfg.DataVolumeBytes != 7<<30 {
		t.Fatalf("agent config after growth: %+v %v", cfg, err)
	}

	// Snapshots an FM from before zstd took are gzipped tars named .tar.gz.
	// A redelivery of one finds it rather than taking another under the
	// new name, and a restore reads it.
	legacy := gzipped("gzip-era users")
	if err := store.Put(ctx, "in-local1/snap-gz.tar.gz", bytes.NewReader(legacy)); err != nil {
		t.Fatal(err)
	}
	old, err := b.Snapshot(ctx, snapReq, st, protocol.SnapshotRef{ID: "snap-gz"})
	if err != nil || old.Ref != "in-local1/snap-gz.tar.gz" || old.SHA256 != sha256Hex(legacy) {
		t.Fatalf("a redelivered snapshot over a gzipped archive: %+v %v", old, err)
	}
	if _, err := store.Open(ctx, "in-local1/snap-gz.tar.zst.sealed"); !errors.Is(err, archive.ErrNotFound) {
		t.Fatalf("another archive was taken beside the gzipped one: %v", err)
	}
	if st, err = restore("op-3c-reprovision", old); err != nil || read("dataiku/dss_data/config/users.json") != "gzip-era users" {
		t.Fatalf("restore of a gzipped archive: %v, users %q", err, read("dataiku/dss_data/config/users.json"))
	}
	// One whose Put an old FM left part-way goes, and the snapshot is taken
	// anew in today's name and format.
	if err := store.Put(ctx, "in-local1/snap-gz2.tar.gz", bytes.NewReader(legacy)); err != nil {
		t.Fatal(err)
	}
	arch.openErr, arch.openErrName = fmt.Errorf("%w: 1 of 2 chunks", archive.ErrIncomplete), "in-local1/snap-gz2.tar.gz"
	retaken, err := b.Snapshot(ctx, snapReq, st, protocol.SnapshotRef{ID: "snap-gz2"})
	arch.openErr, arch.openErrName = nil, ""
	if err != nil || retaken.Ref != "in-local1/snap-gz2.tar.zst.sealed" {
		t.Fatalf("taken over a broken gzipped archive: %+v %v", retaken, err)
	}
	if _, err := store.Open(ctx, "in-local1/snap-gz2.tar.gz"); !errors.Is(err, archive.ErrNotFound) {
		t.Fatalf("the broken gzipped archive is still in the store: %v", err)
	}

	// A corrupted archive in the store is refused.
	if err := store.Put(ctx, ref.Ref, strings.NewReader("not the archive")); err != nil {
		t.Fatal(err)
	}
	if _, err := restore("op-4-reprovision", ref); !provisioner.IsUntouched(err) || !strings.Contains(err.Error(), "corrupted") {
		t.Fatalf("corrupted archive: %v", err)
	}
	if err := b.DeleteSnapshot(ctx, snapReq, ref); err != nil {
		t.Fatal(err)
	}
	if _, err := store.Open(ctx, ref.Ref); err == nil {
		t.Fatal("the archive survived its deletion")
	}
}

// faultyArchives is a snapshot store whose Open fails with openErr (for
// every archive, or openErrName's), and
// whose reads fail part-way when cutShort, as the store's client does when
// the store is slow or out of reach.
type faultyArchives struct {
	Archives
	openErr     error
	openErrName string // if set, openErr is only for this archive
	cutShort    bool
}

func (f *faultyArchives) Open(ctx context.Context, name string) (io.ReadCloser, error) {
	if f.openErr != nil && (f.openErrName == "" || f.openErrName == name) {
		return nil, f.openErr
	}
	rc, err := f.Archives.Open(ctx, name)
	if err != nil || !f.cutShort {
		return rc, err
	}
	return struct {
		io.Reader
		io.Closer
	}{io.MultiReader(io.LimitReader(rc, 100), iotest.ErrReader(fmt.Errorf("read archive %s: %w", name, nats.ErrTimeout))), rc}, nil
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func (b *Backend) agentPIDs() []int {
	return cmdline.Find(b.configPath("in-local1"), "agent")
}
