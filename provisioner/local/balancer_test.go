package local

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
	"github.com/rs/zerolog"
)

// node is a stand-in DSS that says its name and the host it was asked for.
func node(t *testing.T, name string) protocol.BalancerNode {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, name+" "+r.Host)
	}))
	t.Cleanup(srv.Close)
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	p, _ := strconv.Atoi(port)
	return protocol.BalancerNode{Hostname: name + ".example.com", Instance: "in-" + name, Address: "127.0.0.1", Port: p}
}

func get(addr, host string) (int, string) {
	req, _ := http.NewRequest("GET", "http://"+addr+"/", nil)
	req.Host = host
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestLocalLoadBalancer: the proxy sends each host to its node (which sees
// the host asked for), takes a new node without the first missing a
// request, stops with the lease and is served again on its port by the
// next holder, and goes with a delete.
func TestLocalLoadBalancer(t *testing.T) {
	dir := t.TempDir()
	b, err := New(Config{Dir: dir, AgentBinary: "/bin/true", NATSURL: "nats://127.0.0.1:1", Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.GiveUp)
	a, c := node(t, "a"), node(t, "c")
	spec := &protocol.BalancerSpec{ID: "lb-front0001", Name: "front", Nodes: []protocol.BalancerNode{a}}
	req := func(action protocol.ProvisionAction) provisioner.Request {
		return provisioner.Request{ProvisionRequest: protocol.ProvisionRequest{ID: "req-1", Action: action, LoadBalancer: spec},
			Progress: func(string, string) {}}
	}
	ctx := context.Background()
	st, err := b.ApplyBalancer(ctx, req(protocol.ProvisionBalancerApply), protocol.BalancerState{})
	if err != nil {
		t.Fatal(err)
	}
	if code, body := get(st.Address, "A.example.com:8080"); code != 200 || body != "a A.example.com:8080" {
		t.Fatalf("node a: %d %q", code, body)
	}
	if code, _ := get(st.Address, "c.example.com"); code != 404 {
		t.Fatalf("a host of no node: %d", code)
	}

	// A node added while node a is asked all along.
	stop, missed := make(chan struct{}), make(chan string, 1)
	var asked atomic.Int64
	go func() {
		defer close(missed)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if code, body := get(st.Address, "a.example.com"); code != 200 {
				missed <- body
				return
			}
			asked.Add(1)
		}
	}()
	spec.Nodes = []protocol.BalancerNode{a, c}
	st2, err := b.ApplyBalancer(ctx, req(protocol.ProvisionBalancerApply), st)
	for after := asked.Load() + 5; asked.Load() < after && len(missed) == 0; {
		time.Sleep(time.Millisecond) // a few requests after the change
	}
	close(stop)
	if m, ok := <-missed; ok {
		t.Fatalf("node a missed a request: %s", m)
	}
	if err != nil || st2.Address != st.Address {
		t.Fatalf("update: %+v %v", st2, err)
	}
	if code, body := get(st.Address, "c.example.com"); code != 200 || body != "c c.example.com" {
		t.Fatalf("node c: %d %q", code, body)
	}

	// The lease given up, then taken (by a provisioner started again).
	b.GiveUp()
	if code, _ := get(st.Address, "a.example.com"); code != 0 {
		t.Fatalf("served after the lease was given up: %d", code)
	}
	b2, err := New(Config{Dir: dir, AgentBinary: "/bin/true", NATSURL: "nats://127.0.0.1:1", Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b2.GiveUp)
	b2.TakeOver(ctx)
	if code, body := get(st.Address, "c.example.com"); code != 200 || body != "c c.example.com" {
		t.Fatalf("after a takeover: %d %q", code, body)
	}

	if err := b2.DeleteBalancer(ctx, req(protocol.ProvisionBalancerDelete), st2); err != nil {
		t.Fatal(err)
	}
	if code, _ := get(st.Address, "a.example.com"); code != 0 {
		t.Fatalf("served after a delete: %d", code)
	}
	b2.TakeOver(ctx)
	if code, _ := get(st.Address, "a.example.com"); code != 0 {
		t.Fatalf("a deleted load balancer came back: %d", code)
	}
	if err := b2.DeleteBalancer(ctx, req(protocol.ProvisionBalancerDelete), st2); err != nil {
		t.Fatalf("deleted again: %v", err)
	}
}
