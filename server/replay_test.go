package server_test

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
)

// TestReplayRunsTheTemplateAsItIsNow: replay-setup-actions is the next
// generation of the desired state with the template's setup actions as they
// are now and nothing else changed (the machine, DSS, the license); it
// ends when the agent reports that generation reached (a report of the
// generation before does not end it), and fails when the agent reports it
// failed.
func TestReplayRunsTheTemplateAsItIsNow(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("replayed", vn.ID, tpl.ID, im.ID))
	runningWithVolume(t, f.env.Bus, in.ID)
	ctx := context.Background()
	js := f.env.Bus.JetStream(t)
	desired, err := js.KeyValue(ctx, protocol.BucketDesired)
	if err != nil {
		t.Fatal(err)
	}
	agents, err := js.KeyValue(ctx, protocol.BucketAgents)
	if err != nil {
		t.Fatal(err)
	}

	e := f.failed(f.do("GET", "/instances/"+in.ID+"/actions/replay-setup-actions", ""), 409, "FailedPrecondition")
	if !strings.Contains(e.DetailedMessage, "no desired state") {
		t.Fatalf("a replay without a desired state: %s", e.DetailedMessage)
	}
	first := protocol.DesiredState{Instance: in.ID, Generation: 1, NodeType: "design", MachineRequest: "op-0-reprovision",
		DSS: protocol.DSSTarget{ImageID: im.ID, Version: "14.0.0", Port: 10000, SealedLicense: "fmsealed2:kept",
			HTTPS:          &protocol.HTTPSTarget{Strategy: protocol.HTTPSCustomCertificate, Port: 443, SealedCertificate: "fmsealed2:cert"},
			AWSCredentials: &protocol.AWSCredentials{AccessKeyID: "AKIAIOSFODNN7EXAMPLE", SealedSecretAccessKey: "fmsealed2:aws"},
			Kit:            protocol.KitSource{Path: "/kits/dss.tar.gz", SHA256: strings.Repeat("a", 64)}}}
	data, err := protocol.Encode(&first)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := desired.Put(ctx, in.ID, data); err != nil {
		t.Fatal(err)
	}
	m := map[string]any{}
	f.ok(f.do("GET", "/instance-settings-templates/"+tpl.ID, ""), &m)
	m["setupActions"] = []any{map[string]any{"type": "ADD_ENV_VARIABLES", "params": map[string]any{"variables": []any{map[string]any{"key": "ADDED", "value": "later"}}}}}
	f.ok(f.do("PUT", "/instance-settings-templates/"+tpl.ID, mustJSON(t, m)), nil)

	report := func(st protocol.AgentStatus) {
		t.Helper()
		st.Instance, st.AgentVersion = in.ID, "test"
		data, err := protocol.Encode(&st)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := agents.Put(ctx, in.ID, data); err != nil {
			t.Fatal(err)
		}
	}
	replay := func(wantGen uint64) api.Future {
		t.Helper()
		var op api.Future
		f.accepted("GET", "/instances/"+in.ID+"/actions/replay-setup-actions", &op)
		got, _ := f.desiredOf(in.ID)
		want := first
		want.Generation, want.RetryUntil, want.V = wantGen, got.RetryUntil, got.V
		want.SetupActions = []protocol.SetupAction{{Type: "ADD_ENV_VARIABLES", Enabled: true,
			Params: json.RawMessage(`{"variables":[{"key":"ADDED","value":"later"}]}`)}}
		if g, w := mustJSON(t, got), mustJSON(t, want); g != w {
			t.Fatalf("the replay's desired state:\n%s\nwant\n%s", g, w)
		}
		return op
	}

	op := replay(2)
	report(protocol.AgentStatus{Time: time.Now().UTC(), Phase: protocol.PhaseReady, Generation: 1, Target: 1})
	// The generation before does not end it: still running a while after
	// (a bounded look, since what is checked is that nothing happens).
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if got := f.future(op.JobID); got.State != api.OpRunning {
			t.Fatalf("the replay ended on a report of the generation before: %+v", got)
		}
	}
	report(protocol.AgentStatus{Time: time.Now().UTC(), Phase: protocol.PhaseFailed, Generation: 1, Target: 2,
		Error: &protocol.Error{Code: protocol.CodeInternal, Message: "ADD_ENV_VARIABLES: disk full"}})
	if got, err := f.waitFutureErr(op.JobID, 10*time.Second); err == nil || !strings.Contains(got.Error.DetailedMessage, "disk full") {
		t.Fatalf("a replay the agent failed: %+v %v", got, err)
	}

	op = replay(3)
	before := time.Now().UTC()
	report(protocol.AgentStatus{Time: time.Now().UTC(), Phase: protocol.PhaseConverging, Generation: 1, Target: 3})
	report(protocol.AgentStatus{Time: time.Now().UTC(), Phase: protocol.PhaseReady, Generation: 3, Target: 3})
	if got, err := f.waitFutureErr(op.JobID, 10*time.Second); err != nil {
		t.Fatalf("a replay the agent reached: %+v %v", got, err)
	}
	// The agent's steps of that generation, folded after the status ended
	// the operation (FM follows the two apart), are filed there in the
	// order they happened; its progress reports and other generations'
	// steps are not.
	for _, e := range []protocol.Event{
		{Kind: protocol.EventStep, Generation: 3, Step: "setup-action[0] ADD_ENV_VARIABLES (after_install)", Status: protocol.StatusOK, Message: "late", Time: before.Add(time.Millisecond)},
		{Kind: protocol.EventStep, Generation: 3, Step: "ready", Status: protocol.StatusOK, Message: "generation 3 reached", Time: before.Add(2 * time.Millisecond)},
		{Kind: protocol.EventStep, Generation: 3, Step: "fetch-kit", Status: protocol.StatusProgress, Message: "dropped", Time: before.Add(3 * time.Millisecond)},
		{Kind: protocol.EventStep, Generation: 2, Step: "setup-action[0] ADD_ENV_VARIABLES (after_install)", Status: protocol.StatusOK, Message: "another generation's", Time: before.Add(4 * time.Millisecond)},
	} {
		e.Instance, e.Source = in.ID, protocol.SourceAgent
		publishEvent(t, js, e)
	}
	var steps []string
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		steps = steps[:0]
		for _, st := range f.future(op.JobID).Progress.Steps {
			steps = append(steps, st.Name+": "+st.Message)
		}
		if len(steps) >= 4 {
			break
		}
	}
	time.Sleep(300 * time.Millisecond) // what must not come has had the time to
	steps = steps[:0]
	for _, st := range f.future(op.JobID).Progress.Steps {
		steps = append(steps, st.Name+": "+st.Message)
	}
	// Before the operation's end, which it shows last.
	if want := []string{"replay-setup-actions: ", "setup-action[0] ADD_ENV_VARIABLES (after_install): late", "ready: generation 3 reached", "replay-setup-actions: "}; !slices.Equal(steps, want) {
		t.Fatalf("the replay's steps: %q, want %q", steps, want)
	}
	var st map[string]any
	f.ok(f.do("GET", "/instances/"+in.ID+"/status", ""), &st)
	if st["state"] != "running" {
		t.Fatalf("after the replay: %v", st)
	}
}

// TestATemplateIsReplayedOnEveryInstanceOfIt: one call replays the
// template's setup actions on each running instance made from it (the same
// operation as asked of each), skips with why an instance that is not
// running or is busy, touches no instance of another template, and is an
// operator's to ask.
func TestATemplateIsReplayedOnEveryInstanceOfIt(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	other := f.createTemplate(`{"label":"other"}`)
	ctx := context.Background()
	desired, err := f.env.Bus.JetStream(t).KeyValue(ctx, protocol.BucketDesired)
	if err != nil {
		t.Fatal(err)
	}
	running := func(label, template string) string {
		t.Helper()
		in := f.createInstance(instanceBody(label, vn.ID, template, im.ID))
		runningWithVolume(t, f.env.Bus, in.ID)
		data, err := protocol.Encode(&protocol.DesiredState{Instance: in.ID, Generation: 1, NodeType: "design",
			DSS: protocol.DSSTarget{ImageID: im.ID, Version: "14.0.0", Port: 10000,
				Kit: protocol.KitSource{Path: "/kits/dss.tar.gz", SHA256: strings.Repeat("a", 64)}}})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := desired.Put(ctx, in.ID, data); err != nil {
			t.Fatal(err)
		}
		return in.ID
	}
	a, b, busy := running("tpl-a", tpl.ID), running("tpl-b", tpl.ID), running("tpl-busy", tpl.ID)
	elsewhere := running("other-tpl", other.ID)
	created := f.createInstance(instanceBody("tpl-created", vn.ID, tpl.ID, im.ID)).ID
	var held api.Future
	f.accepted("GET", "/instances/"+busy+"/actions/restart-dss", &held)

	viewer := f.newKey("viewer")
	f.failed(f.doAs("POST", "/instance-settings-templates/"+tpl.ID+"/actions/replay-setup-actions", "", viewer.ID, viewer.Secret), 403, "PermissionDenied")
	f.failed(f.do("POST", "/instance-settings-templates/tpl-none/actions/replay-setup-actions", ""), 404, "NotFound")

	// One at a time on a server.
	release := server.HoldTemplateReplays(f.env.Server)
	f.failed(f.do("POST", "/instance-settings-templates/"+tpl.ID+"/actions/replay-setup-actions", ""), 409, "Conflict")
	release()

	var out api.TemplateReplay
	f.ok(f.do("POST", "/instance-settings-templates/"+tpl.ID+"/actions/replay-setup-actions", ""), &out)
	started := map[string]string{}
	for _, op := range out.Futures {
		started[op.TargetID] = op.Kind
	}
	if len(started) != 2 || started[a] != "replay-setup-actions" || started[b] != "replay-setup-actions" {
		t.Fatalf("started %v, want replays on %s and %s", started, a, b)
	}
	skipped := map[string]string{}
	for _, s := range out.Skipped {
		skipped[s.InstanceID] = s.Error.DetailedMessage
	}
	if len(skipped) != 2 || !strings.Contains(skipped[busy], held.JobID) || !strings.Contains(skipped[created], "created") {
		t.Fatalf("skipped %v, want %s (busy with %s) and %s (not running)", skipped, busy, held.JobID, created)
	}
	for id, want := range map[string]uint64{a: 2, b: 2, elsewhere: 1, busy: 1} {
		if got, _ := f.desiredOf(id); got.Generation != want {
			t.Errorf("%s: desired generation %d, want %d", id, got.Generation, want)
		}
	}
	// Each instance's audit trail has the replay the call started on it.
	var trail []struct{ ObjectID, Action, Who string }
	f.ok(f.do("GET", "/audit?object=instances", ""), &trail)
	audited := map[string]bool{}
	for _, e := range trail {
		if strings.Contains(e.Action, "/instance-settings-templates/"+tpl.ID+"/actions/replay-setup-actions") && e.Who == "key:"+f.env.Key.ID {
			audited[e.ObjectID] = true
		}
	}
	if len(audited) != 2 || !audited[a] || !audited[b] {
		t.Fatalf("instances audited as replayed by the template's call: %v, want %s and %s", audited, a, b)
	}
}
