package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/natsauth"
	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go/jetstream"
)

// BenchmarkClusterWrites measures what sync_interval: always (the nodes'
// configuration, deploy/nats) costs on three real nodes: FM's writes, one
// after the other, as the server makes them (a put to a bucket with three
// replicas, with a revision check), each acknowledged once two nodes stored
// it; beside the same with the operating system's periodic sync. Run with
// -benchtime 2000x; it reports the latencies' p50 and p99.
func BenchmarkClusterWrites(b *testing.B) {
	always := NodeConf(b)
	periodic := strings.Replace(always, "sync_interval: always", "", 1)
	if periodic == always {
		b.Fatal("deploy/nats/nats-server.conf no longer says sync_interval: always")
	}
	for _, c := range []struct{ name, conf string }{{"sync=always", always}, {"sync=periodic", periodic}} {
		b.Run(c.name, func(b *testing.B) {
			js := clusterJS(b, c.conf)
			ctx := context.Background()
			kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "bench", Replicas: 3, History: 1, Storage: jetstream.FileStorage})
			if err != nil {
				b.Fatal(err)
			}
			value := []byte(strings.Repeat("v", 400)) // an instance's record is about this size
			revs := map[string]uint64{}
			var took []time.Duration
			b.ResetTimer()
			for i := range b.N {
				key := fmt.Sprintf("k%d", i%100)
				start := time.Now()
				var rev uint64
				if prev, ok := revs[key]; ok {
					rev, err = kv.Update(ctx, key, value, prev)
				} else {
					rev, err = kv.Create(ctx, key, value)
				}
				if err != nil {
					b.Fatal(err)
				}
				took = append(took, time.Since(start))
				revs[key] = rev
			}
			b.StopTimer()
			slices.Sort(took)
			b.ReportMetric(float64(took[len(took)/2].Microseconds())/1000, "p50-ms")
			b.ReportMetric(float64(took[len(took)*99/100].Microseconds())/1000, "p99-ms")
		})
	}
}

// clusterJS starts three nodes with conf and FM's authority, and connects
// to them with credentials of FM's account.
func clusterJS(b *testing.B, conf string) jetstream.JetStream {
	b.Helper()
	dir := b.TempDir()
	a, err := natsauth.Open(filepath.Join(dir, "nats-auth"))
	if err != nil {
		b.Fatal(err)
	}
	fmConf, err := a.ServerConfig()
	if err != nil {
		b.Fatal(err)
	}
	cluster := StartNATSClusterConf(b, natsServer(b), fmConf, conf)
	creds, _, err := a.Creds("bench", jwt.Permissions{}, time.Time{})
	if err != nil {
		b.Fatal(err)
	}
	credsFile := filepath.Join(dir, "bench.creds")
	if err := os.WriteFile(credsFile, creds, 0o600); err != nil {
		b.Fatal(err)
	}
	return cluster.JetStream(b, credsFile)
}
