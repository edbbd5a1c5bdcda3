package server_test

import (
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
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
	n := 1000
	if v := os.Getenv("FM_BENCH_INSTANCES"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 {
			b.Fatalf("FM_BENCH_INSTANCES=%q", v)
		}
	}
	f := start(b)
	vn, tpl, im := f.fleet()
	for i := range n {
		in := f.createInstance(instanceBody(fmt.Sprintf("scrape-%d", i), vn.ID, tpl.ID, im.ID))
		runningWithVolume(b, f.env.Bus, in.ID)
		reportAgent(b, f, in.ID)
	}
	scrape := func() []byte {
		r := f.do("GET", "/metrics", "")
		if r.status != http.StatusOK {
			b.Fatalf("/metrics: %d", r.status)
		}
		return r.body
	}
	// Every instance's series, once the copies hold them all.
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
