package server_test

import (
	"context"
	"testing"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// TestTheServerMakesAnAgentsCommandConsumer: an agent asks on its own
// subject (fm.cmdfrom.<id>) and gets its one consumer, made anew from the
// sequence it names, with nothing of the agent's choosing but that; asked
// again at once it is told to wait; an unknown instance gets none; an
// answer is never sent outside the asker's inbox.
func TestTheServerMakesAnAgentsCommandConsumer(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("cmdfrom", vn.ID, tpl.ID, im.ID))
	js := f.env.Bus.JetStream(t)
	ctx := context.Background()
	for i := range 3 {
		if _, err := js.Publish(ctx, protocol.CommandSubject(in.ID, "c"+string(rune('1'+i))), []byte("command")); err != nil {
			t.Fatal(err)
		}
	}
	ask := func(id string, after uint64, reply string) (protocol.CommandsFromResponse, bool) {
		t.Helper()
		var resp protocol.CommandsFromResponse
		if reply == "" {
			reply = protocol.InboxPrefix(id) + "." + protocol.NewID("r")
		}
		ok := f.askAsAgent(protocol.CommandsFromSubject(id), reply, &protocol.CommandsFromRequest{After: after}, &resp, 3*time.Second)
		return resp, ok
	}
	resp, ok := ask(in.ID, 2, "")
	if !ok || resp.Error != nil || resp.Consumer != protocol.CommandConsumer(in.ID) {
		t.Fatalf("asked for its consumer: %v %+v", ok, resp)
	}
	cons, err := js.Consumer(ctx, protocol.StreamCommands, resp.Consumer)
	if err != nil {
		t.Fatal(err)
	}
	cfg := cons.CachedInfo().Config
	if cfg.DeliverSubject != "" || cfg.FilterSubject != protocol.CommandFilter(in.ID) || !cfg.MemoryStorage ||
		cfg.Durable != "" || cfg.AckPolicy != jetstream.AckNonePolicy || cfg.OptStartSeq != 3 {
		t.Fatalf("the consumer made: %+v", cfg)
	}
	if resp, ok := ask(in.ID, 0, ""); !ok || resp.Error == nil || resp.Error.Code != protocol.CodeResourceExhausted {
		t.Fatalf("asked again at once: %v %+v", ok, resp)
	}
	if resp, ok := ask("in-unknown", 0, ""); !ok || resp.Error == nil || resp.Error.Code != protocol.CodeNotFound {
		t.Fatalf("an unknown instance: %v %+v", ok, resp)
	}
	// A reply subject of FM's own (a key): no answer is sent there (an
	// instance that has not asked yet, so that only the reply refuses it).
	other := f.createInstance(instanceBody("cmdfrom-2", vn.ID, tpl.ID, im.ID))
	if _, ok := ask(other.ID, 0, protocol.KVSubject(protocol.BucketDesired, other.ID)); ok {
		t.Fatal("an answer went to a key of fm_desired")
	}
	if _, err := js.Consumer(ctx, protocol.StreamCommands, protocol.CommandConsumer(other.ID)); err == nil {
		t.Fatal("a consumer was made for a request whose answer could not be sent")
	}
}
