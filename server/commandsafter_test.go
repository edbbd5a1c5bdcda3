package server_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/fleetmanager/fm/protocol"
)

// TestTheServerAnswersAnAgentsCatchUp: an agent asks on its own subject
// (fm.cmdafter.<id>) and gets its own commands stored after the sequence
// it names, none of another instance's; asked again at once it is told to
// wait; an unknown instance gets none; an answer is never sent outside the
// asker's inbox.
func TestTheServerAnswersAnAgentsCatchUp(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("cmdafter", vn.ID, tpl.ID, im.ID))
	other := f.createInstance(instanceBody("cmdafter-2", vn.ID, tpl.ID, im.ID))
	js := f.env.Bus.JetStream(t)
	ctx := context.Background()
	var seqs []uint64
	for i := range 3 {
		for _, id := range []string{other.ID, in.ID} {
			ack, err := js.Publish(ctx, protocol.CommandSubject(id, fmt.Sprintf("c%d", i)), []byte(fmt.Sprintf(`{"for":%q,"n":%d}`, id, i)))
			if err != nil {
				t.Fatal(err)
			}
			if id == in.ID {
				seqs = append(seqs, ack.Sequence)
			}
		}
	}
	ask := func(id string, after uint64, reply string) (protocol.CommandsAfterResponse, bool) {
		t.Helper()
		var resp protocol.CommandsAfterResponse
		if reply == "" {
			reply = protocol.InboxPrefix(id) + "." + protocol.NewID("r")
		}
		ok := f.askAsAgent(protocol.CommandsAfterSubject(id), reply, &protocol.CommandsAfterRequest{After: after}, &resp, 3*time.Second)
		return resp, ok
	}
	resp, ok := ask(in.ID, seqs[0], "")
	if !ok || resp.Error != nil || resp.More || len(resp.Commands) != 2 ||
		resp.Commands[0].Seq != seqs[1] || resp.Commands[1].Seq != seqs[2] ||
		string(resp.Commands[1].Command) != fmt.Sprintf(`{"for":%q,"n":2}`, in.ID) {
		t.Fatalf("asked for its commands after %d (of %v): %v %+v", seqs[0], seqs, ok, resp)
	}
	if resp, ok := ask(in.ID, 0, ""); !ok || resp.Error == nil || resp.Error.Code != protocol.CodeResourceExhausted {
		t.Fatalf("asked again at once: %v %+v", ok, resp)
	}
	if resp, ok := ask("in-unknown", 0, ""); !ok || resp.Error == nil || resp.Error.Code != protocol.CodeNotFound {
		t.Fatalf("an unknown instance: %v %+v", ok, resp)
	}
	// A reply subject of FM's own (a key): no answer is stored there.
	if _, ok := ask(other.ID, 0, protocol.KVSubject(protocol.BucketDesired, other.ID)); ok {
		t.Fatal("an answer went to a key of fm_desired")
	}
}
