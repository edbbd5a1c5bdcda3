package server_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
	"github.com/fleetmanager/fm/server/servertest"
	"github.com/nats-io/nats.go/jetstream"
)

// TestVolumeGrowth: an agent's data-volume-high alert grows the volume (the
// provisioner, then the agent's file system), up to dataVolumeSizeMaxGB,
// where a failed operation says the maximum is reached.
func TestVolumeGrowth(t *testing.T) {
	f := start(t, servertest.WithConfig(func(c *server.Config) { c.SweepInterval = 200 * time.Millisecond }))
	fake := runFakeProvisioner(t, f.env.Bus)
	js := f.env.Bus.JetStream(t)
	vn, tpl, im := f.fleet()
	var in api.Instance
	f.ok(f.do("POST", "/instances", `{"label":"grow","virtualNetworkId":"`+vn.ID+`","instanceSettingsTemplateId":"`+tpl.ID+
		`","imageId":"`+im.ID+`","dssNodeType":"design","dataVolumeSizeGB":50,"dataVolumeSizeMaxGB":100}`), &in)
	runningWithVolume(t, f.env.Bus, in.ID) // 50 GB
	ctx := context.Background()
	var alerts [][]byte
	var alertIDs []string
	send := func(data []byte) {
		t.Helper()
		if _, err := js.Publish(ctx, protocol.EventSubject(in.ID, protocol.EventAlert), data); err != nil {
			t.Fatal(err)
		}
	}
	alert := func() {
		t.Helper()
		e := protocol.Event{ID: protocol.NewID("ev"), Instance: in.ID, Kind: protocol.EventAlert, Time: time.Now().UTC(), Source: "agent",
			Step: "data-volume-high", Status: protocol.StatusFailed, Message: "the data volume is 85% full",
			Error: protocol.Errorf(protocol.CodeResourceExhausted, "the data volume is 85%% full")}
		data, _ := protocol.Encode(&e)
		alerts, alertIDs = append(alerts, data), append(alertIDs, e.ID)
		send(data)
	}
	// The agent answers grow-filesystem commands.
	cons, err := js.CreateOrUpdateConsumer(ctx, protocol.StreamCommands, jetstream.ConsumerConfig{Durable: "fake-agent",
		AckPolicy: jetstream.AckExplicitPolicy, FilterSubject: protocol.SubjectAllCommands})
	if err != nil {
		t.Fatal(err)
	}
	commands := make(chan protocol.Command, 10)
	cc, err := cons.Consume(func(m jetstream.Msg) {
		var c protocol.Command
		if protocol.Decode(m.Data(), &c) == nil && c.Kind == protocol.CommandGrowFilesystem {
			commands <- c
			e := protocol.Event{ID: c.ID + "-done", Instance: c.Instance, Kind: protocol.EventCommand, Time: time.Now().UTC(), Source: "agent",
				CommandID: c.ID, OpID: c.OpID, Step: string(c.Kind), Status: protocol.StatusOK, Message: "grown"}
			data, _ := protocol.Encode(&e)
			_, _ = js.Publish(ctx, protocol.EventSubject(c.Instance, e.Kind), data)
		}
		_ = m.Ack()
	})
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Stop()
	growOps := func() []api.Future {
		var list []api.Future
		f.ok(f.do("GET", "/futures", ""), &list)
		var out []api.Future
		for _, op := range list {
			if op.Kind == "grow-volume" {
				out = append(out, op)
			}
		}
		return out
	}

	// answered waits until the server answered the n-th alert: events
	// are folded in order, so those sent before it were folded too.
	answered := func(n int) {
		t.Helper()
		sum := sha256.Sum256([]byte(in.ID + "/" + alertIDs[n]))
		id := "op-" + hex.EncodeToString(sum[:8])
		waitFor(t, fmt.Sprintf("alert %d answered", n+1), func() bool {
			return f.do("GET", "/futures/"+id+"?peek=True", "").status == 200
		})
	}
	// 50 GB -> 75 GB (half more), then -> 100 GB (the maximum), then no more.
	for i, want := range []int{75, 100} {
		alert()
		waitFor(t, fmt.Sprintf("growth %d done", i+1), func() bool {
			ops := growOps()
			return len(ops) == i+1 && ops[0].State == api.OpSucceeded && ops[len(ops)-1].State == api.OpSucceeded
		})
		c := <-commands
		var p protocol.GrowFilesystemParams
		if err := json.Unmarshal(c.Params, &p); err != nil || p.SizeBytes != uint64(want)<<30 {
			t.Fatalf("grow-filesystem %d: %s", i+1, c.Params)
		}
	}
	// The alerts delivered again once their growth is done (the bus hands
	// out again an event whose acknowledgement was lost) grow nothing more.
	send(alerts[0])
	send(alerts[1])
	alert()
	answered(2)
	if n := len(growOps()); n != 3 {
		t.Fatalf("%d growth operations after the alerts came again, want 3", n)
	}
	send(alerts[2]) // at the maximum, it is said once
	alert()
	answered(3)
	if n := len(growOps()); n != 4 {
		t.Fatalf("%d growth operations after the maximum was reported again, want 4", n)
	}
	var atMax api.Future
	for _, op := range growOps() {
		if op.State == api.OpFailed {
			atMax = op
		}
	}
	if atMax.Error == nil || atMax.Error.ErrorType != "ResourceExhausted" || !strings.Contains(atMax.Error.DetailedMessage, "maximum size, 100 GB") {
		t.Fatalf("at the maximum: %+v", atMax)
	}
	// The audit record follows the operation's: the future may be seen
	// before it is stored.
	waitFor(t, "volume growth on the audit trail: 2 ok, 2 failed", func() bool {
		got := f.doneByFM("instances")
		return got["volume.grow ok"] == 2 && got["volume.grow failed"] == 2
	})
	fake.mu.Lock()
	defer fake.mu.Unlock()
	if fmt.Sprint(fake.grown) != "[75 100]" {
		t.Fatalf("the provisioner was asked for %v", fake.grown)
	}
}

// TestTheDataVolumeUseComesFromTheLatestReport: an agent's status keeps its
// data volume's use only roughly (it is rewritten on a change, not on every
// measurement); a heartbeat newer than the status carries the exact figure,
// and the instance's status shows it.
func TestTheDataVolumeUseComesFromTheLatestReport(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("measured", vn.ID, tpl.ID, im.ID))
	runningWithVolume(t, f.env.Bus, in.ID)
	js := f.env.Bus.JetStream(t)
	kv, err := js.KeyValue(context.Background(), protocol.BucketAgents)
	if err != nil {
		t.Fatal(err)
	}
	status := protocol.AgentStatus{Instance: in.ID, Time: time.Now().Add(-time.Minute).UTC(), Phase: protocol.PhaseReady,
		DSS: protocol.DSSStatus{State: protocol.DSSRunning}, Machine: protocol.MachineFacts{DataVolumeBytes: 50 << 30, DataVolumeUsedBytes: 10 << 30}}
	data, _ := protocol.Encode(&status)
	if _, err := kv.Put(context.Background(), in.ID, data); err != nil {
		t.Fatal(err)
	}
	used := func() float64 {
		var st struct {
			DataVolume *struct {
				UsedBytes float64 `json:"usedBytes"`
			} `json:"dataVolume"`
		}
		f.ok(f.do("GET", "/instances/"+in.ID+"/status", ""), &st)
		if st.DataVolume == nil {
			return -1
		}
		return st.DataVolume.UsedBytes
	}
	for deadline := time.Now().Add(10 * time.Second); used() != 10<<30; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the status's data volume use never showed: %v", used())
		}
	}
	nc := f.env.Bus.Connect(t)
	const exact = 10<<30 + 123456
	hb, _ := protocol.Encode(&protocol.Heartbeat{Instance: in.ID, Time: time.Now().UTC(),
		Machine: &protocol.MachineFacts{DataVolumeBytes: 50 << 30, DataVolumeUsedBytes: exact, UptimeSeconds: 600}})
	for deadline := time.Now().Add(10 * time.Second); used() != exact; time.Sleep(20 * time.Millisecond) {
		if err := nc.Publish(protocol.HeartbeatSubject(in.ID), hb); err != nil {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("the heartbeat's data volume use never showed: %v", used())
		}
	}
}
