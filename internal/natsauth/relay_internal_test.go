package natsauth

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus/bustest"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

func TestRelayedMsg(t *testing.T) {
	long := strings.Repeat("x", maxRelayedMsgID+1)
	for _, tc := range []struct {
		subject, id string
		wantSubject string // "": dropped
		wantID      string
	}{
		{"fmin.fm.evt.in-a.step", "e-1", "fm.evt.in-a.step", "agent.in-a.e-1"},
		{"fmin.fm.log.in-a.dss", "", "fm.log.in-a.dss", ""},
		{"fmin.fm.diag.in-a.c-r", "fm.diag.in-a.c-r.3", "fm.diag.in-a.c-r", "agent.in-a.fm.diag.in-a.c-r.3"},
		{"fmin.$KV.fm_agents.in-a", "", "$KV.fm_agents.in-a", ""},
		{"fmin.fm.evt.in-a.step", long, "", ""},
		// What no agent stores through the relay.
		{"fmin.fm.hb.in-a", "", "", ""},
		{"fmin.$KV.fm_desired.in-a", "", "", ""},
		{"fmin.fm.cmd.in-a.c1", "", "", ""},
		{"fm.evt.in-a.step", "", "", ""},
		{"fmin.fm.evt.", "", "", ""},
		{"fmin.fm.evt.in a.step", "", "", ""},
	} {
		t.Run(tc.subject, func(t *testing.T) {
			m := &nats.Msg{Subject: tc.subject, Reply: "_R_.x.y", Data: []byte("d"), Header: nats.Header{}}
			if tc.id != "" {
				m.Header.Set(jetstream.MsgIDHeader, tc.id)
			}
			m.Header.Set("Nats-Expected-Last-Msg-Id", "stall")
			m.Header.Set("Nats-Rollup", "all")
			out := relayedMsg(m)
			if tc.wantSubject == "" {
				if out != nil {
					t.Fatalf("relayed as %+v, want dropped", out)
				}
				return
			}
			if out == nil || out.Subject != tc.wantSubject || string(out.Data) != "d" || out.Reply != "" {
				t.Fatalf("relayed as %+v, want %s", out, tc.wantSubject)
			}
			if got := out.Header.Get(jetstream.MsgIDHeader); got != tc.wantID || len(out.Header) > 1 || (tc.wantID == "" && len(out.Header) != 0) {
				t.Fatalf("headers %v, want only the id %q", out.Header, tc.wantID)
			}
		})
	}
}

// TestARelayStopsWithEverySlotTaken: Stop ends the relaying under way
// (here an admission that waits for the end) and returns once none runs,
// with the subscription's callback still waiting for a slot; nothing is
// relayed after.
func TestARelayStopsWithEverySlotTaken(t *testing.T) {
	bus := bustest.Run(t)
	nc := bus.Connect(t)
	var admitted, after atomic.Int64
	var stopped atomic.Bool
	r, err := StartRelay(nc, func(ctx context.Context, subject string, size int) bool {
		if stopped.Load() {
			after.Add(1)
		}
		admitted.Add(1)
		<-ctx.Done()
		return false
	})
	if err != nil {
		t.Fatal(err)
	}
	for i := range relayInFlight + 50 {
		if err := nc.Publish(RelaySubject("fm.evt.in-a.step"), []byte(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	nc.Flush()
	for deadline := time.Now().Add(10 * time.Second); admitted.Load() < relayInFlight; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d relayed at once, want %d", admitted.Load(), relayInFlight)
		}
	}
	done := make(chan struct{})
	go func() { r.Stop(); stopped.Store(true); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Stop did not return")
	}
	time.Sleep(100 * time.Millisecond) // a callback woken by Stop would start now
	if n := after.Load(); n != 0 {
		t.Fatalf("%d relayed after Stop", n)
	}
}
