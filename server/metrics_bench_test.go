package server_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// BenchmarkMetricsScrape scrapes /metrics of a server whose fleet has
// FM_BENCH_INSTANCES instances (default 1000), each running with its agent
// reporting (every per-instance series present). It reports the page's
// size, its series and the bus messages the server sent per scrape: a
// scrape reads the server's copies only. The fleet is made through the
// REST API and the buckets, before the timer starts.
//
//	FM_BENCH_INSTANCES=10000 go test ./server -run '^$' -bench MetricsScrape -benchtime 20x
func BenchmarkMetricsScrape(b *testing.B) {
	n := benchInstances(b)
	f := start(b)
	seedRunningFleet(b, f, n)
	scrape := func() []byte {
		r := f.do("GET", "/metrics", "")
		if r.status != http.StatusOK {
			b.Fatalf("/metrics: %d", r.status)
		}
		return r.body
	}
	// Every instance's series, once the copies hold them all (the agents'
	// statuses count as heard from for 30 s: fm_instance_agent_up is there
	// either way).
	var page []byte
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(100 * time.Millisecond) {
		page = scrape()
		if strings.Count(string(page), "fm_instance_agent_up{") == n {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("%d instances' series after 2 minutes", strings.Count(string(page), "fm_instance_agent_up{"))
		}
	}
	series := 0
	for _, line := range strings.Split(string(page), "\n") {
		if line != "" && !strings.HasPrefix(line, "#") {
			series++
		}
	}
	sent := f.env.Conn.Stats().OutMsgs
	b.ResetTimer()
	for b.Loop() {
		scrape()
	}
	b.StopTimer()
	b.ReportMetric(float64(len(page))/(1<<20), "MiB/scrape")
	b.ReportMetric(float64(series), "series")
	// Whatever the server's background work sent meanwhile (lease
	// renewals, sweeps) counts too: an upper bound.
	b.ReportMetric(float64(f.env.Conn.Stats().OutMsgs-sent)/float64(b.N), "bus-msgs/scrape")
}

// benchInstances is FM_BENCH_INSTANCES, by default 1000.
func benchInstances(b *testing.B) int {
	n := 1000
	if v := os.Getenv("FM_BENCH_INSTANCES"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 {
			b.Fatalf("FM_BENCH_INSTANCES=%q", v)
		}
	}
	return n
}

// seedRunningFleet makes n instances through the REST API, and records
// each as running with its agent reporting, straight in the buckets.
func seedRunningFleet(b *testing.B, f *fm, n int) {
	vn, tpl, im := f.fleet()
	// One connection for the whole fleet's records (runningWithVolume and
	// reportAgent connect once per call).
	js := f.env.Bus.JetStream(b)
	ctx := context.Background()
	bucket := func(name string) jetstream.KeyValue {
		kv, err := js.KeyValue(ctx, name)
		if err != nil {
			b.Fatal(err)
		}
		return kv
	}
	machines, lifecycles, agents := bucket(protocol.BucketMachines), bucket(protocol.BucketLifecycle), bucket(protocol.BucketAgents)
	for i := range n {
		in := f.createInstance(instanceBody(fmt.Sprintf("scrape-%d", i), vn.ID, tpl.ID, im.ID))
		now := time.Now().UTC()
		m, _ := protocol.Encode(&protocol.MachineState{Instance: in.ID, Backend: "fake", Status: protocol.MachineRunning,
			MachineID: "m-" + in.ID, VolumeID: "vol-" + in.ID, VolumeSizeGB: 50, RequestID: "op-0-reprovision"})
		lc, _ := json.Marshal(map[string]any{"state": "running", "generation": 1, "dssVersion": "14.0.0",
			"imageId": "dss-14.0.0-test", "since": now, "updatedAt": now})
		st, _ := protocol.Encode(&protocol.AgentStatus{Instance: in.ID, Time: now, Phase: protocol.PhaseReady,
			DSS:     protocol.DSSStatus{State: protocol.DSSRunning, Version: "14.0.0", NodeType: "design", Port: 10000},
			Machine: protocol.MachineFacts{DataVolumeBytes: 100 << 30, DataVolumeUsedBytes: 10 << 30}})
		for _, put := range []struct {
			kv   jetstream.KeyValue
			data []byte
		}{{machines, m}, {lifecycles, lc}, {agents, st}} {
			if _, err := put.kv.Put(ctx, in.ID, put.data); err != nil {
				b.Fatal(err)
			}
		}
	}
}
