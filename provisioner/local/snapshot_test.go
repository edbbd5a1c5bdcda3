package local

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/fleetmanager/fm/agent"
	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/internal/cmdline"
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
	b, err := New(Config{Dir: dir, AgentBinary: binary(t), NATSURL: srv.URL(), Archives: arch, Logger: zerolog.Nop()})
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
	write("dataiku/dss_data/config/users.json", "v1 users")
	write("dataiku/dss_data/projects/P1/params.json", "v1 project")
	if err := os.Symlink("projects/P1", filepath.Join(vol, "dataiku/dss_data/current")); err != nil {
		t.Fatal(err)
	}

	snapReq := request("op-2-snapshot", protocol.ProvisionSnapshot, &steps)
	ref, err := b.Snapshot(ctx, snapReq, st, protocol.SnapshotRef{ID: "snap-1"})
	if err != nil {
		t.Fatal(err)
	}
	if ref.Store != "object-store" || ref.Ref != "in-local1/snap-1.tar.gz" || len(ref.SHA256) != 64 || ref.SizeBytes == 0 {
		t.Fatalf("snapshot %+v", ref)
	}
	if !strings.Contains(strings.Join(steps, "|"), "processes paused") {
		t.Fatalf("steps %v", steps)
	}

	restore := func(id string, snap protocol.SnapshotRef) (protocol.MachineState, error) {
		req := request(id, protocol.ProvisionReprovision, &steps)
		req.FromSnapshot = &snap
		return b.Reprovision(ctx, req, st)
	}

	// Taken again (a redelivery) over an archive a failed Put left broken:
	// the archive is replaced, and the digest reported is the new one's.
	arch.openErr = fmt.Errorf("%w: in-local1/snap-1.tar.gz has 1 of its 2 chunks", archive.ErrIncomplete)
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

// faultyArchives is a snapshot store whose Open fails with openErr, and
// whose reads fail part-way when cutShort, as the store's client does when
// the store is slow or out of reach.
type faultyArchives struct {
	Archives
	openErr  error
	cutShort bool
}

func (f *faultyArchives) Open(ctx context.Context, name string) (io.ReadCloser, error) {
	if f.openErr != nil {
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

func (b *Backend) agentPIDs() []int {
	return cmdline.Find(b.configPath("in-local1"), "agent")
}

// TestSyncTreeCatchesEveryChange: the paused second pass of a snapshot's
// copy brings the copy in line with every change made after the first.
func TestSyncTreeCatchesEveryChange(t *testing.T) {
	src, dst := t.TempDir(), filepath.Join(t.TempDir(), "copy")
	put := func(name, content string) {
		t.Helper()
		p := filepath.Join(src, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	put("same.txt", "unchanged")
	put("rewritten.txt", "aaaa")
	put("gone.txt", "deleted later")
	put("dir/gone/x", "a folder deleted later")
	os.Symlink("same.txt", filepath.Join(src, "link"))
	stamps := map[string]fileStamp{}
	if err := syncTree(src, dst, stamps); err != nil {
		t.Fatal(err)
	}
	// Changes made while the first pass ran, or after it.
	put("rewritten.txt", "bbbb") // same size
	put("new/file.txt", "new")
	os.Remove(filepath.Join(src, "gone.txt"))
	os.RemoveAll(filepath.Join(src, "dir", "gone"))
	os.Remove(filepath.Join(src, "link"))
	os.Symlink("new/file.txt", filepath.Join(src, "link"))
	if err := syncTree(src, dst, stamps); err != nil {
		t.Fatal(err)
	}
	var srcTree, dstTree []string
	for _, side := range []struct {
		root string
		into *[]string
	}{{src, &srcTree}, {dst, &dstTree}} {
		filepath.WalkDir(side.root, func(p string, d fs.DirEntry, err error) error {
			rel, _ := filepath.Rel(side.root, p)
			content, _ := os.ReadFile(p)
			link, _ := os.Readlink(p)
			*side.into = append(*side.into, rel+"|"+string(content)+"|"+link)
			return nil
		})
	}
	if strings.Join(srcTree, "\n") != strings.Join(dstTree, "\n") {
		t.Fatalf("copy:\n%s\nsource:\n%s", strings.Join(dstTree, "\n"), strings.Join(srcTree, "\n"))
	}
}
