package agent

import (
	"context"
	"os"
	"path/filepath"
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

// TestAfterABusRestartCommandsFlowAtOnce: the command consumer lives in
// memory and goes with a bus restart; the agent asks for it again as it
// reconnects, instead of waiting to miss the consumer's heartbeats (a
// minute), and beats at once so that FM sees it back.
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
