package provisioner

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/protocol"
)

// profiled is a backend whose machines start with a startup profile.
type profiled struct {
	*recorder
	mu     sync.Mutex
	checks int      // Alive calls: one per machine check
	swaps  []string // machines given their runtime profile
	during func()   // run inside the swap's cloud call, once
}

func (p *profiled) Reprovision(ctx context.Context, req Request, cur protocol.MachineState) (protocol.MachineState, error) {
	st, err := p.recorder.Reprovision(ctx, req, cur)
	st.Details = map[string]string{protocol.DetailMadeBy: req.ID, protocol.DetailInstanceProfile: "arn:startup",
		protocol.DetailRuntimeProfile: "arn:runtime"}
	return st, err
}

func (p *profiled) Alive(ctx context.Context, machines []protocol.MachineState) (map[string]bool, error) {
	p.mu.Lock()
	p.checks++
	p.mu.Unlock()
	return p.recorder.Alive(ctx, machines)
}

func (p *profiled) UseRuntimeProfile(ctx context.Context, st protocol.MachineState) error {
	p.mu.Lock()
	p.swaps = append(p.swaps, st.MachineID+" "+st.Details[protocol.DetailRuntimeProfile])
	during := p.during
	p.during = nil
	p.mu.Unlock()
	if during != nil {
		during()
	}
	return nil
}

func (p *profiled) counts() (checks, swaps int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.checks, len(p.swaps)
}

// TestTheRuntimeProfileOnceDSSIsSetUp: a machine made with a startup
// profile is given its runtime profile once its own agent reports DSS
// running at the machine's generation, not before, not on the word of the
// agent of another machine; it is recorded, and done once.
func TestTheRuntimeProfileOnceDSSIsSetUp(t *testing.T) {
	r := newRig(t)
	b := &profiled{recorder: newRecorder()}
	r.run(b, "p1")
	r.request("in-p", protocol.ProvisionReprovision, "rq-1")
	r.waitMachine("in-p", func(st protocol.MachineState) bool { return st.Status == protocol.MachineRunning })
	// Another machine, never set up, keeps the machine checks going while
	// in-p's record says it is being stopped.
	r.request("in-o", protocol.ProvisionReprovision, "rq-o")
	r.waitMachine("in-o", func(st protocol.MachineState) bool { return st.Status == protocol.MachineRunning })
	agents, err := r.js.KeyValue(context.Background(), protocol.BucketAgents)
	if err != nil {
		t.Fatal(err)
	}
	report := func(ag protocol.AgentStatus) {
		t.Helper()
		ag.Instance, ag.Time = "in-p", time.Now().UTC()
		data, err := protocol.Encode(&ag)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := agents.Put(context.Background(), "in-p", data); err != nil {
			t.Fatal(err)
		}
	}
	// waitChecks lets the provisioner check its machines three more times.
	waitChecks := func() {
		t.Helper()
		from, _ := b.counts()
		deadline := time.Now().Add(10 * time.Second)
		for checks, _ := b.counts(); checks < from+3; checks, _ = b.counts() {
			if time.Now().After(deadline) {
				t.Fatal("the provisioner checks its machines no more")
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	ready := protocol.AgentStatus{MachineRequest: "rq-1", Generation: 1, Target: 1, Phase: protocol.PhaseReady,
		DSS: protocol.DSSStatus{State: protocol.DSSRunning}}
	for _, tc := range []struct {
		name string
		ag   func() protocol.AgentStatus
	}{
		{"still installing", func() protocol.AgentStatus { ag := ready; ag.Phase = protocol.PhaseConverging; return ag }},
		{"ready at an earlier generation", func() protocol.AgentStatus { ag := ready; ag.Generation = 0; return ag }},
		{"DSS not running", func() protocol.AgentStatus { ag := ready; ag.DSS.State = protocol.DSSStopped; return ag }},
		{"the agent of an earlier machine", func() protocol.AgentStatus { ag := ready; ag.MachineRequest = "rq-0"; return ag }},
	} {
		report(tc.ag())
		waitChecks()
		if _, swaps := b.counts(); swaps != 0 {
			t.Fatalf("%s: the runtime profile was given", tc.name)
		}
	}
	// A request takes the machine while the swap's cloud call is under
	// way (its record says so): the swap records nothing over it.
	machines, err := r.js.KeyValue(context.Background(), protocol.BucketMachines)
	if err != nil {
		t.Fatal(err)
	}
	taken := make(chan struct{})
	b.mu.Lock()
	b.during = func() {
		defer close(taken)
		st := r.machine("in-p")
		st.Status, st.RequestID = protocol.MachineStopping, "rq-2"
		data, err := protocol.Encode(&st)
		if err != nil {
			t.Error(err)
			return
		}
		if _, err := machines.Put(context.Background(), "in-p", data); err != nil {
			t.Error(err)
		}
	}
	b.mu.Unlock()
	report(ready)
	<-taken
	waitChecks()
	if st := r.machine("in-p"); st.Status != protocol.MachineStopping || st.RequestID != "rq-2" || st.Details[protocol.DetailInstanceProfile] != "arn:startup" {
		t.Fatalf("the swap wrote over a request's record: %+v", st)
	}
	// The request ends with the machine running again: the swap is done
	// (again: a no-op for a backend) and recorded.
	st := r.machine("in-p")
	st.Status = protocol.MachineRunning
	data, err := protocol.Encode(&st)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := machines.Put(context.Background(), "in-p", data); err != nil {
		t.Fatal(err)
	}
	st = r.waitMachine("in-p", func(st protocol.MachineState) bool { return st.Details[protocol.DetailRuntimeProfile] == "" })
	if st.Details[protocol.DetailInstanceProfile] != "arn:runtime" || st.Status != protocol.MachineRunning || st.RequestID != "rq-2" {
		t.Fatalf("machine after the swap: %+v", st)
	}
	waitChecks()
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.swaps) != 2 || b.swaps[1] != "m-in-p arn:runtime" {
		t.Fatalf("swaps %v", b.swaps)
	}
}
