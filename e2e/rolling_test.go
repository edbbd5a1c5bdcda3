package e2e

import (
	"fmt"
	"net/http"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// TestRollingRestartFailsNoCall restarts everything FM runs on, one at a
// time and under load, as an upgrade does: every NATS node (in lame-duck
// mode, as docs/cluster.md says), every fm server replica (behind a load
// balancer that checks /healthz every 100 ms and does not try another
// replica when one refuses a connection; each drains for a second before
// it stops)
// and every provisioner (SIGINT: each hands back what it holds). Meanwhile
// a client lists the instances through the balancer, and another runs
// operations one after the other (a restart of DSS through the agent, a
// stop and a start through the provisioner): no call fails and every
// operation succeeds.
func TestRollingRestartFailsNoCall(t *testing.T) {
	lb := StartLoadBalancer(t)
	args := []string{"--advertise-url", "https://" + lb.Addr, "--drain", "1s"}
	c := startClusterFM(t, args...)
	replicas := []struct {
		proc       *Proc
		data, addr string
	}{{c.server, c.data, c.addr}, {nil, filepath.Join(c.tmp, "fm-b"), FreePort(t)}}
	replicas[1].proc = c.startServer(t, replicas[1].data, replicas[1].addr, args...)
	lb.SetBackends(replicas[0].addr, replicas[1].addr)
	ca := filepath.Join(c.data, "tls", "ca.pem")
	lb.CheckHealth(TrustingClient(t, ca, time.Second), "/healthz")
	// A call sent to a replica that stopped listening fails, as behind a
	// cloud balancer: only the drain keeps the calls whole.
	lb.OneDial()
	c.env = c.envOf(lb.Addr)
	provs := []*Proc{c.prov, c.startProvisioner(t)}
	in := c.newInstance(t, "r1")
	c.fm(t, "instance", "provision", in, "--wait")

	// A new connection for every call, as most clients of a load balancer
	// make (and none sent twice by Go's transport on a closed connection).
	client := TrustingClient(t, ca, 30*time.Second)
	client.Transport.(*http.Transport).DisableKeepAlives = true
	rest := NewPython(t, "https://"+lb.Addr, filepath.Join(c.data, "admin-key.json"))
	rest.Client = client
	var (
		mu         sync.Mutex
		failures   []string
		reads, ops int
	)
	fail := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		failures = append(failures, time.Now().Format("15:04:05.000 ")+fmt.Sprintf(format, args...))
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			var list []struct{ ID string }
			if code, err := rest.Try("GET", "/instances", "", &list); err != nil || code != 200 || len(list) != 1 {
				fail("GET /instances: %d, %d instances, %v", code, len(list), err)
			}
			mu.Lock()
			reads++
			mu.Unlock()
		}
	}()
	go func() {
		defer wg.Done()
		for n := 0; ; n++ {
			select {
			case <-stop:
				return
			default:
			}
			action := []string{"restart-dss", "stop", "start"}[n%3]
			var f struct{ JobID string }
			if code, err := rest.Try("GET", "/instances/"+in+"/actions/"+action, "", &f); err != nil || code != 200 {
				fail("%s: %d %v", action, code, err)
				return // the instance's state is no longer known
			}
			for deadline := time.Now().Add(3 * time.Minute); ; time.Sleep(200 * time.Millisecond) {
				var op struct {
					State string
					Error any
				}
				code, err := rest.Try("GET", "/futures/"+f.JobID+"?peek=True", "", &op)
				if err != nil || code != 200 {
					fail("GET /futures/%s: %d %v", f.JobID, code, err)
				} else if op.State == "succeeded" {
					break
				} else if op.State != "running" {
					fail("%s %s: %s (%v)", action, f.JobID, op.State, op.Error)
					return
				}
				if time.Now().After(deadline) {
					fail("%s %s: not ended after 3 minutes", action, f.JobID)
					return
				}
			}
			mu.Lock()
			ops++
			mu.Unlock()
		}
	}()

	began := time.Now()
	for i, n := range c.nats.Nodes {
		took := c.nats.LameDuck(i)
		c.nats.Start(i)
		back := c.nats.WaitHealthy(i, 2*time.Minute)
		t.Logf("%s: stopped in lame-duck mode in %s, back and current in %s", n.Name, took.Round(time.Millisecond), back.Round(time.Millisecond))
	}
	for i, r := range replicas {
		stopping := time.Now()
		if err := r.proc.Interrupt(30 * time.Second); err != nil {
			t.Errorf("replica %d stopped with %v", i+1, err)
		}
		stopped := time.Since(stopping)
		c.startServer(t, r.data, r.addr, args...)
		t.Logf("server replica %d: drained and stopped in %s, back in %s", i+1, stopped.Round(time.Millisecond), time.Since(stopping).Round(time.Millisecond))
	}
	for i, p := range provs {
		if err := p.Interrupt(30 * time.Second); err != nil {
			t.Errorf("provisioner %d stopped with %v", i+1, err)
		}
		provs[i] = c.startProvisioner(t)
	}
	// A round of operations more, through the provisioners started last.
	mu.Lock()
	want := ops + 3
	mu.Unlock()
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(100 * time.Millisecond) {
		mu.Lock()
		done, failed := ops, len(failures)
		mu.Unlock()
		if done >= want || failed > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("no round of operations after the restarts: %d operations, want %d", done, want)
			break
		}
	}
	close(stop)
	wg.Wait()
	t.Logf("rolling restart of 3 nodes, 2 replicas and 2 provisioners in %s: %d lists and %d operations, %d failed",
		time.Since(began).Round(time.Second), reads, ops, len(failures))
	for _, f := range failures {
		t.Error(f)
	}
	if reads < 100 || ops < 6 {
		t.Errorf("too little load to tell: %d lists, %d operations", reads, ops)
	}
}
