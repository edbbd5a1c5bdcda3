// Package embedded runs a nats-server with JetStream inside an FM process:
// the bus of fm dev and of a single-machine fm server, and of tests
// (bus/bustest). It is apart from package bus so that what only connects to
// a bus (the agent, and the slim fm-agent binary) does not link the server.
//
// cmd/fm, bus/bustest and tests import it; it imports no project package.
package embedded

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/rs/zerolog"
)

// Config configures a nats-server run inside this process.
type Config struct {
	// StoreDir is where JetStream keeps its files; it must persist.
	StoreDir string
	// Listen is the host:port clients (agents) connect to; port 0 picks a free
	// port, "" listens nowhere (in-process connections only).
	Listen string
	// ServerName names the server in logs and cluster views.
	ServerName string
	// SyncAlways fsyncs every JetStream write before acknowledging it. A
	// production deployment sets it: with the default periodic sync a power
	// loss can lose acknowledged writes.
	SyncAlways bool
	// ReadyTimeout bounds the wait for the server and JetStream to be ready.
	ReadyTimeout time.Duration
	// TLS, if set, makes clients connect with TLS.
	TLS *tls.Config
	// Configure, if set, changes the server options last: natsauth uses it
	// to put the server in operator mode.
	Configure func(*server.Options) error
	Logger    zerolog.Logger
}

// Server is a running embedded nats-server.
type Server struct {
	srv *server.Server
}

// Start starts a JetStream-enabled nats-server and waits until it
// accepts connections and JetStream is healthy.
func Start(cfg Config) (*Server, error) {
	if cfg.StoreDir == "" {
		return nil, errors.New("embedded nats: a store directory is required")
	}
	if cfg.ReadyTimeout == 0 {
		cfg.ReadyTimeout = 30 * time.Second
	}
	opts := &server.Options{
		ServerName:             cfg.ServerName,
		JetStream:              true,
		StoreDir:               cfg.StoreDir,
		SyncAlways:             cfg.SyncAlways,
		NoSigs:                 true,
		DisableJetStreamBanner: true,
		MaxPayload:             8 << 20,
	}
	if cfg.Listen == "" {
		opts.DontListen = true
	} else {
		host, portStr, err := net.SplitHostPort(cfg.Listen)
		if err != nil {
			return nil, fmt.Errorf("embedded nats: listen address %q: %w", cfg.Listen, err)
		}
		port, err := strconv.Atoi(portStr)
		if err != nil || port < 0 || port > 65535 {
			return nil, fmt.Errorf("embedded nats: listen address %q: bad port", cfg.Listen)
		}
		if port == 0 {
			port = server.RANDOM_PORT
		}
		opts.Host, opts.Port = host, port
	}
	if cfg.TLS != nil {
		opts.TLSConfig, opts.TLS, opts.TLSTimeout = cfg.TLS, true, 5
	}
	if cfg.Configure != nil {
		if err := cfg.Configure(opts); err != nil {
			return nil, fmt.Errorf("embedded nats: %w", err)
		}
	}
	srv, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("embedded nats: %w", err)
	}
	srv.SetLoggerV2(natsLogger{cfg.Logger}, false, false, false)
	srv.Start()
	e := &Server{srv: srv}
	if !srv.ReadyForConnections(cfg.ReadyTimeout) {
		e.Shutdown()
		return nil, fmt.Errorf("embedded nats: not ready for connections after %s (is %s free?)", cfg.ReadyTimeout, cfg.Listen)
	}
	// ReadyForConnections does not mean JetStream has recovered its streams;
	// Healthz does.
	deadline := time.Now().Add(cfg.ReadyTimeout)
	for {
		hs := srv.Healthz(&server.HealthzOptions{JSEnabledOnly: true})
		if hs.Error == "" {
			break
		}
		if time.Now().After(deadline) {
			e.Shutdown()
			return nil, fmt.Errorf("embedded nats: jetstream not healthy after %s: %s", cfg.ReadyTimeout, hs.Error)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return e, nil
}

// ClientURL is the URL other processes connect to ("" when not listening).
func (e *Server) ClientURL() string {
	if e.srv.Addr() == nil {
		return ""
	}
	return e.srv.ClientURL()
}

// NATS is the nats-server itself, for what this package does not wrap.
func (e *Server) NATS() *server.Server { return e.srv }

// InProcessConn is a connection without a socket (nats.InProcessServer).
func (e *Server) InProcessConn() (net.Conn, error) { return e.srv.InProcessConn() }

// Shutdown stops the server and waits until it has stopped. It is safe to call
// more than once.
func (e *Server) Shutdown() {
	e.srv.Shutdown()
	e.srv.WaitForShutdown()
}

// natsLogger routes nats-server's log lines into zerolog. Debug and trace are
// off (SetLoggerV2 flags), so only notices and worse arrive.
type natsLogger struct{ log zerolog.Logger }

func (l natsLogger) Noticef(format string, v ...any) { l.log.Info().Msgf(format, v...) }
func (l natsLogger) Warnf(format string, v ...any)   { l.log.Warn().Msgf(format, v...) }
func (l natsLogger) Fatalf(format string, v ...any)  { l.log.Error().Msgf(format, v...) }
func (l natsLogger) Errorf(format string, v ...any)  { l.log.Error().Msgf(format, v...) }
func (l natsLogger) Debugf(format string, v ...any)  { l.log.Debug().Msgf(format, v...) }
func (l natsLogger) Tracef(format string, v ...any)  { l.log.Trace().Msgf(format, v...) }
