package server

import (
	"fmt"
	"testing"
	"time"
)

// TestAgentPacer: one answer per instance per interval, others unaffected;
// entries of instances that stopped asking are swept as new ones come, so
// the map holds about the instances that asked within an interval.
func TestAgentPacer(t *testing.T) {
	p := agentPacer{interval: time.Second}
	t0 := time.Unix(1_700_000_000, 0)
	for _, c := range []struct {
		instance string
		at       time.Duration
		want     bool
	}{
		{"in-a", 0, true},
		{"in-a", 500 * time.Millisecond, false},
		{"in-b", 500 * time.Millisecond, true},
		{"in-a", time.Second, true},
		{"in-a", 1900 * time.Millisecond, false},
	} {
		if got := p.allow(c.instance, t0.Add(c.at)); got != c.want {
			t.Fatalf("%s at %s: allowed %v, want %v", c.instance, c.at, got, c.want)
		}
	}
	// 10,000 instances ask once each, a second apart in batches of 100.
	for i := range 10_000 {
		p.allow(fmt.Sprintf("in-%d", i), t0.Add(time.Duration(10+i/100)*time.Second))
	}
	if n := len(p.last); n > 400 {
		t.Fatalf("the pacer holds %d instances after 100 seconds of 100 new ones a second", n)
	}
}
