package local

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/internal/tarball"
	"github.com/fleetmanager/fm/internal/tarball/tarzstd"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
	"github.com/fleetmanager/fm/provisioner/archive"
	"github.com/rs/zerolog"
)

// BenchmarkLocalSnapshot takes snapshots of a data volume of 64 MiB
// (FM_BENCH_SNAPSHOT_MIB) in files of 32 KiB (half random, half zeros), and
// reports how long the machine's processes stay paused (the catch-up pass of
// the live archive), how long an archive of the whole volume in one pass
// takes (what the pause would be without the first pass), the whole
// snapshot (the archive with its digest into a file, then into the bus's
// object store), and its floor: `tar -cf - DIR | zstd` of the same volume
// into a file. ns/op counts all four.
func BenchmarkLocalSnapshot(b *testing.B) {
	srv := bustest.Run(b)
	ctx := context.Background()
	store, err := archive.NewObjectStore(ctx, srv.JetStream(b))
	if err != nil {
		b.Fatal(err)
	}
	dir := b.TempDir()
	be, err := New(Config{Dir: dir, AgentBinary: "/bin/false", NATSURL: srv.URL(), Archives: store, SecretKey: seal.NewKey(), Logger: zerolog.Nop()})
	if err != nil {
		b.Fatal(err)
	}
	const inst = "in-bench"
	vol := be.volumeDir(inst)
	mib := 64
	if v := os.Getenv("FM_BENCH_SNAPSHOT_MIB"); v != "" {
		if mib, err = strconv.Atoi(v); err != nil || mib < 1 {
			b.Fatalf("FM_BENCH_SNAPSHOT_MIB=%q", v)
		}
	}
	if _, err := exec.LookPath("zstd"); err != nil {
		if os.Getenv("FM_REQUIRE_ZSTD") != "" {
			b.Fatal("the floor needs zstd, and FM_REQUIRE_ZSTD is set (CI installs it)")
		}
		b.Skip("the floor needs zstd")
	}
	random := make([]byte, 16<<10)
	for i := 0; i < mib*32; i++ {
		p := filepath.Join(vol, "dataiku", "dss_data", fmt.Sprintf("d%02d", i%64), fmt.Sprintf("f%04d", i))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			b.Fatal(err)
		}
		_, _ = rand.Read(random)
		if err := os.WriteFile(p, append(random, make([]byte, 16<<10)...), 0o644); err != nil {
			b.Fatal(err)
		}
	}
	cur := protocol.MachineState{Instance: inst, VolumeID: vol, VolumeSizeGB: 1}
	// A volume DSS has used for a while: nothing written within the window
	// the catch-up reads again whatever its timestamps say.
	if os.Getenv("FM_BENCH_SNAPSHOT_RECENT") == "" {
		time.Sleep(tarball.RecentWindow + time.Second)
	}
	var paused, full, whole, floor time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		_, pause, err := be.archiveLive(inst, vol, io.Discard, tarzstd.Codec)
		if err != nil {
			b.Fatal(err)
		}
		paused += pause
		// What the pause would be if the whole volume were archived paused.
		start := time.Now()
		if err := tarball.Write(io.Discard, vol, tarzstd.Codec); err != nil {
			b.Fatal(err)
		}
		full += time.Since(start)
		req := provisioner.Request{ProvisionRequest: protocol.ProvisionRequest{ID: "rq", Instance: inst}, Progress: func(string, string) {}}
		start = time.Now()
		if _, err := be.Snapshot(ctx, req, cur, protocol.SnapshotRef{ID: fmt.Sprintf("snap-%d", i)}); err != nil {
			b.Fatal(err)
		}
		whole += time.Since(start)
		start = time.Now()
		if out, err := exec.Command("sh", "-c", `tar -cf - -C "$1" . | zstd -q -o "$2" --force`, "sh", vol, filepath.Join(dir, "floor.tar.zst")).CombinedOutput(); err != nil {
			b.Fatalf("tar | zstd: %v: %s", err, out)
		}
		floor += time.Since(start)
	}
	b.ReportMetric(float64(paused.Microseconds())/1000/float64(b.N), "pause-ms/op")
	b.ReportMetric(float64(full.Milliseconds())/float64(b.N), "full-archive-ms/op")
	b.ReportMetric(float64(whole.Milliseconds())/float64(b.N), "snapshot-ms/op")
	b.ReportMetric(float64(floor.Milliseconds())/float64(b.N), "tar-zstd-ms/op")
	b.ReportMetric(float64(mib)*float64(b.N)/whole.Seconds(), "snapshot-MiB/s")
	b.ReportMetric(float64(mib)*float64(b.N)/floor.Seconds(), "tar-zstd-MiB/s")
}
