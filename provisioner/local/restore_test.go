package local

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
	"github.com/fleetmanager/fm/provisioner/archive"
	"github.com/rs/zerolog"
)

// crashed is what the test's crash hook panics with: the backend call
// stops there, as a provisioner killed at that point would.
type crashed struct{ point string }

// TestAnUnfinishedRestoreIsLeftToItsOwnRequest: a restore that wrote its
// journal and then never finished (killed, then refused past its deadline
// or superseded: its request never comes back) is abandoned by the next
// request, which keeps the volume in place and the one an earlier restore
// kept aside; it is not silently finished. A move already under way is
// finished, whatever request comes, so that the volume in place is whole.
func TestAnUnfinishedRestoreIsLeftToItsOwnRequest(t *testing.T) {
	srv := bustest.Run(t)
	ctx := context.Background()
	store, err := archive.NewObjectStore(ctx, srv.JetStream(t))
	if err != nil {
		t.Fatal(err)
	}
	const (
		snapshotted = "v1: in the snapshot"
		keptEarlier = "v2: kept aside by the earlier restore"
		current     = "v3: the current data"
	)
	tests := []struct {
		name    string
		crashAt string // where the unfinished restore stopped
		next    func(req provisioner.Request, snap protocol.SnapshotRef) provisioner.Request
		// What the volume in place and the one kept aside hold after the
		// next request ("" for none).
		vol, kept string
	}{
		{name: "journal written, plain reprovision", crashAt: "local/reprovision/restore-journal:after",
			vol: current, kept: keptEarlier},
		{name: "earlier kept volume dropped, plain reprovision", crashAt: "local/reprovision/drop-earlier-kept-volume:after",
			vol: current},
		{name: "journal written, another restore", crashAt: "local/reprovision/restore-journal:after",
			next: func(req provisioner.Request, snap protocol.SnapshotRef) provisioner.Request {
				req.FromSnapshot = &snap
				return req
			},
			vol: snapshotted, kept: current},
		{name: "extracted but not recorded, plain reprovision", crashAt: "local/reprovision/extract-snapshot:after",
			vol: current, kept: keptEarlier},
		{name: "current volume kept aside, plain reprovision", crashAt: "local/reprovision/keep-volume-aside:after",
			vol: snapshotted, kept: current},
		{name: "restored volume in place, plain reprovision", crashAt: "local/reprovision/put-restored-volume:after",
			vol: snapshotted, kept: current},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			b, err := New(Config{Dir: dir, AgentBinary: binary(t), NATSURL: srv.URL(), Archives: store, SecretKey: seal.NewKey(), Logger: zerolog.Nop()})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { b.stopMachine(ctx, "in-local1") })
			var steps []string
			vol, users := b.volumeDir("in-local1"), filepath.Join("dataiku", "dss_data", "config", "users.json")
			write := func(content string) {
				t.Helper()
				p := filepath.Join(vol, users)
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			read := func(dir string) string {
				b, _ := os.ReadFile(filepath.Join(dir, users))
				return string(b)
			}
			st, err := b.Reprovision(ctx, request("op-1-reprovision", protocol.ProvisionReprovision, &steps), protocol.MachineState{})
			if err != nil {
				t.Fatal(err)
			}
			write(snapshotted)
			snap, err := b.Snapshot(ctx, request("op-2-snapshot", protocol.ProvisionSnapshot, &steps), st, protocol.SnapshotRef{ID: fmt.Sprintf("snap-%d", i)})
			if err != nil {
				t.Fatal(err)
			}
			restore := func(id string) provisioner.Request {
				req := request(id, protocol.ProvisionReprovision, &steps)
				req.FromSnapshot = &snap
				return req
			}
			write(keptEarlier)
			if st, err = b.Reprovision(ctx, restore("op-3-reprovision"), st); err != nil {
				t.Fatal(err)
			}
			write(current)

			// The restore that does not finish.
			b.crash = func(point string) {
				if point == tc.crashAt {
					panic(crashed{point})
				}
			}
			func() {
				defer func() {
					if r := recover(); r != (crashed{tc.crashAt}) {
						t.Fatalf("the restore stopped with %v, not at %s", r, tc.crashAt)
					}
				}()
				_, _ = b.Reprovision(ctx, restore("op-4-reprovision"), st)
			}()
			b.crash = nil

			next := request("op-5-reprovision", protocol.ProvisionReprovision, &steps)
			if tc.next != nil {
				next = tc.next(next, snap)
			}
			if _, err := b.Reprovision(ctx, next, st); err != nil {
				t.Fatal(err)
			}
			if got := read(vol); got != tc.vol {
				t.Errorf("the volume in place holds %q, want %q", got, tc.vol)
			}
			if got := read(b.previousVolumeDir("in-local1")); got != tc.kept {
				t.Errorf("the volume kept aside holds %q, want %q", got, tc.kept)
			}
			for _, p := range []string{b.stagingDir("in-local1"), b.journalPath("in-local1")} {
				if _, err := os.Stat(p); err == nil {
					t.Errorf("%s is left behind", filepath.Base(p))
				}
			}
			if n := len(b.agentPIDs()); n != 1 {
				t.Errorf("%d agents run, want 1", n)
			}
		})
	}
}
