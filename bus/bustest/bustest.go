// Package bustest starts a real JetStream-enabled nats-server for tests, on a
// random loopback port with its store in a temporary folder, and stops it when
// the test ends. Any package's tests may import it.
package bustest

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/bus/embedded"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// Server is a running test server.
type Server struct {
	t        testing.TB
	storeDir string
	listen   string
	emb      *embedded.Server
}

// Run starts a server and, unless declare is false, declares FM's topology
// on it. The server is shut down at the end of the test.
func Run(t testing.TB) *Server {
	t.Helper()
	s := start(t, filepath.Join(t.TempDir(), "jetstream"), "127.0.0.1:0")
	s.Declare(t)
	return s
}

// RunBare starts a server without FM's topology.
func RunBare(t testing.TB) *Server {
	t.Helper()
	return start(t, filepath.Join(t.TempDir(), "jetstream"), "127.0.0.1:0")
}

func start(t testing.TB, storeDir, listen string) *Server {
	t.Helper()
	emb, err := embedded.Start(embedded.Config{
		StoreDir:     storeDir,
		Listen:       listen,
		ServerName:   "bustest",
		ReadyTimeout: 20 * time.Second,
		Logger:       zerolog.Nop(),
	})
	if err != nil {
		t.Fatalf("bustest: %v", err)
	}
	s := &Server{t: t, storeDir: storeDir, emb: emb}
	u := emb.ClientURL()
	host, port, _ := net.SplitHostPort(u[len("nats://"):])
	s.listen = net.JoinHostPort(host, port)
	t.Cleanup(s.Shutdown)
	return s
}

// URL is the client URL of the server.
func (s *Server) URL() string { return "nats://" + s.listen }

// Embedded is the running server, for in-process connections.
func (s *Server) Embedded() *embedded.Server { return s.emb }

// Shutdown stops the server; it is safe to call twice.
func (s *Server) Shutdown() {
	if s.emb != nil {
		s.emb.Shutdown()
		s.emb = nil
	}
}

// Restart stops the server and starts it again on the same port and store,
// as a bus outage would look to clients.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.Shutdown()
	var err error
	// The port was just released; binding it again can race with the
	// kernel, so retry for a short, bounded time.
	for i := 0; i < 50; i++ {
		s.emb, err = embedded.Start(embedded.Config{
			StoreDir: s.storeDir, Listen: s.listen, ServerName: "bustest",
			ReadyTimeout: 20 * time.Second, Logger: zerolog.Nop(),
		})
		if err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("bustest: restart: %v", err)
}

// Declare declares FM's default topology on the server.
func (s *Server) Declare(t testing.TB) {
	t.Helper()
	nc := s.Connect(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := bus.DefaultTopology().Declare(ctx, js); err != nil {
		t.Fatalf("bustest: declare topology: %v", err)
	}
}

// Connect returns a client connection that is closed at the end of the test.
func (s *Server) Connect(t testing.TB) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(s.URL(), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		t.Fatalf("bustest: connect: %v", err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// ServeCommandCatchUps answers agents' requests for the commands stored
// after the last they handled (protocol.CommandsAfterRequest) as FM's
// server does, without its checks, until the test ends: for tests of an
// agent without a server.
func (s *Server) ServeCommandCatchUps(t testing.TB) {
	t.Helper()
	js := s.JetStream(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := js.Stream(ctx, protocol.StreamCommands)
	if err != nil {
		t.Fatal(err)
	}
	commands := bus.NewCommandReader(st)
	_, err = js.Conn().Subscribe(protocol.SubjectAllCmdAfter, func(m *nats.Msg) {
		var req protocol.CommandsAfterRequest
		var resp protocol.CommandsAfterResponse
		if err := protocol.Decode(m.Data, &req); err != nil {
			resp.Error = protocol.Errorf(protocol.CodeInvalidArgument, "%v", err)
		} else {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			var err error
			if resp, err = commands.After(ctx, protocol.InstanceFromSubject(m.Subject), req.After); err != nil {
				resp.Error = protocol.Errorf(protocol.CodeUnavailable, "%v", err)
			}
		}
		if data, err := protocol.Encode(&resp); err == nil {
			_ = m.Respond(data)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
}

// JetStream returns a JetStream context on a new connection.
func (s *Server) JetStream(t testing.TB) jetstream.JetStream {
	t.Helper()
	js, err := jetstream.New(s.Connect(t))
	if err != nil {
		t.Fatal(err)
	}
	return js
}

// Dump returns every message still stored in every stream of js's account
// (KV buckets, with their history, and object stores are streams too), one
// per line, for tests that look for what must not be there.
func Dump(t testing.TB, js jetstream.JetStream) string {
	t.Helper()
	ctx := context.Background()
	var b strings.Builder
	names := js.StreamNames(ctx)
	for name := range names.Name() {
		st, err := js.Stream(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		info := st.CachedInfo()
		for seq := info.State.FirstSeq; seq <= info.State.LastSeq && seq != 0; seq++ {
			if m, err := st.GetMsg(ctx, seq); err == nil {
				b.WriteString(m.Subject)
				b.WriteString(" ")
				b.Write(m.Data)
				b.WriteString("\n")
			}
		}
	}
	if err := names.Err(); err != nil {
		t.Fatal(err)
	}
	return b.String()
}
