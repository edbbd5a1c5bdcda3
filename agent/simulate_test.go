package agent

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
)

// A simulated agent (fm bench fleet) does an agent's bus work over no
// machine: it reaches each generation at once, answers the commands that
// only change DSS's run state and the credentials it made, refuses those
// that need a real DSS, and
// leaves nothing of DSS on disk.
func TestASimulatedAgentDoesTheBusWorkOverNoMachine(t *testing.T) {
	r := newRig(t)
	r.cfg.Simulated = true
	r.startAgent()
	r.desire("13.4.0")
	st := r.waitReady(1)
	if st.DSS.State != protocol.DSSRunning || st.DSS.Version != "13.4.0" {
		t.Fatalf("a simulated machine reports %+v; want DSS 13.4.0 running", st.DSS)
	}
	r.desire("14.0.0")
	r.waitReady(2)

	tests := []struct {
		kind   protocol.CommandKind
		status protocol.Status
		dss    protocol.DSSState
	}{
		{protocol.CommandStopDSS, protocol.StatusOK, protocol.DSSStopped},
		{protocol.CommandStartDSS, protocol.StatusOK, protocol.DSSRunning},
		{protocol.CommandRestartDSS, protocol.StatusOK, protocol.DSSRunning},
		{protocol.CommandGetInitialPassword, protocol.StatusOK, protocol.DSSRunning},
		{protocol.CommandGetAdminAPIKey, protocol.StatusOK, protocol.DSSRunning},
		{protocol.CommandCollectDiagnosis, protocol.StatusFailed, protocol.DSSRunning},
	}
	for _, tc := range tests {
		t.Run(string(tc.kind), func(t *testing.T) {
			res := r.result(r.command(tc.kind, nil))
			if res.Status != tc.status {
				t.Fatalf("%s: %s (%v); want %s", tc.kind, res.Status, res.Error, tc.status)
			}
			if tc.status == protocol.StatusOK && (tc.kind == protocol.CommandGetInitialPassword || tc.kind == protocol.CommandGetAdminAPIKey) &&
				(res.SealedResult == "" && len(res.Result) < 10) {
				t.Fatalf("%s answered no credential: %+v", tc.kind, res)
			}
			if tc.status == protocol.StatusFailed && (res.Error == nil || res.Error.Code != protocol.CodeUnimplemented) {
				t.Fatalf("%s failed with %v; want unimplemented", tc.kind, res.Error)
			}
			r.waitStatus("DSS "+string(tc.dss), 30*time.Second, func(s protocol.AgentStatus) bool { return s.DSS.State == tc.dss })
		})
	}
	r.stopAgent()
	for _, p := range []string{r.dssDir(), filepath.Join(r.root, "var", "lib", "fm-agent", "agent.log")} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("a simulated agent left %s (%v)", p, err)
		}
	}
}

// TestAStatusAtRestIsNotRewritten: what changes at every measurement
// (uptime, load, free memory) travels in heartbeats; the status in fm_agents
// keeps only what changes seldom, so an agent at rest does not rewrite it.
func TestAStatusAtRestIsNotRewritten(t *testing.T) {
	r := newRig(t)
	r.cfg.Simulated, r.cfg.StatusRefresh, r.cfg.DataVolumeBytes = true, time.Hour, 1<<30
	beats := make(chan protocol.Heartbeat, 64)
	sub, err := r.nc.Subscribe(protocol.HeartbeatSubject(r.instance), func(m *nats.Msg) {
		var hb protocol.Heartbeat
		if protocol.Decode(m.Data, &hb) == nil {
			select {
			case beats <- hb:
			default:
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	r.startAgent()
	r.desire("13.4.0")
	r.waitReady(1)
	kv, err := r.js.KeyValue(context.Background(), protocol.BucketAgents)
	if err != nil {
		t.Fatal(err)
	}
	revision := func() uint64 {
		e, err := kv.Get(context.Background(), r.instance)
		if err != nil {
			t.Fatal(err)
		}
		return e.Revision()
	}
	// The first measurements settle the status; then uptime keeps growing
	// in the heartbeats while the status stays as it is.
	var first, last protocol.Heartbeat
	before := uint64(0)
	for deadline := time.Now().Add(30 * time.Second); last.Machine == nil || first.Machine == nil ||
		last.Machine.UptimeSeconds < first.Machine.UptimeSeconds+2; {
		select {
		case hb := <-beats:
			if hb.Machine == nil {
				continue
			}
			if first.Machine == nil {
				first, before = hb, revision()
			}
			last = hb
		case <-time.After(time.Until(deadline)):
			t.Fatalf("no heartbeats with growing machine facts: first %+v, last %+v", first.Machine, last.Machine)
		}
	}
	if after := revision(); after != before {
		t.Errorf("the status was rewritten at rest: revision %d, then %d", before, after)
	}
	st, _ := r.status()
	if st.Machine.UptimeSeconds != 0 || st.Machine.Load1 != 0 || st.Machine.MemAvailableBytes != 0 || st.Machine.DataVolumeBytes != 1<<30 {
		t.Errorf("the status keeps %+v; want only the volume's size and use and the memory's total", st.Machine)
	}
}

// TestAfterABusRestartCommandsFlowAtOnce: a command stored while the
// agent was disconnected is not republished to it; the agent catches up
// as it reconnects, instead of waiting for its next recheck (minutes), and
// beats at once so that FM sees it back.
func TestAfterABusRestartCommandsFlowAtOnce(t *testing.T) {
	r := newRig(t)
	r.cfg.Simulated = true
	r.startAgent()
	r.waitReady(r.desire("13.4.0").Generation)
	r.result(r.command(protocol.CommandRestartDSS, nil))
	r.bus.Restart(t)
	began := time.Now()
	res := r.result(r.command(protocol.CommandRestartDSS, nil))
	if res.Status != protocol.StatusOK {
		t.Fatalf("restart-dss after the bus restarted: %+v", res)
	}
	// Reconnecting takes a few seconds of backoff, asking again at most 2;
	// missed heartbeats would take a minute.
	if took := time.Since(began); took > 20*time.Second {
		t.Fatalf("a command after a bus restart took %v", took)
	}
}

// countRuns makes every agent the rig starts count the commands it runs
// (by id): a command's result event keeps its id however often it is sent,
// so events cannot tell a command run twice.
func (r *rig) countRuns() func(id string) int {
	var mu sync.Mutex
	runs := map[string]int{}
	tune := r.tune
	r.tune = func(a *Agent) {
		if tune != nil {
			tune(a)
		}
		execute := a.execute
		a.execute = func(ctx context.Context, cmd protocol.Command) commandResult {
			mu.Lock()
			runs[cmd.ID]++
			mu.Unlock()
			return execute(ctx, cmd)
		}
	}
	return func(id string) int {
		mu.Lock()
		defer mu.Unlock()
		return runs[id]
	}
}

// simulatedRig starts a simulated agent (tune, if set, changing it
// first), ready at its first generation, and counts the commands it runs.
func simulatedRig(t *testing.T, tune func(*Agent)) (*rig, func(id string) int) {
	t.Helper()
	r := newRig(t)
	r.cfg.Simulated = true
	r.tune = tune
	runs := r.countRuns()
	r.startAgent()
	r.waitReady(r.desire("13.4.0").Generation)
	return r, runs
}

// ranOnce fails the test unless each of ids ran exactly once (runs is
// countRuns's).
func ranOnce(t *testing.T, runs func(string) int, ids ...string) {
	t.Helper()
	for _, id := range ids {
		if n := runs(id); n != 1 {
			t.Fatalf("command %s ran %d times", id, n)
		}
	}
}

// TestCommandsDroppedOnTheWayAreCaughtUp: commands that come faster than
// they run overflow what waits (here one) and are dropped by the
// subscription; the agent sees it and catches up, so that each runs once
// and none is skipped.
func TestCommandsDroppedOnTheWayAreCaughtUp(t *testing.T) {
	r, runs := simulatedRig(t, func(a *Agent) { a.liveCommands = 1 })
	var ids []string
	for range 40 {
		ids = append(ids, r.command(protocol.CommandRestartDSS, nil))
	}
	for _, id := range ids {
		if res := r.result(id); res.Status != protocol.StatusOK {
			t.Fatalf("command %s: %+v", id, res)
		}
	}
	if r.agent.commandsDropped.Load() == 0 {
		t.Fatal("no command was dropped: the test did not reach what it tests")
	}
	r.result(r.command(protocol.CommandRestartDSS, nil))
	ranOnce(t, runs, ids...)
}

// TestACommandLostOnTheWayRunsAtTheNextCatchUp: a command whose live copy
// never reached the agent (here FM_COMMANDS stored it without
// republishing it, as a failed route between bus nodes would lose it) is
// overtaken by a later one that runs live; the agent's next catch-up (here
// after a reconnection) still finds it, since it reads from the last
// sequence a catch-up verified. Each runs once. An agent restarted in
// between (the cursor as saved) finds it too.
func TestACommandLostOnTheWayRunsAtTheNextCatchUp(t *testing.T) {
	for _, restart := range []bool{false, true} {
		name := "reconnected"
		if restart {
			name = "restarted"
		}
		t.Run(name, func(t *testing.T) {
			r, runs := simulatedRig(t, func(a *Agent) { a.commandsRecheck = time.Hour })
			r.result(r.command(protocol.CommandRestartDSS, nil)) // caught up at start, and receiving
			lost := r.commandNotRepublished(protocol.CommandRestartDSS)
			later := r.command(protocol.CommandRestartDSS, nil)
			r.result(later)
			if restart {
				r.stopAgent()
				r.startAgent()
			} else if err := r.agent.nc.ForceReconnect(); err != nil {
				t.Fatal(err)
			}
			r.result(lost)
			var order []string
			for _, e := range r.events.find(func(e protocol.Event) bool { return e.Kind == protocol.EventCommand }) {
				if e.CommandID == lost || e.CommandID == later {
					order = append(order, e.CommandID)
				}
			}
			if len(order) != 2 || order[0] != later {
				t.Fatalf("results %v: want the later command's first (it ran live), then the lost one's", order)
			}
			r.result(r.command(protocol.CommandRestartDSS, nil))
			ranOnce(t, runs, later, lost)
		})
	}
}

// commandNotRepublished sends a command that FM_COMMANDS stores without
// republishing it: its live copy is lost.
func (r *rig) commandNotRepublished(kind protocol.CommandKind) string {
	r.t.Helper()
	ctx := context.Background()
	st, err := r.js.Stream(ctx, protocol.StreamCommands)
	if err != nil {
		r.t.Fatal(err)
	}
	cfg := st.CachedInfo().Config
	quiet := cfg
	quiet.RePublish = nil
	if _, err := r.js.UpdateStream(ctx, quiet); err != nil {
		r.t.Fatal(err)
	}
	id := r.command(kind, nil)
	if _, err := r.js.UpdateStream(ctx, cfg); err != nil {
		r.t.Fatal(err)
	}
	return id
}

// TestManyCommandsBetweenCatchUpsRunOnce: commands run live faster than
// catch-ups come (here 260, more than the 200 ids the cursor keeps) are
// verified along the way, so that a catch-up after them (a restart) runs
// none of them again.
func TestManyCommandsBetweenCatchUpsRunOnce(t *testing.T) {
	r, runs := simulatedRig(t, func(a *Agent) { a.commandsRecheck = time.Hour })
	var ids []string
	for range 260 {
		id := r.command(protocol.CommandRestartDSS, nil)
		r.result(id)
		ids = append(ids, id)
	}
	r.stopAgent()
	if n := r.agent.cursor.Unverified; n >= recentCommands/2 {
		t.Fatalf("%d commands ran since the last catch-up: it should have come along the way", n)
	}
	r.startAgent()
	r.result(r.command(protocol.CommandRestartDSS, nil))
	ranOnce(t, runs, ids...)
}

// TestOnlyFMCommandsRunFromTheLiveSubject: NATS does not check reply
// subjects, so another agent can have JetStream's answer to its own request
// (which carries a Nats-Sequence) sent to this agent's live subject; it is
// not taken for a command, and moves nothing.
func TestOnlyFMCommandsRunFromTheLiveSubject(t *testing.T) {
	r, runs := simulatedRig(t, nil)
	r.result(r.command(protocol.CommandRestartDSS, nil))
	forged := protocol.Command{ID: "cmd-forged", Instance: r.instance, Kind: protocol.CommandRestartDSS, Issued: time.Now().UTC()}
	data, _ := protocol.Encode(&forged)
	for _, hdr := range []nats.Header{
		{"Nats-Stream": {"KV_fm_desired"}, "Nats-Subject": {"$KV.fm_desired." + r.instance}, "Nats-Sequence": {"999999"}},
		{"Nats-Stream": {protocol.StreamCommands}, "Nats-Subject": {protocol.CommandSubject("in-other", "c1")}, "Nats-Sequence": {"999999"}},
		{"Nats-Sequence": {"999999"}},
	} {
		if err := r.nc.PublishMsg(&nats.Msg{Subject: protocol.CommandLiveSubject(r.instance), Header: hdr, Data: data}); err != nil {
			t.Fatal(err)
		}
	}
	after := r.command(protocol.CommandRestartDSS, nil)
	if res := r.result(after); res.Status != protocol.StatusOK {
		t.Fatalf("a command after the forged ones: %+v", res)
	}
	if runs("cmd-forged") != 0 || r.events.find(func(e protocol.Event) bool { return e.Kind == protocol.EventRejected }) != nil {
		t.Fatal("a message not republished by FM_COMMANDS was taken for a command")
	}
	r.stopAgent()
	if seq := r.agent.cursor.LastSeq; seq == 0 || seq >= 999999 {
		t.Fatalf("the cursor is at %d", seq)
	}
}
