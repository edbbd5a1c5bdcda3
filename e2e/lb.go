package e2e

import (
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// LoadBalancer is a TCP load balancer on loopback, as an operator puts in
// front of several fm server replicas: each connection goes to the next
// backend in turn, and to the one after it if that one refuses the
// connection (a replica that is down). TLS passes through, so the replicas'
// certificate must name the balancer's address (127.0.0.1 does).
type LoadBalancer struct {
	Addr     string
	ln       net.Listener
	backends atomic.Pointer[[]string]
	next     atomic.Uint64
	wg       sync.WaitGroup
	mu       sync.Mutex
	conns    map[net.Conn]bool
	// unhealthy are the backends whose last health check failed.
	unhealthy map[string]bool
	done      chan struct{}
	// oneDial: a connection goes to the backend chosen, or nowhere (as a
	// cloud balancer answers 502), not to the next when that one refuses.
	oneDial atomic.Bool
}

// OneDial makes the balancer dial only the backend it chose for a
// connection: a replica that closes its listener while the balancer still
// thinks it healthy fails the calls sent to it, as behind a cloud balancer.
func (lb *LoadBalancer) OneDial() { lb.oneDial.Store(true) }

// StartLoadBalancer listens on a free loopback port until the test ends.
// Its backends may be set later (SetBackends), once they are started with
// the balancer's address as theirs.
func StartLoadBalancer(t testing.TB, backends ...string) *LoadBalancer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lb := &LoadBalancer{Addr: ln.Addr().String(), ln: ln, conns: map[net.Conn]bool{}, unhealthy: map[string]bool{}, done: make(chan struct{})}
	lb.SetBackends(backends...)
	lb.wg.Add(1)
	go lb.serve()
	t.Cleanup(lb.close)
	return lb
}

// SetBackends sets the addresses (host:port) connections go to.
func (lb *LoadBalancer) SetBackends(backends ...string) { lb.backends.Store(&backends) }

func (lb *LoadBalancer) serve() {
	defer lb.wg.Done()
	for {
		c, err := lb.ln.Accept()
		if err != nil {
			return
		}
		lb.wg.Add(1)
		go func() { defer lb.wg.Done(); lb.forward(c) }()
	}
}

func (lb *LoadBalancer) forward(c net.Conn) {
	if !lb.track(c) {
		return
	}
	defer lb.untrack(c)
	all := *lb.backends.Load()
	first := lb.next.Add(1)
	// Healthy backends first, each in turn, then the others.
	var healthy, others []string
	lb.mu.Lock()
	for i := range uint64(len(all)) {
		b := all[(first+i)%uint64(len(all))]
		if lb.unhealthy[b] {
			others = append(others, b)
		} else {
			healthy = append(healthy, b)
		}
	}
	lb.mu.Unlock()
	candidates := append(healthy, others...)
	if lb.oneDial.Load() {
		candidates = candidates[:min(1, len(candidates))]
	}
	var up net.Conn
	for _, b := range candidates {
		var err error
		if up, err = net.DialTimeout("tcp", b, time.Second); err == nil {
			break
		}
	}
	if up == nil || !lb.track(up) {
		return
	}
	defer lb.untrack(up)
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		// Half a connection closed closes both: a replica killed must not
		// leave its clients waiting.
		_ = dst.Close()
		_ = src.Close()
		done <- struct{}{}
	}
	go pipe(up, c)
	go pipe(c, up)
	<-done
	<-done
}

// CheckHealth makes the balancer prefer the backends whose GET path
// answers 200 through client (https), checked every 100 ms, as a cloud load
// balancer's health checks do: a backend that says it is stopping gets no
// new connection while another is healthy.
func (lb *LoadBalancer) CheckHealth(client *http.Client, path string) {
	lb.wg.Add(1)
	go func() {
		defer lb.wg.Done()
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			for _, b := range *lb.backends.Load() {
				ok := false
				if resp, err := client.Get("https://" + b + path); err == nil {
					ok = resp.StatusCode == http.StatusOK
					_ = resp.Body.Close()
				}
				lb.mu.Lock()
				lb.unhealthy[b] = !ok
				lb.mu.Unlock()
			}
			select {
			case <-lb.done:
				return
			case <-tick.C:
			}
		}
	}()
}

// track registers a connection to be closed when the balancer closes; it
// refuses (closing it) once the balancer is closed.
func (lb *LoadBalancer) track(c net.Conn) bool {
	lb.mu.Lock()
	defer lb.mu.Unlock()
	if lb.conns == nil {
		_ = c.Close()
		return false
	}
	lb.conns[c] = true
	return true
}

func (lb *LoadBalancer) untrack(c net.Conn) {
	_ = c.Close()
	lb.mu.Lock()
	defer lb.mu.Unlock()
	delete(lb.conns, c)
}

func (lb *LoadBalancer) close() {
	close(lb.done)
	_ = lb.ln.Close()
	lb.mu.Lock()
	for c := range lb.conns {
		_ = c.Close()
	}
	lb.conns = nil
	lb.mu.Unlock()
	lb.wg.Wait()
}
