package server_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
	"github.com/fleetmanager/fm/server/servertest"
	"github.com/nats-io/nats.go/jetstream"
)

// fakeAgents answers the upgrade-agent commands of a fleet as its agents
// would: after a while, the new digest reported and the command answered,
// or, for the instances in fail, a rollback. It records the commands and
// the most answers it owed at once.
type fakeAgents struct {
	t      *testing.T
	js     jetstream.JetStream
	served string
	delay  time.Duration
	fail   map[string]bool
	// unable are instances whose agent does not upgrade itself;
	// failWith, if set, is what the failing ones say.
	unable   map[string]bool
	failWith string

	mu       sync.Mutex
	got      []string // instances, in the order their commands came
	owed     int
	mostOwed int
}

func newFakeAgents(t *testing.T, f *fm, served string, delay time.Duration, fail ...string) *fakeAgents {
	fa := &fakeAgents{t: t, js: f.env.Bus.JetStream(t), served: served, delay: delay, fail: map[string]bool{}, unable: map[string]bool{},
		failWith: "the agent was not upgraded: the new agent did not report"}
	for _, id := range fail {
		fa.fail[id] = true
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	cons, err := fa.js.OrderedConsumer(ctx, protocol.StreamCommands, jetstream.OrderedConsumerConfig{FilterSubjects: []string{"fm.cmd.>"}})
	if err != nil {
		t.Fatal(err)
	}
	cc, err := cons.Consume(func(m jetstream.Msg) {
		var c protocol.Command
		if protocol.Decode(m.Data(), &c) != nil || c.Kind != protocol.CommandUpgradeAgent {
			return
		}
		fa.mu.Lock()
		fa.got = append(fa.got, c.Instance)
		fa.owed++
		fa.mostOwed = max(fa.mostOwed, fa.owed)
		fa.mu.Unlock()
		go fa.answer(c)
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cc.Stop)
	return fa
}

func (fa *fakeAgents) answer(c protocol.Command) {
	time.Sleep(fa.delay)
	e := protocol.Event{ID: protocol.NewID("ev"), Instance: c.Instance, Kind: protocol.EventCommand, Source: "agent", CommandID: c.ID, OpID: c.OpID,
		Step: string(c.Kind), Status: protocol.StatusOK, Message: "agent upgraded", Time: time.Now().UTC()}
	fa.mu.Lock()
	failing, unable, failWith := fa.fail[c.Instance], fa.unable[c.Instance], fa.failWith
	fa.mu.Unlock()
	switch {
	case failing:
		e.Status, e.Message = protocol.StatusFailed, "rolled back"
		e.Error = protocol.Errorf(protocol.CodeAborted, "%s", failWith)
	case unable:
		e.Status, e.Message = protocol.StatusFailed, "not upgraded"
		e.Error = protocol.Errorf(protocol.CodeUnimplemented, "the agent's binary /usr/bin/fm belongs to the system's package manager: upgrade the fm package instead")
	default:
		reportAgentBinary(fa.t, fa.js, c.Instance, "2.0.0", fa.served)
	}
	fa.mu.Lock()
	fa.owed--
	fa.mu.Unlock()
	data, _ := protocol.Encode(&e)
	_, _ = fa.js.Publish(context.Background(), protocol.EventSubject(e.Instance, e.Kind), data, jetstream.WithMsgID(e.ID))
}

func (fa *fakeAgents) commands() ([]string, int) {
	fa.mu.Lock()
	defer fa.mu.Unlock()
	return slices.Clone(fa.got), fa.mostOwed
}

// agentBinaryFile writes script as the agent binary a server serves, and
// returns its path and digest.
func agentBinaryFile(t *testing.T, script string) (string, string) {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "fm-agent")
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte(script))
	return bin, hex.EncodeToString(sum[:])
}

// reportAgentBinary writes an agent's status, responding, of version,
// running the binary of digest sha.
func reportAgentBinary(t *testing.T, js jetstream.JetStream, id, version, sha string) {
	kv, err := js.KeyValue(context.Background(), protocol.BucketAgents)
	if err != nil {
		t.Error(err)
		return
	}
	st := protocol.AgentStatus{Instance: id, Time: time.Now().UTC(), Phase: protocol.PhaseReady, AgentVersion: version, AgentSHA256: sha,
		DSS: protocol.DSSStatus{State: protocol.DSSRunning}}
	data, _ := protocol.Encode(&st)
	if _, err := kv.Put(context.Background(), id, data); err != nil {
		t.Error(err)
	}
}

// rolloutFleet starts a server serving an agent binary, with n running
// instances whose agents run an older binary; it returns their ids (in
// id order) and the served digest.
func rolloutFleet(t *testing.T, n int, opts ...servertest.Option) (*fm, []string, string) {
	bin, served := agentBinaryFile(t, "#!/bin/sh\necho 'fm 2.0.0 (rollout)'\n")
	opts = append([]servertest.Option{servertest.WithConfig(func(c *server.Config) {
		c.AgentBinary, c.RolloutInterval, c.HeartbeatSeconds = bin, 100*time.Millisecond, 60
	})}, opts...)
	f := start(t, opts...)
	vn, tpl, im := f.fleet()
	var ids []string
	for i := range n {
		in := f.createInstance(instanceBody("agent-"+string(rune('a'+i)), vn.ID, tpl.ID, im.ID))
		runningWithVolume(t, f.env.Bus, in.ID)
		reportAgentBinary(t, f.env.Bus.JetStream(t), in.ID, "1.0.0", "0ld")
		ids = append(ids, in.ID)
	}
	slices.Sort(ids)
	return f, ids, served
}

func (f *fm) waitRollout(state string, within time.Duration) api.AgentUpgrade {
	f.t.Helper()
	deadline := time.Now().Add(within)
	for {
		var ru api.AgentUpgrade
		f.ok(f.do("GET", "/agent-upgrade", ""), &ru)
		if ru.State == state {
			return ru
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("agent upgrade %s after %s, want %s: %+v", ru.State, within, state, ru)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (f *fm) upgradeOps(id string) int {
	var list []api.Future
	f.ok(f.do("GET", "/futures?targetId="+id, ""), &list)
	n := 0
	for _, op := range list {
		if op.Kind == "upgrade-agent" {
			n++
		}
	}
	return n
}

// TestAgentRolloutInBatches: a rollout upgrades the fleet's agents two at a
// time, counts those that run the binary already, skips those that cannot
// take it, and ends.
func TestAgentRolloutInBatches(t *testing.T) {
	f, ids, served := rolloutFleet(t, 6)
	js := f.env.Bus.JetStream(t)
	reportAgentBinary(t, js, ids[1], "2.0.0", served) // runs it already
	// One stopped instance: skipped.
	lkv, _ := js.KeyValue(context.Background(), protocol.BucketLifecycle)
	lc, _ := json.Marshal(map[string]any{"state": "stopped", "generation": 1, "dssVersion": "14.0.0", "since": time.Now().UTC(), "updatedAt": time.Now().UTC()})
	if _, err := lkv.Put(context.Background(), ids[4], lc); err != nil {
		t.Fatal(err)
	}
	fa := newFakeAgents(t, f, served, 300*time.Millisecond)

	var ru api.AgentUpgrade
	f.ok(f.do("POST", "/agent-upgrade", `{"batchSize":2}`), &ru)
	if ru.State != "running" || ru.SHA256 != served || ru.Version != "2.0.0" || len(ru.Pending) != 6 || ru.StartedBy != f.env.Key.ID {
		t.Fatalf("started: %+v", ru)
	}
	// One at a time.
	f.failed(f.do("POST", "/agent-upgrade", `{}`), http.StatusConflict, "Conflict")

	ru = f.waitRollout("succeeded", 30*time.Second)
	if ru.Upgraded != 4 || ru.AlreadyCurrent != 1 || ru.SkippedCount != 1 || ru.FailedCount != 0 || len(ru.Pending) != 0 || len(ru.Batch) != 0 ||
		ru.Skipped[0].InstanceID != ids[4] || ru.EndedAt == nil {
		t.Fatalf("ended: %+v", ru)
	}
	got, most := fa.commands()
	want := []string{ids[0], ids[2], ids[3], ids[5]}
	if !slices.Equal(got, want) || most > 2 || most < 1 {
		t.Fatalf("commands to %v (at most %d at once), want %v two at a time", got, most, want)
	}
	for _, id := range want {
		if n := f.upgradeOps(id); n != 1 {
			t.Errorf("%s had %d upgrade-agent operations", id, n)
		}
	}
	// The same again: every agent runs the binary, nothing is sent.
	f.ok(f.do("POST", "/agent-upgrade", `{"batchSize":10}`), &ru)
	ru = f.waitRollout("succeeded", 30*time.Second)
	if got2, _ := fa.commands(); len(got2) != len(got) || ru.AlreadyCurrent != 5 || ru.SkippedCount != 1 {
		t.Fatalf("the second rollout: %+v, commands %v", ru, got2)
	}
}

// TestAgentRolloutStopsAtAFailure: an agent that was rolled back fails its
// operation, and no batch starts after it.
func TestAgentRolloutStopsAtAFailure(t *testing.T) {
	f, ids, served := rolloutFleet(t, 4)
	fa := newFakeAgents(t, f, served, 50*time.Millisecond, ids[1])
	f.ok(f.do("POST", "/agent-upgrade", `{"batchSize":1}`), nil)
	ru := f.waitRollout("failed", 30*time.Second)
	if ru.Upgraded != 1 || ru.FailedCount != 1 || ru.Failed[0].InstanceID != ids[1] || ru.Failed[0].JobID == "" ||
		!slices.Equal(ru.Pending, ids[2:]) {
		t.Fatalf("failed: %+v", ru)
	}
	if ru.Failed[0].Message != "the agent was not upgraded: the new agent did not report" {
		t.Errorf("the failure says %q", ru.Failed[0].Message)
	}
	if got, _ := fa.commands(); !slices.Equal(got, ids[:2]) {
		t.Fatalf("commands to %v, want %v", got, ids[:2])
	}
	// With room for failures, it goes on past them.
	f.ok(f.do("POST", "/agent-upgrade", `{"batchSize":2,"maxFailures":1}`), nil)
	ru = f.waitRollout("succeeded", 30*time.Second)
	if ru.Upgraded != 2 || ru.AlreadyCurrent != 1 || ru.FailedCount != 1 {
		t.Fatalf("with maxFailures 1: %+v", ru)
	}
}

// TestAgentRolloutStops: DELETE lets the batch under way end and starts
// no other.
func TestAgentRolloutStops(t *testing.T) {
	f, ids, served := rolloutFleet(t, 3)
	fa := newFakeAgents(t, f, served, 2*time.Second)
	f.ok(f.do("POST", "/agent-upgrade", `{"batchSize":1}`), nil)
	deadline := time.Now().Add(10 * time.Second)
	for got, _ := fa.commands(); len(got) == 0; got, _ = fa.commands() {
		if time.Now().After(deadline) {
			t.Fatal("no command sent")
		}
		time.Sleep(20 * time.Millisecond)
	}
	var ru api.AgentUpgrade
	f.ok(f.do("DELETE", "/agent-upgrade", ""), &ru)
	if !ru.AbortRequested || ru.State != "running" {
		t.Fatalf("stopping: %+v", ru)
	}
	ru = f.waitRollout("aborted", 30*time.Second)
	if ru.Upgraded != 1 || !slices.Equal(ru.Pending, ids[1:]) {
		t.Fatalf("aborted: %+v", ru)
	}
	f.failed(f.do("DELETE", "/agent-upgrade", ""), http.StatusConflict, "FailedPrecondition")
	if got, _ := fa.commands(); len(got) != 1 {
		t.Fatalf("commands after the stop: %v", got)
	}
}

// TestAgentRolloutSurvivesACrash: a server killed after it started an
// instance's operation, before it wrote its id, is followed by one that
// adopts that operation rather than start a second.
func TestAgentRolloutSurvivesACrash(t *testing.T) {
	for _, point := range []string{"server/agent-rollout/start-op:before", "server/agent-rollout/start-op:after", "server/agent-rollout/step-stored"} {
		t.Run(point, func(t *testing.T) {
			var env *servertest.Env
			crashed := make(chan struct{})
			var once sync.Once
			f, ids, served := rolloutFleet(t, 2, servertest.WithConfig(func(c *server.Config) {
				c.Crash = func(p string) {
					if p != point {
						return
					}
					once.Do(func() {
						env.Die()
						close(crashed)
						select {} // dead
					})
				}
			}))
			env = f.env
			newFakeAgents(t, f, served, 50*time.Millisecond)
			f.ok(f.do("POST", "/agent-upgrade", `{"batchSize":2}`), nil)
			select {
			case <-crashed:
			case <-time.After(20 * time.Second):
				t.Fatal("the server never reached the crash point")
			}
			f.env.StartAgain(t, func(c *server.Config) { c.Crash = nil })
			ru := f.waitRollout("succeeded", 30*time.Second)
			if ru.Upgraded != 2 {
				t.Fatalf("after the crash: %+v", ru)
			}
			for _, id := range ids {
				if n := f.upgradeOps(id); n != 1 {
					t.Errorf("%s had %d upgrade-agent operations", id, n)
				}
			}
		})
	}
}

// TestAgentRolloutRefuses: bad requests change nothing.
func TestAgentRolloutRefuses(t *testing.T) {
	f, _, _ := rolloutFleet(t, 1)
	f.failed(f.do("GET", "/agent-upgrade", ""), http.StatusNotFound, "NotFound")
	f.failed(f.do("DELETE", "/agent-upgrade", ""), http.StatusNotFound, "NotFound")
	for _, body := range []string{`{"batchSize":-1}`, `{"batchSize":501}`, `{"maxFailures":-1}`, `{"batchSize":"two"}`} {
		f.failed(f.do("POST", "/agent-upgrade", body), http.StatusBadRequest, "InvalidArgument")
	}
	f.failed(f.do("POST", "/agent-upgrade", `{"instanceIds":["in-none"]}`), http.StatusNotFound, "NotFound")
	f.failed(f.do("GET", "/agent-upgrade", ""), http.StatusNotFound, "NotFound")

	none := start(t)
	none.failed(none.do("POST", "/agent-upgrade", `{}`), http.StatusConflict, "FailedPrecondition")
}

// TestAgentRolloutWaitsForABusyInstance: an instance busy with another
// operation is waited for, without holding up the rest of its batch.
func TestAgentRolloutWaitsForABusyInstance(t *testing.T) {
	f, ids, served := rolloutFleet(t, 2)
	var busy api.Future
	f.ok(f.do("GET", "/instances/"+ids[0]+"/actions/restart-dss", ""), &busy)
	fa := newFakeAgents(t, f, served, 50*time.Millisecond)
	f.ok(f.do("POST", "/agent-upgrade", `{"batchSize":2}`), nil)
	deadline := time.Now().Add(20 * time.Second)
	for got, _ := fa.commands(); !slices.Equal(got, ids[1:]); got, _ = fa.commands() {
		if time.Now().After(deadline) {
			t.Fatalf("commands %v: the free instance was held up by the busy one", got)
		}
		time.Sleep(20 * time.Millisecond)
	}
	var ru api.AgentUpgrade
	for f.ok(f.do("GET", "/agent-upgrade", ""), &ru); ru.Upgraded != 1; f.ok(f.do("GET", "/agent-upgrade", ""), &ru) {
		if time.Now().After(deadline) {
			t.Fatalf("the free instance's upgrade never ended: %+v", ru)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if ru.State != "running" || len(ru.Batch) != 1 || ru.Batch[0].InstanceID != ids[0] || ru.Batch[0].JobID != "" {
		t.Fatalf("while the instance is busy: %+v", ru)
	}
	publishEvent(t, f.env.Bus.JetStream(t), protocol.Event{Instance: ids[0], Kind: protocol.EventCommand, Source: "agent", CommandID: busy.JobID + "-cmd",
		OpID: busy.JobID, Step: string(protocol.CommandRestartDSS), Status: protocol.StatusOK, Message: "DSS is running"})
	ru = f.waitRollout("succeeded", 30*time.Second)
	if got, _ := fa.commands(); ru.Upgraded != 2 || !slices.Equal(got, []string{ids[1], ids[0]}) {
		t.Fatalf("after the other operation ended: %+v, commands %v", ru, got)
	}
}

// TestAgentRolloutSkipsAgentsThatDoNotUpgrade: an agent that does not
// upgrade itself (the fm package's) is skipped, saying why, not failed; a
// failing agent's long answer is clipped in the record.
func TestAgentRolloutSkipsAgentsThatDoNotUpgrade(t *testing.T) {
	f, ids, served := rolloutFleet(t, 3)
	fa := newFakeAgents(t, f, served, 20*time.Millisecond, ids[2])
	fa.unable[ids[0]] = true
	fa.failWith = "x" + strings.Repeat("é", 3000) // byte 1024 is within a character
	f.ok(f.do("POST", "/agent-upgrade", `{"batchSize":1}`), nil)
	ru := f.waitRollout("failed", 30*time.Second)
	if ru.SkippedCount != 1 || ru.Skipped[0].InstanceID != ids[0] || !strings.Contains(ru.Skipped[0].Message, "upgrade the fm package") ||
		ru.Upgraded != 1 || ru.FailedCount != 1 {
		t.Fatalf("rollout: %+v", ru)
	}
	if m := ru.Failed[0].Message; len(m) > 1024+len("…") || !utf8.ValidString(m) {
		t.Fatalf("the failure's message is %d bytes (valid UTF-8: %v)", len(m), utf8.ValidString(m))
	}
}

// TestAgentRolloutEndsWhenItCannotGoOn: FM started again with another
// agent binary, or the starter's key revoked, end a running rollout
// rather than start what it did not name or was not allowed.
func TestAgentRolloutEndsWhenItCannotGoOn(t *testing.T) {
	t.Run("another binary", func(t *testing.T) {
		f, _, served := rolloutFleet(t, 2)
		newFakeAgents(t, f, served, 3*time.Second)
		f.ok(f.do("POST", "/agent-upgrade", `{"batchSize":1}`), nil)
		other, _ := agentBinaryFile(t, "#!/bin/sh\necho 'fm 3.0.0'\n")
		f.env.Die()
		f.env.StartAgain(t, func(c *server.Config) { c.AgentBinary = other })
		ru := f.waitRollout("failed", 30*time.Second)
		if !strings.Contains(ru.Failed[len(ru.Failed)-1].Message, "binary Fleet Manager serves changed") {
			t.Fatalf("rollout: %+v", ru)
		}
	})
	t.Run("the key revoked", func(t *testing.T) {
		f, _, served := rolloutFleet(t, 2)
		newFakeAgents(t, f, served, 3*time.Second)
		admin := f.newKey(server.RoleAdmin)
		if r := f.doAs("POST", "/agent-upgrade", `{"batchSize":1}`, admin.ID, admin.Secret); r.status != http.StatusOK {
			t.Fatalf("start: %d %s", r.status, r.body)
		}
		f.ok(f.do("DELETE", "/api-keys/"+admin.ID, ""), nil)
		ru := f.waitRollout("failed", 30*time.Second)
		if !strings.Contains(ru.Failed[len(ru.Failed)-1].Message, "was revoked") || len(ru.Pending) == 0 {
			t.Fatalf("rollout: %+v", ru)
		}
	})
}
