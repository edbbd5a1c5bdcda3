package local

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fleetmanager/fm/internal/atomicfile"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
)

// The local backend's load balancers: a reverse proxy per load balancer,
// served by the provisioner that holds the lease on a port of its own on
// 127.0.0.1, sending each request to the node its Host names (host-based
// routing, as an AWS one does). What each serves is kept in
// balancers/<id>.json, so that a provisioner taking the lease serves them
// again (TakeOver), on the same ports; one giving the lease up stops them
// (GiveUp). They serve plain HTTP: an ACM certificate is AWS's.

var (
	_ provisioner.Balancers = (*Backend)(nil)
	_ provisioner.GivingUp  = (*Backend)(nil)
)

// balancerFile is what a load balancer serves, as kept on disk.
type balancerFile struct {
	ID    string                  `json:"id"`
	Port  int                     `json:"port"`
	Nodes []protocol.BalancerNode `json:"nodes"`
}

// proxy is one load balancer being served.
type proxy struct {
	srv    *http.Server
	port   int
	routes atomic.Pointer[map[string]*httputil.ReverseProxy]
}

// proxies are the load balancers this process serves.
type proxies struct {
	mu     sync.Mutex
	served map[string]*proxy
}

func (b *Backend) balancersDir() string          { return filepath.Join(b.cfg.Dir, "balancers") }
func (b *Backend) balancerPath(id string) string { return filepath.Join(b.balancersDir(), id+".json") }

// ApplyBalancer implements provisioner.Balancers: it serves the nodes of
// req.LoadBalancer, swapping the routes of a proxy already serving (no
// request is refused meanwhile), on the port it had.
func (b *Backend) ApplyBalancer(_ context.Context, req provisioner.Request, cur protocol.BalancerState) (protocol.BalancerState, error) {
	spec := req.LoadBalancer
	f := balancerFile{ID: spec.ID, Nodes: spec.Nodes}
	if old, err := b.readBalancer(spec.ID); err == nil {
		f.Port = old.Port
	} else if !errors.Is(err, fs.ErrNotExist) {
		return cur, err
	} else if p, err := strconv.Atoi(cur.Details["port"]); err == nil {
		f.Port = p
	}
	px, err := b.serve(f)
	if err != nil {
		return cur, err
	}
	f.Port = px.port
	if err := b.crash.Around("local/lb-apply/file", func() error { return b.writeBalancer(f) }); err != nil {
		return cur, err
	}
	req.Progress("load-balancer", fmt.Sprintf("serving %d node(s) at 127.0.0.1:%d", len(f.Nodes), f.Port))
	return protocol.BalancerState{Address: net.JoinHostPort("127.0.0.1", strconv.Itoa(f.Port)), Nodes: spec.Nodes,
		Details: map[string]string{"port": strconv.Itoa(f.Port), "scheme": "http"}}, nil
}

// DeleteBalancer implements provisioner.Balancers.
func (b *Backend) DeleteBalancer(_ context.Context, req provisioner.Request, _ protocol.BalancerState) error {
	b.stopProxy(req.LoadBalancer.ID)
	if err := os.Remove(b.balancerPath(req.LoadBalancer.ID)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove the load balancer's file: %w", err)
	}
	return nil
}

// serveBalancers serves every load balancer kept on disk that is not
// served yet (TakeOver).
func (b *Backend) serveBalancers() {
	entries, err := os.ReadDir(b.balancersDir())
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		b.log.Error().Err(err).Msg("load balancers to serve not looked for")
	}
	for _, e := range entries {
		id, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || !protocol.ValidToken(id) {
			continue
		}
		f, err := b.readBalancer(id)
		var px *proxy
		if err == nil {
			px, err = b.serve(f)
		}
		if err == nil && px.port != f.Port {
			// Its port was taken meanwhile: the file says where it is now
			// (the recorded address follows at its next apply).
			f.Port = px.port
			err = b.writeBalancer(f)
		}
		if err != nil {
			b.log.Error().Err(err).Str("load_balancer", id).Msg("load balancer not served; applying it again serves it")
		}
	}
}

// GiveUp implements provisioner.GivingUp: the load balancers stop with the
// lease, so that the next holder can serve them on their ports.
func (b *Backend) GiveUp() {
	b.lbs.mu.Lock()
	served := b.lbs.served
	b.lbs.served = nil
	b.lbs.mu.Unlock()
	for _, px := range served {
		_ = px.srv.Close()
	}
}

// serve serves f's nodes: by the proxy already serving it, given the new
// routes, or by a new one on f.Port (any free port if 0, or if f.Port was
// taken meanwhile: the address changes, and says so).
func (b *Backend) serve(f balancerFile) (*proxy, error) {
	routes, err := routesOf(f.Nodes)
	if err != nil {
		return nil, protocol.Errorf(protocol.CodeInvalidArgument, "%v", err)
	}
	b.lbs.mu.Lock()
	defer b.lbs.mu.Unlock()
	if px := b.lbs.served[f.ID]; px != nil {
		px.routes.Store(&routes)
		return px, nil
	}
	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(f.Port)))
	if err != nil && f.Port != 0 {
		b.log.Warn().Err(err).Int("port", f.Port).Str("load_balancer", f.ID).Msg("the load balancer's port is taken; it moves to another")
		ln, err = net.Listen("tcp", "127.0.0.1:0")
	}
	if err != nil {
		return nil, protocol.Errorf(protocol.CodeUnavailable, "no port to serve load balancer %s on: %v", f.ID, err)
	}
	px := &proxy{port: ln.Addr().(*net.TCPAddr).Port}
	px.routes.Store(&routes)
	px.srv = &http.Server{Handler: px, ReadHeaderTimeout: 30 * time.Second}
	go func() { _ = px.srv.Serve(ln) }()
	if b.lbs.served == nil {
		b.lbs.served = map[string]*proxy{}
	}
	b.lbs.served[f.ID] = px
	b.log.Info().Str("load_balancer", f.ID).Int("port", px.port).Int("nodes", len(f.Nodes)).Msg("load balancer served")
	return px, nil
}

func (b *Backend) stopProxy(id string) {
	b.lbs.mu.Lock()
	px := b.lbs.served[id]
	delete(b.lbs.served, id)
	b.lbs.mu.Unlock()
	if px != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := px.srv.Shutdown(ctx); err != nil {
			_ = px.srv.Close()
		}
	}
}

// ServeHTTP sends a request to the node its host names.
func (px *proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	host := strings.ToLower(r.Host)
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	rp := (*px.routes.Load())[host]
	if rp == nil {
		http.Error(w, fmt.Sprintf("no DSS node of this load balancer is named %q", host), http.StatusNotFound)
		return
	}
	rp.ServeHTTP(w, r)
}

// routesOf makes a reverse proxy per host name; the node keeps the Host
// it was asked for (DSS builds its links from it).
func routesOf(nodes []protocol.BalancerNode) (map[string]*httputil.ReverseProxy, error) {
	routes := make(map[string]*httputil.ReverseProxy, len(nodes))
	for _, n := range nodes {
		addr := n.Address
		if addr == "" {
			addr = "127.0.0.1"
		}
		target, err := url.Parse("http://" + net.JoinHostPort(addr, strconv.Itoa(n.Port)))
		if err != nil {
			return nil, fmt.Errorf("node %s: %w", n.Hostname, err)
		}
		routes[strings.ToLower(n.Hostname)] = &httputil.ReverseProxy{Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Host = pr.In.Host
			pr.SetXForwarded()
		}}
	}
	return routes, nil
}

func (b *Backend) readBalancer(id string) (balancerFile, error) {
	var f balancerFile
	data, err := os.ReadFile(b.balancerPath(id))
	if err != nil {
		return f, err
	}
	if err := json.Unmarshal(data, &f); err != nil {
		return f, fmt.Errorf("load balancer file %s: %w", b.balancerPath(id), err)
	}
	return f, nil
}

func (b *Backend) writeBalancer(f balancerFile) error {
	if err := os.MkdirAll(b.balancersDir(), 0o700); err != nil {
		return err
	}
	data, err := json.Marshal(f)
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(b.balancerPath(f.ID), data, 0o600)
}
