package bus_test

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
)

// TestACatchUpOfAFewCommandsScansNothing: an instance with a few commands
// among many of others' has them read through the subject index, in
// order, with no look-up of the next matching message (which the bus
// answers by reading through every message stored since the cursor); one
// with more than a page of them is scanned, with the same answer.
func TestACatchUpOfAFewCommandsScansNothing(t *testing.T) {
	srv := bustest.Run(t)
	js := srv.JetStream(t)
	st, err := js.Stream(ctx(t), protocol.StreamCommands)
	if err != nil {
		t.Fatal(err)
	}
	var scans atomic.Int32
	sub, err := js.Conn().Subscribe("$JS.API.STREAM.MSG.GET."+protocol.StreamCommands, func(m *nats.Msg) {
		var req struct {
			NextBySubj string `json:"next_by_subj"`
		}
		if json.Unmarshal(m.Data, &req) == nil && req.NextBySubj != "" {
			scans.Add(1)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	publish := func(instance, id string) uint64 {
		t.Helper()
		ack, err := js.Publish(ctx(t), protocol.CommandSubject(instance, id), []byte(`{"id":"`+id+`"}`))
		if err != nil {
			t.Fatal(err)
		}
		return ack.Sequence
	}
	var few, many []uint64
	for i := range protocol.MaxCommandsPerAnswer + 3 {
		if i%20 == 0 {
			few = append(few, publish("in-few", fmt.Sprintf("c%03d", i)))
		}
		many = append(many, publish("in-many", fmt.Sprintf("c%03d", i)))
		publish("in-other", fmt.Sprintf("c%03d", i))
	}
	reader := bus.NewCommandReader(st)
	seqsOf := func(resp protocol.CommandsAfterResponse) []uint64 {
		var out []uint64
		for _, c := range resp.Commands {
			out = append(out, c.Seq)
		}
		return out
	}
	for _, c := range []struct {
		name     string
		instance string
		after    uint64
		want     []uint64
		more     bool
		scanned  bool
	}{
		{"a few, from the start", "in-few", 0, few, false, false},
		{"a few, after the second", "in-few", few[1], few[2:], false, false},
		{"more than a page", "in-many", 0, many[:protocol.MaxCommandsPerAnswer], true, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := scans.Load()
			resp, err := reader.After(ctx(t), c.instance, c.after)
			if err != nil {
				t.Fatal(err)
			}
			if got := seqsOf(resp); !slices.Equal(got, c.want) || resp.More != c.more {
				t.Fatalf("After(%d) = %v more=%v, want %v more=%v", c.after, got, resp.More, c.want, c.more)
			}
			if js.Conn().Flush() != nil {
				t.Fatal("flush")
			}
			if scanned := scans.Load() > before; scanned != c.scanned {
				t.Fatalf("scanned: %v, want %v", scanned, c.scanned)
			}
		})
	}
}

// TestACommandStoredDuringAnIndexedReadIsNotSkipped: a command stored, and
// another published again, between the reader's look at the subject index
// and its reads: the answer ends at the instance's last command when the
// catch-up began and skips nothing before it (the agent takes its end as
// verified); what came after is the next catch-up's.
func TestACommandStoredDuringAnIndexedReadIsNotSkipped(t *testing.T) {
	srv := bustest.Run(t)
	js := srv.JetStream(t)
	st, err := js.Stream(ctx(t), protocol.StreamCommands)
	if err != nil {
		t.Fatal(err)
	}
	publish := func(id string) uint64 {
		t.Helper()
		ack, err := js.Publish(ctx(t), protocol.CommandSubject("in-x", id), []byte(`{"id":"`+id+`"}`))
		if err != nil {
			t.Fatal(err)
		}
		return ack.Sequence
	}
	a, b := publish("a"), publish("b")
	reader := bus.NewCommandReader(st)
	var c, again uint64
	bus.SetIndexedHook(reader, func() {
		if c == 0 {
			c, again = publish("c"), publish("a")
		}
	})
	first, err := reader.After(ctx(t), "in-x", 0)
	if err != nil {
		t.Fatal(err)
	}
	var got []uint64
	for _, cmd := range first.Commands {
		got = append(got, cmd.Seq)
	}
	if !slices.Equal(got, []uint64{a, b}) {
		t.Fatalf("the first catch-up: %v, want %v (c at %d and a again at %d are the next one's)", got, []uint64{a, b}, c, again)
	}
	next, err := reader.After(ctx(t), "in-x", b)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, cmd := range next.Commands {
		ids = append(ids, strings.Trim(string(cmd.Command), "{}"))
	}
	if len(ids) != 2 || !strings.Contains(ids[0], `"c"`) || !strings.Contains(ids[1], `"a"`) {
		t.Fatalf("the next catch-up: %v, want c then a again", ids)
	}
}
