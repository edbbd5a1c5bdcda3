package bus_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestDeclareIsIdempotentAndComplete(t *testing.T) {
	srv := bustest.RunBare(t)
	js := srv.JetStream(t)
	topo := bus.DefaultTopology()
	for i := 0; i < 2; i++ {
		if err := topo.Declare(ctx(t), js); err != nil {
			t.Fatalf("declare #%d: %v", i+1, err)
		}
	}
	for _, kv := range topo.KeyValues() {
		if _, err := js.KeyValue(ctx(t), kv.Bucket); err != nil {
			t.Errorf("bucket %s: %v", kv.Bucket, err)
		}
	}
	for _, st := range topo.Streams() {
		if _, err := js.Stream(ctx(t), st.Name); err != nil {
			t.Errorf("stream %s: %v", st.Name, err)
		}
	}
	for _, os := range topo.ObjectStores() {
		if _, err := js.ObjectStore(ctx(t), os.Bucket); err != nil {
			t.Errorf("object store %s: %v", os.Bucket, err)
		}
	}
	// A changed declaration updates the existing stream in place.
	topo.LogsMaxAge = time.Hour
	if err := topo.Declare(ctx(t), js); err != nil {
		t.Fatal(err)
	}
	st, err := js.Stream(ctx(t), protocol.StreamLogs)
	if err != nil {
		t.Fatal(err)
	}
	if got := st.CachedInfo().Config.MaxAge; got != time.Hour {
		t.Fatalf("FM_LOGS max age = %s after update, want 1h", got)
	}
}

func TestDesiredStateIsRepublished(t *testing.T) {
	srv := bustest.Run(t)
	nc := srv.Connect(t)
	js := srv.JetStream(t)
	sub, err := nc.SubscribeSync(protocol.DesiredSubject("in-abc"))
	if err != nil {
		t.Fatal(err)
	}
	// The put goes through another connection: make sure the server has
	// the subscription first.
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(ctx(t), protocol.BucketDesired)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx(t), "in-abc", []byte(`{"v":1}`)); err != nil {
		t.Fatal(err)
	}
	msg, err := sub.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatalf("no republished message: %v", err)
	}
	if string(msg.Data) != `{"v":1}` {
		t.Fatalf("republished %q", msg.Data)
	}
}

func TestAuditCannotBeDeletedOrPurged(t *testing.T) {
	srv := bustest.Run(t)
	js := srv.JetStream(t)
	ack, err := js.Publish(ctx(t), protocol.AuditSubject("main", "instance"), []byte("x"))
	if err != nil {
		t.Fatal(err)
	}
	st, err := js.Stream(ctx(t), protocol.StreamAudit)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.DeleteMsg(ctx(t), ack.Sequence); err == nil {
		t.Error("deleting an audit record succeeded")
	}
	if err := st.Purge(ctx(t)); err == nil {
		t.Error("purging the audit stream succeeded")
	}
}

func TestProvisionIsAWorkQueueWithDedup(t *testing.T) {
	srv := bustest.Run(t)
	js := srv.JetStream(t)
	subj := protocol.ProvisionSubject("in-1", protocol.ProvisionReprovision)
	for i := 0; i < 2; i++ {
		if _, err := js.Publish(ctx(t), subj, []byte("r"), jetstream.WithMsgID("req-1")); err != nil {
			t.Fatal(err)
		}
	}
	st, err := js.Stream(ctx(t), protocol.StreamProvision)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 1 {
		t.Fatalf("a request published twice with one id is stored %d times", info.State.Msgs)
	}
}

func TestConnectErrors(t *testing.T) {
	if _, err := bus.Connect(bus.ConnectConfig{}); err == nil {
		t.Error("connect without url accepted")
	}
	_, err := bus.Connect(bus.ConnectConfig{URL: "nats://user:hunter2@127.0.0.1:1", Logger: zerolog.Nop()})
	if err == nil {
		t.Fatal("connect to a closed port succeeded")
	}
	if errors.Unwrap(err) == nil || strings.Contains(err.Error(), "hunter2") {
		t.Errorf("error leaks the password or loses its cause: %v", err)
	}
}

func TestReconnectDelayBacksOffWithJitter(t *testing.T) {
	prevMax := time.Duration(0)
	for n := 0; n < 12; n++ {
		lo, hi := time.Hour, time.Duration(0)
		for i := 0; i < 200; i++ {
			d := bus.ReconnectDelay(n)
			lo, hi = min(lo, d), max(hi, d)
		}
		if hi > 23*time.Second {
			t.Fatalf("attempt %d waits up to %s, beyond the cap", n, hi)
		}
		if hi == lo {
			t.Fatalf("attempt %d: no jitter (%s)", n, lo)
		}
		if n < 6 && hi < prevMax {
			t.Fatalf("attempt %d waits less than attempt %d", n, n-1)
		}
		prevMax = hi
	}
}

// TestAgentStatusesCannotBeRolledUp: every agent writes its own key of
// fm_agents; a put with Nats-Rollup: all would purge everyone's. A bucket
// declared by an older FM (with delete markers, which need roll-ups) is
// brought in line too.
func TestAgentStatusesCannotBeRolledUp(t *testing.T) {
	srv := bustest.RunBare(t)
	js := srv.JetStream(t)
	if _, err := js.CreateKeyValue(ctx(t), jetstream.KeyValueConfig{Bucket: protocol.BucketAgents, History: 1,
		TTL: time.Hour, LimitMarkerTTL: time.Minute}); err != nil {
		t.Fatal(err)
	}
	if err := bus.DefaultTopology().Declare(ctx(t), js); err != nil {
		t.Fatal(err)
	}
	st, err := js.Stream(ctx(t), "KV_"+protocol.BucketAgents)
	if err != nil {
		t.Fatal(err)
	}
	if cfg := st.CachedInfo().Config; cfg.AllowRollup || cfg.SubjectDeleteMarkerTTL != 0 {
		t.Fatalf("KV_fm_agents allows roll-ups (%v) or leaves delete markers (%s)", cfg.AllowRollup, cfg.SubjectDeleteMarkerTTL)
	}
	if _, err := js.Publish(ctx(t), protocol.KVSubject(protocol.BucketAgents, "in-b"), []byte("b")); err != nil {
		t.Fatal(err)
	}
	rollup := nats.NewMsg(protocol.KVSubject(protocol.BucketAgents, "in-a"))
	rollup.Header.Set("Nats-Rollup", "all")
	if _, err := js.PublishMsg(ctx(t), rollup); err == nil {
		t.Fatal("a roll-up was taken")
	}
	kv, _ := js.KeyValue(ctx(t), protocol.BucketAgents)
	if _, err := kv.Get(ctx(t), "in-b"); err != nil {
		t.Fatalf("in-b's status: %v", err)
	}
	// And a deleted instance's status goes without one.
	if err := kv.Delete(ctx(t), "in-b"); err != nil {
		t.Fatal(err)
	}
}

// TestConsumersOfAgentReadStreamsGoWhenIdle: a consumer on FM_COMMANDS or
// on the kit store (the streams agents read from, through FM: they make
// none themselves) goes after ten idle minutes, whatever its maker asked (a
// durable asked for forever is refused).
func TestConsumersOfAgentReadStreamsGoWhenIdle(t *testing.T) {
	srv := bustest.RunBare(t)
	js := srv.JetStream(t)
	for i := 0; i < 2; i++ { // the second declaration keeps the limits
		if err := bus.DefaultTopology().Declare(ctx(t), js); err != nil {
			t.Fatal(err)
		}
	}
	for _, stream := range []string{protocol.StreamCommands, "OBJ_" + protocol.ObjectStoreKits} {
		t.Run(stream, func(t *testing.T) {
			c, err := js.CreateConsumer(ctx(t), stream, jetstream.ConsumerConfig{Durable: "kept", AckPolicy: jetstream.AckNonePolicy})
			if err != nil {
				t.Fatal(err)
			}
			if got := c.CachedInfo().Config.InactiveThreshold; got != 10*time.Minute {
				t.Fatalf("a durable consumer of %s goes after %s idle, want 10m", stream, got)
			}
			if _, err := js.CreateConsumer(ctx(t), stream, jetstream.ConsumerConfig{Durable: "forever",
				AckPolicy: jetstream.AckNonePolicy, InactiveThreshold: 24 * time.Hour}); err == nil {
				t.Fatalf("a consumer of %s idle for a day was taken", stream)
			}
		})
	}
}

// TestANoisyInstanceKeepsToItsShare: whatever one instance sends on its
// own subjects of FM_EVENTS and FM_LOGS drops only its own oldest messages
// beyond its share (an eighth of each stream), never another instance's;
// a message larger than the stream takes is refused.
func TestANoisyInstanceKeepsToItsShare(t *testing.T) {
	topo := bus.DefaultTopology()
	events, logs := bus.SharePerInstance()
	if events > topo.EventsMaxBytes/8 || logs > topo.LogsMaxBytes/8 {
		t.Fatalf("an instance may hold %d bytes of events and %d of logs: over an eighth of %d and %d", events, logs, topo.EventsMaxBytes, topo.LogsMaxBytes)
	}
	srv := bustest.Run(t)
	js := srv.JetStream(t)
	for _, c := range []struct {
		stream       string
		quiet, noisy string
		large        int
	}{
		{protocol.StreamEvents, protocol.EventSubject("in-quiet", protocol.EventStep), protocol.EventSubject("in-noisy", protocol.EventStep), 300 << 10},
		{protocol.StreamLogs, protocol.LogSubject("in-quiet", protocol.LogSourceDSS), protocol.LogSubject("in-noisy", protocol.LogSourceDSS), 200 << 10},
	} {
		t.Run(c.stream, func(t *testing.T) {
			for i := range 5 {
				if _, err := js.Publish(ctx(t), c.quiet, []byte("quiet "+string(rune('0'+i)))); err != nil {
					t.Fatal(err)
				}
			}
			for range 2000 {
				if _, err := js.PublishAsync(c.noisy, []byte("noise")); err != nil {
					t.Fatal(err)
				}
			}
			select {
			case <-js.PublishAsyncComplete():
			case <-time.After(30 * time.Second):
				t.Fatal("the noisy instance's messages were not all acknowledged")
			}
			if _, err := js.Publish(ctx(t), c.noisy, make([]byte, c.large)); err == nil {
				t.Fatalf("a %d-byte message was taken", c.large)
			}
			st, err := js.Stream(ctx(t), c.stream)
			if err != nil {
				t.Fatal(err)
			}
			info, err := st.Info(ctx(t), jetstream.WithSubjectFilter("fm.>"))
			if err != nil {
				t.Fatal(err)
			}
			if q, n := info.State.Subjects[c.quiet], info.State.Subjects[c.noisy]; q != 5 || n >= 2000 || n == 0 {
				t.Fatalf("the quiet instance holds %d of its 5 messages, the noisy one %d of its 2000", q, n)
			}
		})
	}
}

// TestCommandsAfterReadsOneInstancesCommandsInOrder: a catch-up holds the
// instance's commands after the sequence asked, none of another's, in
// pages bounded by count and by size, and a stored value that is not JSON
// as a command without its body.
func TestCommandsAfterReadsOneInstancesCommandsInOrder(t *testing.T) {
	srv := bustest.Run(t)
	js := srv.JetStream(t)
	st, err := js.Stream(ctx(t), protocol.StreamCommands)
	if err != nil {
		t.Fatal(err)
	}
	reader := bus.NewCommandReader(st)
	publish := func(instance, id string, data []byte) uint64 {
		t.Helper()
		ack, err := js.Publish(ctx(t), protocol.CommandSubject(instance, id), data)
		if err != nil {
			t.Fatal(err)
		}
		return ack.Sequence
	}
	var mine []uint64
	for i := range protocol.MaxCommandsPerAnswer + 6 {
		mine = append(mine, publish("in-mine", fmt.Sprintf("c%03d", i), []byte(fmt.Sprintf(`{"n":%d}`, i))))
		publish("in-other", fmt.Sprintf("c%03d", i), []byte(`{"other":true}`))
	}
	broken := publish("in-mine", "broken", []byte("not json"))
	big := bytes.Repeat([]byte("x"), 200<<10)
	big1 := publish("in-mine", "big1", []byte(`"`+string(big)+`"`))
	big2 := publish("in-mine", "big2", []byte(`"`+string(big)+`"`))
	seqs := func(cmds []protocol.StoredCommand) []uint64 {
		var out []uint64
		for _, c := range cmds {
			out = append(out, c.Seq)
		}
		return out
	}
	tests := []struct {
		name  string
		after uint64
		want  []uint64
		more  bool
	}{
		{"from the first, a full page", 0, mine[:protocol.MaxCommandsPerAnswer], true},
		{"the rest, up to what fits", mine[protocol.MaxCommandsPerAnswer-1], append(slices.Clone(mine[protocol.MaxCommandsPerAnswer:]), broken, big1), true},
		{"one too large to share a page goes alone", big1, []uint64{big2}, false},
		{"after the last, nothing", big2, nil, false},
		{"after a sequence of another instance", mine[3] + 1, mine[4 : 4+protocol.MaxCommandsPerAnswer], true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := reader.After(ctx(t), "in-mine", tc.after)
			if err != nil || resp.Reset {
				t.Fatal(err, resp.Reset)
			}
			cmds, more := resp.Commands, resp.More
			if got := seqs(cmds); !slices.Equal(got, tc.want) || more != tc.more {
				t.Fatalf("CommandsAfter(%d) = %v more=%v, want %v more=%v", tc.after, got, more, tc.want, tc.more)
			}
			for _, c := range cmds {
				switch {
				case c.Seq == broken && c.Command != nil:
					t.Fatalf("a stored value that is not JSON came as %q", c.Command)
				case c.Seq != broken && bytes.Contains(c.Command, []byte("other")):
					t.Fatalf("another instance's command came: %s", c.Command)
				}
			}
		})
	}
	// A command published again on its subject after the dedup window (a
	// grow-volume event folded again, say): the subject index cannot tell
	// the order of both copies, and the catch-up reads them by scanning,
	// in order.
	first := publish("in-again", "c1", []byte(`{"n":1}`))
	publish("in-other", "x", []byte(`{"other":true}`))
	second := publish("in-again", "c2", []byte(`{"n":2}`))
	third := publish("in-again", "c1", []byte(`{"n":1}`))
	if resp, err := reader.After(ctx(t), "in-again", 0); err != nil || !slices.Equal(seqs(resp.Commands), []uint64{first, second, third}) {
		t.Fatalf("a command published twice: %v %v, want %v", seqs(resp.Commands), err, []uint64{first, second, third})
	}
	if resp, err := reader.After(ctx(t), "in-again", first); err != nil || !slices.Equal(seqs(resp.Commands), []uint64{second, third}) {
		t.Fatalf("a command published twice, after the first: %v %v", seqs(resp.Commands), err)
	}
	if resp, err := reader.After(ctx(t), "in-nobody", 0); err != nil || len(resp.Commands) != 0 || resp.More || resp.Reset {
		t.Fatalf("an instance without commands: %+v %v", resp, err)
	}
	// A cursor beyond the stream's end (a bus restored from a backup, or
	// replaced): the agent is told to start again; one beyond the
	// instance's last command but within the stream is not.
	if resp, err := reader.After(ctx(t), "in-nobody", big2); err != nil || resp.Reset || len(resp.Commands) != 0 {
		t.Fatalf("a cursor within the stream: %+v %v", resp, err)
	}
	if resp, err := reader.After(ctx(t), "in-mine", big2+1000); err != nil || !resp.Reset || len(resp.Commands) != 0 {
		t.Fatalf("a cursor beyond the stream's end: %+v %v", resp, err)
	}
}

// TestCommandsAreRepublishedOnTheirInstancesLiveSubject: FM_COMMANDS, also
// one made before FM republished, sends every command as it is stored on
// its instance's live subject with its stream sequence, and only there.
func TestCommandsAreRepublishedOnTheirInstancesLiveSubject(t *testing.T) {
	srv := bustest.RunBare(t)
	js := srv.JetStream(t)
	if _, err := js.CreateStream(ctx(t), jetstream.StreamConfig{Name: protocol.StreamCommands, Subjects: []string{protocol.SubjectAllCommands}}); err != nil {
		t.Fatal(err)
	}
	if err := bus.DefaultTopology().Declare(ctx(t), js); err != nil {
		t.Fatal(err)
	}
	sub, err := js.Conn().SubscribeSync(protocol.CommandLiveSubject("in-a"))
	if err != nil {
		t.Fatal(err)
	}
	if err := js.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	for _, instance := range []string{"in-b", "in-a"} {
		ack, err := js.Publish(ctx(t), protocol.CommandSubject(instance, "c1"), []byte(`{"to":"`+instance+`"}`))
		if err != nil {
			t.Fatal(err)
		}
		if instance == "in-b" {
			continue
		}
		m, err := sub.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatalf("the command was not republished: %v", err)
		}
		if got := m.Header.Get(jetstream.SequenceHeader); got != strconv.FormatUint(ack.Sequence, 10) || string(m.Data) != `{"to":"in-a"}` {
			t.Fatalf("republished %s with sequence %q, want in-a's with %d", m.Data, got, ack.Sequence)
		}
	}
	if m, err := sub.NextMsg(200 * time.Millisecond); err == nil {
		t.Fatalf("another message came on in-a's subject: %s", m.Data)
	}
}
