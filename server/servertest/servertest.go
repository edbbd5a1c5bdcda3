// Package servertest starts a real FM server in-process, on a real JetStream
// server (bustest), for the tests of any package. Everything it starts is
// stopped when the test ends.
package servertest

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/server"
	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
)

// Env is a running server and its bus.
type Env struct {
	Bus    *bustest.Server
	Server *server.Server
	Conn   *nats.Conn
	// URL is the server's base URL (http://127.0.0.1:port).
	URL string
	// Key is an admin API key.
	Key     server.KeyFile
	KeyFile string

	cfg    server.Config
	cancel context.CancelFunc
	done   chan struct{}
	dead   *atomic.Bool // set by Die: the server's end is no error
}

// Option changes the server's configuration before it starts.
type Option func(*server.Config)

// WithNetwork sets FM's own network (for useDefaultValues=True).
func WithNetwork(d server.NetworkDefaults) Option {
	return func(c *server.Config) { c.Network = d }
}

// WithConfig changes the server's configuration.
func WithConfig(change func(*server.Config)) Option { return change }

// WithLogger sets the server's logger (default: none).
func WithLogger(l zerolog.Logger) Option {
	return func(c *server.Config) { c.Logger = l }
}

// Start starts a bus and a server with an admin key.
func Start(t testing.TB, opts ...Option) *Env {
	t.Helper()
	e := &Env{Bus: bustest.Run(t), KeyFile: filepath.Join(t.TempDir(), "admin-key.json")}
	e.cfg = server.Config{Logger: zerolog.Nop(), StartTimeout: 20 * time.Second, SecretKey: seal.NewKey()}
	for _, o := range opts {
		o(&e.cfg)
	}
	e.start(t)
	return e
}

func (e *Env) start(t testing.TB) {
	t.Helper()
	e.Conn = e.Bus.Connect(t)
	cfg := e.cfg
	cfg.Conn = e.Conn
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Listener = ln
	s, err := server.New(cfg)
	if err != nil {
		ln.Close()
		t.Fatalf("servertest: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := s.EnsureAdminKey(ctx, e.KeyFile); err != nil {
		s.Close()
		t.Fatalf("servertest: admin key: %v", err)
	}
	b, err := os.ReadFile(e.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &e.Key); err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(context.Background())
	e.Server, e.cancel, e.done = s, stop, make(chan struct{})
	dead := &atomic.Bool{}
	e.dead = dead
	go func() {
		defer close(e.done)
		if err := s.Run(runCtx); err != nil && !dead.Load() {
			t.Errorf("servertest: run: %v", err)
		}
	}()
	e.URL = "http://" + s.Addr().String()
	t.Cleanup(e.Stop)
}

// Replica starts another server on the same bus with the same
// configuration and keys (the one that seals secrets, the admin key), as a
// second `fm server` behind a load balancer is. It stops when the test
// ends.
func (e *Env) Replica(t testing.TB) *Env {
	t.Helper()
	r := &Env{Bus: e.Bus, KeyFile: e.KeyFile, cfg: e.cfg}
	r.start(t)
	return r
}

// Stop stops the server (not the bus); safe to call twice.
func (e *Env) Stop() {
	if e.cancel == nil {
		return
	}
	e.cancel()
	<-e.done
	e.Server.Close()
	e.Conn.Close()
	e.cancel = nil
}

// Die stops the server as the death of its process would: its bus
// connection and its listener (with the requests under way) go at once, and
// nothing waits for its work. A crash hook (server.Config.Crash) calls it
// from the goroutine that dies, which it then parks. Start it again with
// StartAgain.
func (e *Env) Die() {
	if e.cancel == nil {
		return
	}
	e.dead.Store(true)
	e.Conn.Close()
	e.Server.Close()
	e.cancel()
	e.cancel = nil
}

// StartAgain starts a new server on the same bus after Die, with change
// applied to the configuration (nil: the same one).
func (e *Env) StartAgain(t testing.TB, change func(*server.Config)) {
	t.Helper()
	if change != nil {
		change(&e.cfg)
	}
	e.start(t)
}

// RestartServer stops the server and starts a new one on the same bus, as
// a restart of `fm server` alone would.
func (e *Env) RestartServer(t testing.TB) {
	t.Helper()
	e.Stop()
	e.start(t)
}

// Restart stops the server and the bus, starts the bus again on the same
// store and a new server on it, as a restart of `fm dev` would.
func (e *Env) Restart(t testing.TB) {
	t.Helper()
	e.Stop()
	e.Bus.Restart(t)
	e.start(t)
}

// OpenSecret opens what the server sealed with FM's secret key for where,
// as a provisioner that holds the key does (a new machine's join token).
func (e *Env) OpenSecret(sealed, where string) (string, error) {
	box, err := seal.New(e.cfg.SecretKey)
	if err != nil {
		return "", err
	}
	return box.Open(sealed, where)
}
