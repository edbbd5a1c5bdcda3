package provisioner

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/protocol"
)

// balancerRecorder is a backend that makes load balancers and records each
// call.
type balancerRecorder struct {
	*recorder
	mu    sync.Mutex
	calls []string
	flaky int // how many applies fail for now first
}

func (b *balancerRecorder) ApplyBalancer(_ context.Context, req Request, cur protocol.BalancerState) (protocol.BalancerState, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.calls = append(b.calls, "apply "+req.ID)
	if b.flaky > 0 {
		b.flaky--
		return cur, protocol.Errorf(protocol.CodeUnavailable, "ELB is away for now")
	}
	return protocol.BalancerState{Address: "lb.example.com", Nodes: req.LoadBalancer.Nodes}, nil
}

func (b *balancerRecorder) DeleteBalancer(_ context.Context, req Request, _ protocol.BalancerState) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.calls = append(b.calls, "delete "+req.ID)
	return nil
}

func (b *balancerRecorder) callList() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.calls)
}

func (r *rig) balancerRequest(id string, action protocol.ProvisionAction, reqID string, order uint64, msgID string) {
	r.t.Helper()
	r.publishBalancer(id, action, reqID, order, msgID, false)
}

func (r *rig) publishBalancer(id string, action protocol.ProvisionAction, reqID string, order uint64, msgID string, recreate bool) {
	r.t.Helper()
	r.publish(protocol.ProvisionRequest{ID: reqID, Action: action, Issued: time.Now().UTC(), Order: order,
		Deadline: time.Now().Add(time.Minute),
		LoadBalancer: &protocol.BalancerSpec{ID: id, Name: "front", Recreate: recreate, Nodes: []protocol.BalancerNode{
			{Hostname: "a.example.com", Instance: "in-a", MachineID: "m-a", Port: 10000}}}}, msgID)
}

func (r *rig) balancer(id string) protocol.BalancerState {
	r.t.Helper()
	kv, _ := r.js.KeyValue(context.Background(), protocol.BucketBalancers)
	e, err := kv.Get(context.Background(), id)
	if err != nil {
		return protocol.BalancerState{}
	}
	var st protocol.BalancerState
	if err := protocol.Decode(e.Value(), &st); err != nil {
		r.t.Fatal(err)
	}
	return st
}

func (r *rig) waitBalancer(id string, cond func(protocol.BalancerState) bool) protocol.BalancerState {
	r.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		st := r.balancer(id)
		if cond(st) {
			return st
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("load balancer %s never got there: %+v", id, st)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestBalancerRequests: a load balancer's request is carried out once,
// whatever its deliveries; a late copy of an older one is not carried out;
// a failure for now is tried again; a backend that makes no load balancers
// says so.
func TestBalancerRequests(t *testing.T) {
	r := newRig(t)
	b := &balancerRecorder{recorder: newRecorder(), flaky: 1}
	r.run(b, "p1")
	r.balancerRequest("lb-front0001", protocol.ProvisionBalancerApply, "req-1", 1, "req-1")
	st := r.waitBalancer("lb-front0001", func(st protocol.BalancerState) bool {
		return st.RequestID == "req-1" && st.Status == protocol.BalancerActive
	})
	if st.Address != "lb.example.com" || st.Order != 1 || st.Backend != "recorder" || len(st.Nodes) != 1 {
		t.Fatalf("state %+v", st)
	}
	// Delivered again (published again under another message id): not done again.
	r.balancerRequest("lb-front0001", protocol.ProvisionBalancerApply, "req-1", 1, "req-1-again")
	r.balancerRequest("lb-front0001", protocol.ProvisionBalancerDelete, "req-2", 2, "req-2")
	r.waitBalancer("lb-front0001", func(st protocol.BalancerState) bool {
		return st.RequestID == "req-2" && st.Status == protocol.BalancerDeleted
	})
	// A late copy of the first: superseded, the load balancer stays deleted.
	r.balancerRequest("lb-front0001", protocol.ProvisionBalancerApply, "req-0", 1, "req-0")
	r.balancerRequest("lb-front0001", protocol.ProvisionBalancerDelete, "req-3", 3, "req-3")
	r.waitBalancer("lb-front0001", func(st protocol.BalancerState) bool {
		return st.RequestID == "req-3" && st.Status == protocol.BalancerDeleted
	})
	if got, want := b.callList(), []string{"apply req-1", "apply req-1", "delete req-2", "delete req-3"}; !slices.Equal(got, want) {
		t.Fatalf("calls %v, want %v (the first apply failed for now once)", got, want)
	}

	// A backend without load balancers.
	r2 := newRig(t)
	r2.run(newRecorder(), "p2")
	r2.balancerRequest("lb-front0002", protocol.ProvisionBalancerApply, "req-9", 1, "req-9")
	st = r2.waitBalancer("lb-front0002", func(st protocol.BalancerState) bool { return st.RequestID == "req-9" })
	if st.Status != protocol.BalancerFailed || st.Error == nil || st.Error.Code != protocol.CodeUnimplemented {
		t.Fatalf("state %+v", st)
	}
}

// TestBalancerRecreatedOnce: a reprovision removes the load balancer once,
// however often its request is tried (a failure for now, a redelivery): a
// second removal would take down the one it made.
func TestBalancerRecreatedOnce(t *testing.T) {
	r := newRig(t)
	b := &balancerRecorder{recorder: newRecorder()}
	r.run(b, "p1")
	r.balancerRequest("lb-front0003", protocol.ProvisionBalancerApply, "req-1", 1, "req-1")
	r.waitBalancer("lb-front0003", func(st protocol.BalancerState) bool {
		return st.RequestID == "req-1" && st.Status == protocol.BalancerActive
	})
	b.mu.Lock()
	b.flaky = 2
	b.mu.Unlock()
	r.publishBalancer("lb-front0003", protocol.ProvisionBalancerApply, "req-2", 2, "req-2", true)
	st := r.waitBalancer("lb-front0003", func(st protocol.BalancerState) bool {
		return st.RequestID == "req-2" && st.Status == protocol.BalancerActive
	})
	if st.Details[detailRecreatedFor] != "" || st.Address != "lb.example.com" {
		t.Fatalf("state %+v", st)
	}
	// Delivered again after it ended: not done again.
	r.publishBalancer("lb-front0003", protocol.ProvisionBalancerApply, "req-2", 2, "req-2-again", true)
	r.balancerRequest("lb-front0003", protocol.ProvisionBalancerDelete, "req-3", 3, "req-3")
	// Not just req-3: its "deleting" record is written before the removal runs.
	r.waitBalancer("lb-front0003", func(st protocol.BalancerState) bool {
		return st.RequestID == "req-3" && st.Status == protocol.BalancerDeleted
	})
	want := []string{"apply req-1", "delete req-2", "apply req-2", "apply req-2", "apply req-2", "delete req-3"}
	if got := b.callList(); !slices.Equal(got, want) {
		t.Fatalf("calls %v, want %v (removed once, applied until it no longer failed for now)", got, want)
	}
}
