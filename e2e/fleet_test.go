package e2e

import (
	"context"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/fleetsim"
	"github.com/rs/zerolog"
)

// TestFleetSimulator runs the fleet simulator (fm bench fleet) at small
// scale so that it cannot rot: a real fm server in its own process, the
// real provisioner over simulated machines, 100 agents that join with
// their own credentials, every measurement taken once, the server restarted
// under the fleet. Times are printed, not asserted.
func TestFleetSimulator(t *testing.T) {
	agents := 100
	if testing.Short() {
		agents = 20
	}
	rep := runFleet(t, fmBin(t), agents, 20, 3*time.Second)
	if rep.Create.N != agents || rep.CreateAlone.N != 20 || rep.RoundTrip.N != 20 || rep.FloorJetStream.N != 20 || rep.FloorRequestReply.N != 20 || rep.FloorFMSequence.N != 20 ||
		rep.Get.N != 20 || rep.Status.N != 20 || rep.List.N < 5 || rep.ListEncode.N != rep.List.N {
		t.Errorf("a measurement is missing: %+v", rep)
	}
	if rep.ListBytes < agents*100 {
		t.Errorf("the list of %d instances encodes to %d bytes", agents, rep.ListBytes)
	}
	// Heartbeats every second: at least half a message a second per agent.
	if rep.Steady.MsgsPerAgent < 0.5 || rep.Steady.ServerRSS == 0 || rep.Steady.SimulatorRSS == 0 {
		t.Errorf("steady state not measured: %+v", rep.Steady)
	}
	if rep.Reconnect <= 0 || rep.StormCommands <= 0 {
		t.Errorf("reconnect storm not measured: %v", rep.Reconnect)
	}
	if rep.ChangeReached <= 0 || rep.ChangeDone <= 0 {
		t.Errorf("fleet-wide change not measured: reached %v, done %v", rep.ChangeReached, rep.ChangeDone)
	}
}

// BenchmarkFleet is fm bench fleet as a Go benchmark: FM_BENCH_AGENTS
// agents (default 100), FM_BENCH_SYNC_ALWAYS=1 for a bus that syncs every
// write. Run with -benchtime 1x.
func BenchmarkFleet(b *testing.B) {
	agents := 100
	if v := os.Getenv("FM_BENCH_AGENTS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			b.Fatalf("FM_BENCH_AGENTS=%q", v)
		}
		agents = n
	}
	bin := fmBinPlain(b)
	for b.Loop() {
		rep := runFleet(b, bin, agents, 200, 30*time.Second)
		rep.Write(os.Stdout)
		b.ReportMetric(float64(rep.RoundTrip.P50.Microseconds())/1000, "roundtrip-p50-ms")
		b.ReportMetric(float64(rep.RoundTrip.P99.Microseconds())/1000, "roundtrip-p99-ms")
		b.ReportMetric(rep.Steady.ServerCPU*100, "server-CPU-%")
		b.ReportMetric(float64(rep.Steady.ServerRSS)/(1<<20), "server-RSS-MiB")
		b.ReportMetric(rep.ChangeReached.Seconds(), "fleet-change-s")
	}
}

func runFleet(tb testing.TB, bin string, agents, samples int, steady time.Duration) fleetsim.Report {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	heartbeat := 10
	if steady < 10*time.Second {
		heartbeat = 1
	}
	rep, err := fleetsim.Run(ctx, fleetsim.Config{FM: bin, Dir: tb.TempDir(), Agents: agents, Samples: samples, Steady: steady,
		HeartbeatSeconds: heartbeat, SyncAlways: os.Getenv("FM_BENCH_SYNC_ALWAYS") == "1", ReconnectStorm: true,
		Progress: testWriter{tb}, Logger: zerolog.Nop()})
	if err != nil {
		tb.Fatal(err)
	}
	rep.Write(testWriter{tb})
	return rep
}

// testWriter writes to the test's log.
type testWriter struct{ tb testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.tb.Log(string(p))
	return len(p), nil
}
