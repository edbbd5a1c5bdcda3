package server_test

import (
	"context"
	"encoding/json"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
	"github.com/fleetmanager/fm/server/servertest"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// fakeProvisioner answers snapshot requests as a provisioner whose snapshots
// succeed (or fail, while failSnapshots or failDeletes is set), and records
// them.
type fakeProvisioner struct {
	mu            sync.Mutex
	grown         []int // sizes asked for
	taken         []string
	at            []time.Time // when each was asked for
	deleted       []string
	deletedAt     []time.Time
	failSnapshots bool
	failDeletes   bool
}

func runFakeProvisioner(t *testing.T, bus *bustest.Server) *fakeProvisioner {
	t.Helper()
	js := bus.JetStream(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	cons, err := js.CreateOrUpdateConsumer(ctx, protocol.StreamProvision, jetstream.ConsumerConfig{
		Durable: "fake", AckPolicy: jetstream.AckExplicitPolicy, FilterSubject: protocol.SubjectAllProvision})
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeProvisioner{}
	cc, err := cons.Consume(func(m jetstream.Msg) {
		var req protocol.ProvisionRequest
		if protocol.Decode(m.Data(), &req) != nil {
			_ = m.Ack()
			return
		}
		if req.Action == protocol.ProvisionGrowVolume {
			f.grow(ctx, t, js, req)
			_ = m.Ack()
			return
		}
		if req.Snapshot == nil {
			_ = m.Ack()
			return
		}
		ref := *req.Snapshot
		var failure *protocol.Error
		f.mu.Lock()
		if req.Action == protocol.ProvisionSnapshot {
			f.taken, f.at = append(f.taken, ref.ID), append(f.at, time.Now())
			if f.failSnapshots {
				failure = &protocol.Error{Code: protocol.CodeUnavailable, Message: "the store is down"}
			} else {
				ref.Store, ref.Ref, ref.SHA256 = "fake", "fake/"+ref.ID, "00"
			}
		} else {
			f.deleted, f.deletedAt = append(f.deleted, ref.ID), append(f.deletedAt, time.Now())
			if f.failDeletes {
				failure = &protocol.Error{Code: protocol.CodeUnavailable, Message: "the store is down"}
			}
		}
		f.mu.Unlock()
		e := protocol.Event{ID: req.ID + "-done", Instance: req.Instance, Kind: protocol.EventSnapshot, Time: time.Now().UTC(),
			Source: "provisioner", OpID: req.OpID, Step: string(req.Action), Status: protocol.StatusOK, Snapshot: &ref}
		if failure != nil {
			e.Status, e.Error = protocol.StatusFailed, failure
		}
		data, _ := protocol.Encode(&e)
		_, _ = js.Publish(ctx, protocol.EventSubject(req.Instance, e.Kind), data)
		_ = m.Ack()
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cc.Stop)
	return f
}

// grow records the new size, as a provisioner does, and reports it.
func (f *fakeProvisioner) grow(ctx context.Context, t *testing.T, js jetstream.JetStream, req protocol.ProvisionRequest) {
	f.mu.Lock()
	f.grown = append(f.grown, req.VolumeSizeGB)
	f.mu.Unlock()
	kv, _ := js.KeyValue(ctx, protocol.BucketMachines)
	if entry, err := kv.Get(ctx, req.Instance); err == nil {
		var m protocol.MachineState
		if protocol.Decode(entry.Value(), &m) == nil {
			m.VolumeSizeGB = req.VolumeSizeGB
			data, _ := protocol.Encode(&m)
			_, _ = kv.Put(ctx, req.Instance, data)
		}
	}
	e := protocol.Event{ID: req.ID + "-ok", Instance: req.Instance, Kind: protocol.EventMachine, Time: time.Now().UTC(),
		Source: "provisioner", OpID: req.OpID, Step: string(req.Action), Status: protocol.StatusOK, Message: "grown"}
	data, _ := protocol.Encode(&e)
	_, _ = js.Publish(ctx, protocol.EventSubject(req.Instance, e.Kind), data)
}

func (f *fakeProvisioner) counts() (taken, deleted int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.taken), len(f.deleted)
}

// runningWithVolume records an instance as running on a machine with a data
// volume, as the provisioner and the folding would have.
func runningWithVolume(t testing.TB, bus *bustest.Server, id string) {
	t.Helper()
	js := bus.JetStream(t)
	ctx := context.Background()
	kv, err := js.KeyValue(ctx, protocol.BucketMachines)
	if err != nil {
		t.Fatal(err)
	}
	m := protocol.MachineState{Instance: id, Backend: "fake", Status: protocol.MachineRunning, MachineID: "m-1", VolumeID: "vol-1",
		VolumeSizeGB: 50, RequestID: "op-0-reprovision"}
	data, _ := protocol.Encode(&m)
	if _, err := kv.Put(ctx, id, data); err != nil {
		t.Fatal(err)
	}
	lkv, err := js.KeyValue(ctx, protocol.BucketLifecycle)
	if err != nil {
		t.Fatal(err)
	}
	lc, _ := json.Marshal(map[string]any{"state": "running", "generation": 1, "dssVersion": "14.0.0", "imageId": "dss-14.0.0-test",
		"since": time.Now().UTC(), "updatedAt": time.Now().UTC()})
	if _, err := lkv.Put(ctx, id, lc); err != nil {
		t.Fatal(err)
	}
}

func (f *fm) snapshots(id string) []api.Snapshot {
	f.t.Helper()
	var list []api.Snapshot
	f.ok(f.do("GET", "/instances/"+id+"/snapshots", ""), &list)
	return list
}

// startScheduling starts a server whose scheduler hour lasts hour, a fake
// provisioner, and a running instance with an automated snapshot every hour
// and the retention keep.
func startScheduling(t *testing.T, hour time.Duration, keep int) (*fm, *fakeProvisioner, api.Instance) {
	t.Helper()
	f := start(t, servertest.WithLogger(zerolog.New(zerolog.NewTestWriter(t))), servertest.WithConfig(func(c *server.Config) {
		c.SnapshotHour, c.SchedulerInterval, c.SweepInterval = hour, 100*time.Millisecond, 200*time.Millisecond
	}))
	fake := runFakeProvisioner(t, f.env.Bus)
	vn, tpl, im := f.fleet()
	var in api.Instance
	body := `{"label":"auto","virtualNetworkId":"` + vn.ID + `","instanceSettingsTemplateId":"` + tpl.ID + `","imageId":"` + im.ID +
		`","dssNodeType":"design","enableAutomatedSnapshot":true,"automatedSnapshotPeriod":1,"automatedSnapshotRetention":` + strconv.Itoa(keep) + `}`
	f.ok(f.do("POST", "/instances", body), &in)
	runningWithVolume(t, f.env.Bus, in.ID)
	return f, fake, in
}

// TestAutomatedSnapshots runs the scheduler with an hour of two seconds: it
// takes a snapshot every period, keeps the retention's count of automated
// ones (never deleting a manual one), and across a restart of the server
// neither skips a snapshot nor takes one twice.
func TestAutomatedSnapshots(t *testing.T) {
	const hour = 2 * time.Second
	f, fake, in := startScheduling(t, hour, 2)
	var manual api.Snapshot
	waitFor(t, "a manual snapshot accepted", func() bool {
		return f.do("POST", "/instances/"+in.ID+"/snapshots?reasonForSnapshot=keep", "").status == 200
	})

	waitFor(t, "three automated snapshots", func() bool { taken, _ := fake.counts(); return taken >= 4 })
	before := time.Now()
	f.env.RestartServer(t)
	restart := time.Since(before)
	waitFor(t, "five automated snapshots", func() bool { taken, _ := fake.counts(); return taken >= 6 })
	waitFor(t, "the retention applied", func() bool {
		auto := 0
		for _, sn := range f.snapshots(in.ID) {
			if sn.Automated && sn.State == api.SnapshotAvailable {
				auto++
			}
		}
		return auto == 2
	})
	list := f.snapshots(in.ID)
	for _, sn := range list {
		if !sn.Automated {
			manual = sn
		}
	}
	if manual.Reason != "keep" || manual.State != api.SnapshotAvailable {
		t.Fatalf("the manual snapshot is gone or wrong: %+v", list)
	}
	// Every automated snapshot ever asked for: none twice, consecutive ones
	// a period apart (a doubled one would come at once), none skipped (two
	// periods apart, beyond the restart's own time).
	fake.mu.Lock()
	defer fake.mu.Unlock()
	seen := map[string]bool{}
	var at []time.Time
	for i, id := range fake.taken {
		if id == manual.ID {
			continue
		}
		if seen[id] {
			t.Fatalf("snapshot %s taken twice: %v", id, fake.taken)
		}
		seen[id] = true
		at = append(at, fake.at[i])
	}
	for i := 1; i < len(at); i++ {
		gap := at[i].Sub(at[i-1])
		if gap < hour/2 {
			t.Fatalf("two automated snapshots %s apart: doubled (%v)", gap, at)
		}
		if gap > hour+restart+hour/2 {
			t.Fatalf("%s between two automated snapshots: a period skipped (restart took %s; %v)", gap, restart, at)
		}
	}
	if len(fake.deleted) < 2 {
		t.Fatalf("the retention deleted %v", fake.deleted)
	}
	if got := f.doneByFM("snapshots"); got["snapshot.scheduled ok"] != len(seen) || got["snapshot.expired ok"] != len(fake.deleted) {
		t.Fatalf("the scheduler's work on the audit trail: %v; taken %d, deleted %d", got, len(seen), len(fake.deleted))
	}
}

// TestAutomatedSnapshotFailures: failing automated snapshots never push a
// good one out of the retention; once one succeeds again the failed ones are
// deleted; a deletion that fails is retried a period later, not at every tick,
// and leaves a failed snapshot failed.
func TestAutomatedSnapshotFailures(t *testing.T) {
	const hour = 2 * time.Second
	f, fake, in := startScheduling(t, hour, 3)
	states := func() (available, failed []string) {
		for _, sn := range f.snapshots(in.ID) {
			switch {
			case !sn.Automated:
			case sn.State == api.SnapshotAvailable:
				available = append(available, sn.ID)
			case sn.State == api.SnapshotFailed:
				failed = append(failed, sn.ID)
			}
		}
		return available, failed
	}
	set := func(apply func()) {
		fake.mu.Lock()
		defer fake.mu.Unlock()
		apply()
	}

	waitFor(t, "two automated snapshots", func() bool { a, _ := states(); return len(a) == 2 })
	good, _ := states()
	set(func() { fake.failSnapshots = true })
	waitFor(t, "three failed automated snapshots", func() bool { _, failed := states(); return len(failed) == 3 })
	if available, _ := states(); !slices.Equal(available, good) {
		t.Fatalf("failed snapshots pushed good ones out: %v, were %v", available, good)
	}
	if _, deleted := fake.counts(); deleted != 0 {
		t.Fatalf("deleted while every new snapshot failed: %v", fake.deleted)
	}

	// One success: the failed snapshots before it go, but their deletion
	// fails for a while.
	set(func() { fake.failSnapshots, fake.failDeletes = false, true })
	waitFor(t, "a deletion tried", func() bool { _, deleted := fake.counts(); return deleted >= 1 })
	var first string
	set(func() { first = fake.deleted[0] })
	var sn api.Snapshot
	waitFor(t, "the failed deletion folded", func() bool {
		f.ok(f.do("GET", "/instances/"+in.ID+"/snapshots/"+first, ""), &sn)
		return sn.State != api.SnapshotDeleting
	})
	if sn.State != api.SnapshotFailed {
		t.Fatalf("a failed deletion of failed snapshot %s left it %s", first, sn.State)
	}
	waitFor(t, "a second deletion", func() bool { _, deleted := fake.counts(); return deleted >= 2 })
	set(func() {
		if gap := fake.deletedAt[1].Sub(fake.deletedAt[0]); gap < hour/2 {
			t.Errorf("a failed deletion tried again %s later: %v", gap, fake.deleted)
		}
		fake.failDeletes = false
	})
	waitFor(t, "the failed snapshots deleted, the retention kept", func() bool {
		available, failed := states()
		return len(failed) == 0 && len(available) == 3
	})
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("never: %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestSnapshotMetrics: the metrics say when an instance's last good
// snapshot was taken, whether its last one failed, and the period of its
// automated snapshots, so that an alert can say one is overdue.
func TestSnapshotMetrics(t *testing.T) {
	f, fake, in := startScheduling(t, 2*time.Second, 0)
	series := func(name string) string {
		t.Helper()
		r := f.do("GET", "/metrics", "")
		for _, l := range strings.Split(string(r.body), "\n") {
			if strings.HasPrefix(l, name+`{instance_id="`+in.ID+`"} `) {
				return strings.TrimPrefix(l, name+`{instance_id="`+in.ID+`"} `)
			}
		}
		return ""
	}
	waitSeries := func(name, want string) {
		t.Helper()
		for deadline := time.Now().Add(20 * time.Second); series(name) != want; time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s is %q, want %q", name, series(name), want)
			}
		}
	}
	// 2 seconds: an hour lasts 2 s here. Shown once the instance runs.
	waitSeries("fm_instance_automated_snapshot_period_seconds", "2")
	waitSeries("fm_instance_snapshot_last_failed", "0")
	took, err := strconv.ParseFloat(series("fm_instance_snapshot_last_success_timestamp_seconds"), 64)
	if err != nil || time.Since(time.UnixMilli(int64(took*1000))) > time.Minute {
		t.Fatalf("last good snapshot at %v (%v), want a moment ago", took, err)
	}
	fake.mu.Lock()
	fake.failSnapshots = true
	fake.mu.Unlock()
	waitSeries("fm_instance_snapshot_last_failed", "1")
	if again, _ := strconv.ParseFloat(series("fm_instance_snapshot_last_success_timestamp_seconds"), 64); again < took {
		t.Fatalf("a failed snapshot moved the last good one back: %v, was %v", again, took)
	}
}
