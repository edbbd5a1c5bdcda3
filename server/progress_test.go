package server_test

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

// TestProgressReplacesTheStepsProgress: an agent's progress events of a
// long step show as one step of the operation, the latest; one delivered
// late (older, or after the step's end) or twice changes nothing; the
// step's end is a step of its own.
func TestProgressReplacesTheStepsProgress(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("progress", vn.ID, tpl.ID, im.ID))
	runningWithVolume(t, f.env.Bus, in.ID)
	var op api.Future
	f.ok(f.do("GET", "/instances/"+in.ID+"/actions/restart-dss", ""), &op)
	js := f.env.Bus.JetStream(t)
	t0 := time.Now().UTC()
	step := func(status protocol.Status, msg string, at time.Time) protocol.Event {
		return protocol.Event{ID: protocol.NewID("ev"), Instance: in.ID, Kind: protocol.EventStep, Source: "agent", OpID: op.JobID,
			Step: "fetch-kit", Status: status, Message: msg, Time: at}
	}
	second := step(protocol.StatusProgress, "kit: 2 MiB of 3 MiB (66%)", t0.Add(2*time.Second))
	for _, e := range []protocol.Event{
		step(protocol.StatusProgress, "kit: 1 MiB of 3 MiB (33%)", t0.Add(time.Second)),
		second,
		second, // delivered twice
		step(protocol.StatusProgress, "kit: late", t0.Add(1500*time.Millisecond)),
		step(protocol.StatusOK, "kit ready", t0.Add(3*time.Second)),
		step(protocol.StatusProgress, "kit: after the end", t0.Add(2500*time.Millisecond)), // delivered after the end
		{ID: protocol.NewID("ev"), Instance: in.ID, Kind: protocol.EventStep, Source: "agent", OpID: op.JobID,
			Step: "install", Status: protocol.StatusOK, Message: "installed", Time: t0.Add(4 * time.Second)},
	} {
		publishEvent(t, js, e)
	}
	var steps []api.ProgressStep
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		steps = f.future(op.JobID).Progress.Steps
		if n := len(steps); n > 0 && steps[n-1].Name == "install" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the step's end never showed: %+v", steps)
		}
	}
	var progress []api.ProgressStep
	for _, s := range steps {
		if s.Name == "fetch-kit" && s.Status == string(protocol.StatusProgress) {
			progress = append(progress, s)
		}
	}
	// (The events of an instance are folded in order: the one after the
	// end was, before "install".)
	if len(progress) != 1 || progress[0].Message != second.Message || !progress[0].Time.Equal(second.Time) {
		t.Fatalf("progress steps: %+v (all: %+v)", progress, steps)
	}
}

// TestASnapshotShowsTheProvisionersSteps: a snapshot operation holds no
// lifecycle, yet its steps as the provisioner reports them (and how far
// its upload got, in place) are the operation's; another instance's event
// naming it is not.
func TestASnapshotShowsTheProvisionersSteps(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("snapsteps", vn.ID, tpl.ID, im.ID))
	other := f.createInstance(instanceBody("snapother", vn.ID, tpl.ID, im.ID))
	runningWithVolume(t, f.env.Bus, in.ID)
	var sn api.Snapshot
	f.accepted("POST", "/instances/"+in.ID+"/snapshots?reasonForSnapshot=steps", &sn)
	js := f.env.Bus.JetStream(t)
	t0 := time.Now().UTC()
	machine := func(instance, step string, status protocol.Status, msg string, sec int) protocol.Event {
		return protocol.Event{ID: protocol.NewID("ev"), Instance: instance, Kind: protocol.EventMachine, Source: "provisioner",
			OpID: sn.FutureID, Step: step, Status: status, Message: msg, Time: t0.Add(time.Duration(sec) * time.Second)}
	}
	for _, e := range []protocol.Event{
		machine(other.ID, "upload", protocol.StatusProgress, "forged", 1),
		machine(in.ID, "freeze", protocol.StatusOK, "data volume archived", 1),
		machine(in.ID, "upload", protocol.StatusProgress, "snapshot archive: 1 MiB of 4 MiB (25%)", 2),
		machine(in.ID, "upload", protocol.StatusProgress, "snapshot archive: 3 MiB of 4 MiB (75%)", 3),
	} {
		publishEvent(t, js, e)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		var names, messages []string
		for _, s := range f.future(sn.FutureID).Progress.Steps {
			names, messages = append(names, s.Name), append(messages, s.Message)
		}
		got := strings.Join(messages, "|")
		if strings.Contains(got, "forged") || strings.Contains(got, "25%") && strings.Contains(got, "75%") {
			t.Fatalf("steps: %q", messages)
		}
		if strings.Contains(got, "75%") && slices.Contains(names, "machine: freeze") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the provisioner's steps never showed: %q %q", names, messages)
		}
	}
}
