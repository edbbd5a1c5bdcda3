package agent

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// TestLogLinesTheBusDidNotStoreAreSentAgain: a log message the bus did not
// acknowledge (here FM_LOGS is gone, as its leader is while a cluster node
// is lost) stays with the agent and is sent again, before what came after
// it; one the bus stored although its acknowledgement was lost is kept once.
func TestLogLinesTheBusDidNotStoreAreSentAgain(t *testing.T) {
	js := bustest.Run(t).JetStream(t)
	ctx := context.Background()
	topo := bus.DefaultTopology()
	if err := topo.Declare(ctx, js); err != nil {
		t.Fatal(err)
	}
	s := newLogShipper("in-logs", zerolog.Nop())
	s.js = js
	stored := func() []string {
		t.Helper()
		st, err := js.Stream(ctx, protocol.StreamLogs)
		if err != nil {
			t.Fatal(err)
		}
		info, err := st.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
			m, err := st.GetMsg(ctx, seq)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, string(m.Data))
		}
		return out
	}
	s.add(protocol.LogSourceAgent, []byte("line 1\n"))
	s.flush(ctx)
	if got := stored(); len(got) != 1 || got[0] != "line 1\n" {
		t.Fatalf("stored %q", got)
	}

	if err := js.DeleteStream(ctx, protocol.StreamLogs); err != nil {
		t.Fatal(err)
	}
	s.add(protocol.LogSourceAgent, []byte("line 2\n"))
	short, cancel := context.WithTimeout(ctx, 2*time.Second)
	s.flush(short)
	cancel()
	if len(s.unsent) != 1 {
		t.Fatalf("%d messages kept after the bus refused one, want 1", len(s.unsent))
	}
	if err := topo.Declare(ctx, js); err != nil {
		t.Fatal(err)
	}
	s.add(protocol.LogSourceDSS, []byte("line 3\n"))
	s.flush(ctx)
	if got := stored(); strings.Join(got, "") != "line 2\nline 3\n" || len(got) != 2 {
		t.Fatalf("after the bus came back, stored %q, want line 2 then line 3", got)
	}

	// Stored, its acknowledgement lost: sent again, kept once.
	s.add(protocol.LogSourceAgent, []byte("line 4\n"))
	s.mu.Lock()
	pending := s.pending
	s.pending, s.size = nil, 0
	s.mu.Unlock()
	s.queue(pending)
	m := s.unsent[0]
	if _, err := js.Publish(ctx, m.subject, m.data, jetstream.WithMsgID(m.id)); err != nil {
		t.Fatal(err)
	}
	s.flush(ctx)
	if got := stored(); len(got) != 3 || got[2] != "line 4\n" || len(s.unsent) != 0 {
		t.Fatalf("a message sent again after it was stored: stored %q, %d unsent", got, len(s.unsent))
	}

	// While the bus refuses, what waits is bounded, the oldest dropped, and
	// the drop is said once the bus takes messages again.
	if err := js.DeleteStream(ctx, protocol.StreamLogs); err != nil {
		t.Fatal(err)
	}
	line := []byte(strings.Repeat("x", 1023) + "\n")
	for i := range 3 * maxPendingLogs / len(line) {
		s.add(protocol.LogSourceDSS, line)
		if i%256 == 255 { // a flush every 256 KiB: some made into messages, some pending
			short, cancel := context.WithTimeout(ctx, time.Second)
			s.flush(short)
			cancel()
		}
	}
	if s.unsentSize > maxPendingLogs+maxLogMessage || s.size > maxPendingLogs {
		t.Fatalf("%d bytes made into messages and %d pending while the bus refused, want at most %d and %d",
			s.unsentSize, s.size, maxPendingLogs+maxLogMessage, maxPendingLogs)
	}
	if err := topo.Declare(ctx, js); err != nil {
		t.Fatal(err)
	}
	s.flush(ctx)
	s.flush(ctx) // the drop is said in the flush after the one that dropped
	if got := strings.Join(stored(), ""); !strings.Contains(got, "bytes of logs were dropped while the bus did not take them") {
		t.Fatal("the drop was not said")
	}
}
