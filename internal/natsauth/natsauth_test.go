package natsauth_test

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/internal/natsauth"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"
)

type rig struct {
	t    *testing.T
	auth *natsauth.Authority
	emb  *bus.Embedded
	dir  string
}

func start(t *testing.T) *rig {
	t.Helper()
	dir := t.TempDir()
	a, err := natsauth.Open(filepath.Join(dir, "auth"))
	if err != nil {
		t.Fatal(err)
	}
	r := &rig{t: t, auth: a, dir: dir}
	r.startServer()
	// FM's own user declares the topology.
	admin := r.connect("admin", jwt.Permissions{}, "", nil)
	js, _ := jetstream.New(admin)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := bus.DefaultTopology().Declare(ctx, js); err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *rig) startServer() {
	r.t.Helper()
	emb, err := bus.StartEmbedded(bus.EmbeddedConfig{
		StoreDir: filepath.Join(r.dir, "js"), Listen: "127.0.0.1:0", Logger: zerolog.Nop(),
		Configure: func(o *server.Options) error { return r.auth.ConfigureEmbedded(o, filepath.Join(r.dir, "resolver")) },
	})
	if err != nil {
		r.t.Fatal(err)
	}
	r.emb = emb
	r.t.Cleanup(emb.Shutdown)
}

// connect mints a user and connects with it; errs receives async errors.
func (r *rig) connect(name string, perms jwt.Permissions, inbox string, errs chan error) *nats.Conn {
	r.t.Helper()
	creds, _, err := r.auth.Creds(name, perms, time.Time{})
	if err != nil {
		r.t.Fatal(err)
	}
	nc, err := r.connectCreds(creds, inbox, errs)
	if err != nil {
		r.t.Fatal(err)
	}
	return nc
}

func (r *rig) connectCreds(creds []byte, inbox string, errs chan error) (*nats.Conn, error) {
	credsFile := filepath.Join(r.t.TempDir(), "user.creds")
	if err := natsauth.CredsFile(credsFile, creds); err != nil {
		return nil, err
	}
	opts := []nats.Option{nats.UserCredentials(credsFile), nats.MaxReconnects(-1), nats.ReconnectWait(50 * time.Millisecond)}
	if inbox != "" {
		opts = append(opts, nats.CustomInboxPrefix(inbox))
	}
	if errs != nil {
		opts = append(opts, nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			select {
			case errs <- err:
			default:
			}
		}))
	}
	nc, err := nats.Connect(r.emb.ClientURL(), opts...)
	if err == nil {
		r.t.Cleanup(nc.Close)
	}
	return nc, err
}

func expectViolation(t *testing.T, errs chan error, what string) {
	t.Helper()
	select {
	case err := <-errs:
		if !strings.Contains(strings.ToLower(err.Error()), "permissions violation") {
			t.Fatalf("%s: %v, want a permissions violation", what, err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: no permission error from NATS", what)
	}
}

func TestAgentCredentialsAllowItsOwnAndNothingElse(t *testing.T) {
	r := start(t)
	admin := r.connect("fm-server", jwt.Permissions{}, "", nil)
	ajs, _ := jetstream.New(admin)
	ctx := context.Background()
	kvDesired, _ := ajs.KeyValue(ctx, protocol.BucketDesired)
	kvDesired.Put(ctx, "in-a", []byte(`{"v":1,"mine":true}`))
	kvDesired.Put(ctx, "in-b", []byte(`{"v":1,"secret":"other"}`))
	ajs.Publish(ctx, protocol.CommandSubject("in-a", "c1"), []byte("for a"))
	ajs.Publish(ctx, protocol.CommandSubject("in-b", "c2"), []byte("for b"))
	kits, _ := ajs.ObjectStore(ctx, protocol.ObjectStoreKits)
	// Big enough that reading it takes flow control.
	kit := bytes.Repeat([]byte("KIT-"), 4<<20)
	if _, err := kits.PutBytes(ctx, "kit.tar.gz", kit); err != nil {
		t.Fatal(err)
	}

	errs := make(chan error, 10)
	agent := r.connect("in-a", natsauth.AgentPermissions("in-a"), protocol.InboxPrefix("in-a"), errs)
	js, _ := jetstream.New(agent)

	t.Run("its own", func(t *testing.T) {
		msg, err := agent.Request("$JS.API.DIRECT.GET.KV_fm_desired.$KV.fm_desired.in-a", nil, 5*time.Second)
		if err != nil || !strings.Contains(string(msg.Data), "mine") {
			t.Fatalf("direct get of its desired state: %v", err)
		}
		if _, err := js.Publish(ctx, protocol.EventSubject("in-a", protocol.EventStep), []byte("e")); err != nil {
			t.Fatalf("publish its event: %v", err)
		}
		if _, err := js.Publish(ctx, protocol.KVSubject(protocol.BucketAgents, "in-a"), []byte("status")); err != nil {
			t.Fatalf("put its status: %v", err)
		}
		cons, err := js.CreateConsumer(ctx, protocol.StreamCommands, jetstream.ConsumerConfig{Name: protocol.CommandConsumer("in-a"),
			FilterSubject: protocol.CommandFilter("in-a"), AckPolicy: jetstream.AckNonePolicy, MemoryStorage: true})
		if err != nil {
			t.Fatalf("consumer on its commands: %v", err)
		}
		m, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second))
		if err != nil || string(m.Data()) != "for a" {
			t.Fatalf("its command: %v", err)
		}
		store, err := js.ObjectStore(ctx, protocol.ObjectStoreKits)
		if err != nil {
			t.Fatal(err)
		}
		// A deadline of its own: without one, each request of the read
		// times out after the client's default 5 s, short on a loaded machine.
		readCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if b, err := store.GetBytes(readCtx, "kit.tar.gz"); err != nil || !bytes.Equal(b, kit) {
			t.Fatalf("read a kit: %v", err)
		}
		if err := agent.Publish(protocol.HeartbeatSubject("in-a"), []byte("hb")); err != nil {
			t.Fatal(err)
		}
		agent.Flush()
		select {
		case err := <-errs:
			t.Fatalf("its own use raised %v", err)
		default:
		}
	})

	t.Run("another instance's commands", func(t *testing.T) {
		if _, err := agent.SubscribeSync(protocol.CommandFilter("in-b")); err != nil {
			t.Fatal(err)
		}
		agent.Flush()
		expectViolation(t, errs, "subscribe to in-b's commands")
		_, err := js.OrderedConsumer(ctx, protocol.StreamCommands, jetstream.OrderedConsumerConfig{FilterSubjects: []string{protocol.CommandFilter("in-b")}})
		if err == nil {
			// The creation is refused by NATS; the client may only learn it
			// when it tries to fetch.
			cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			defer cancel()
			cons, _ := js.OrderedConsumer(cctx, protocol.StreamCommands, jetstream.OrderedConsumerConfig{FilterSubjects: []string{protocol.CommandFilter("in-b")}})
			if cons != nil {
				if m, err := cons.Next(jetstream.FetchMaxWait(2 * time.Second)); err == nil {
					t.Fatalf("read another instance's command: %s", m.Data())
				}
			}
		}
		expectViolation(t, errs, "consumer on in-b's commands")
	})

	t.Run("another instance's desired state", func(t *testing.T) {
		_, err := agent.Request("$JS.API.DIRECT.GET.KV_fm_desired.$KV.fm_desired.in-b", nil, 2*time.Second)
		if err == nil {
			t.Fatal("read another instance's desired state")
		}
		expectViolation(t, errs, "direct get of in-b's desired state")
		if _, err := agent.SubscribeSync(protocol.DesiredSubject("in-b")); err != nil {
			t.Fatal(err)
		}
		agent.Flush()
		expectViolation(t, errs, "subscribe to in-b's desired state")
	})

	t.Run("another consumer on its commands", func(t *testing.T) {
		// One consumer, of one name, is all an agent may make: it cannot
		// pile up durable ones.
		_, err := js.CreateConsumer(ctx, protocol.StreamCommands, jetstream.ConsumerConfig{Durable: "mine-too",
			FilterSubject: protocol.CommandFilter("in-a"), AckPolicy: jetstream.AckNonePolicy})
		if err == nil {
			t.Fatal("made a second consumer")
		}
		expectViolation(t, errs, "a second consumer on its commands")
	})

	t.Run("the keys of the fleet", func(t *testing.T) {
		// STREAM.INFO with a subjects filter would list every instance id.
		agent.Request("$JS.API.STREAM.INFO.KV_"+protocol.BucketAgents, []byte(`{"subjects_filter":">"}`), 500*time.Millisecond)
		expectViolation(t, errs, "stream info of KV_fm_agents")
	})

	t.Run("a roll-up of every status", func(t *testing.T) {
		if _, err := ajs.Publish(ctx, protocol.KVSubject(protocol.BucketAgents, "in-b"), []byte("b's status")); err != nil {
			t.Fatal(err)
		}
		rollup := nats.NewMsg(protocol.KVSubject(protocol.BucketAgents, "in-a"))
		rollup.Header.Set("Nats-Rollup", "all")
		rollup.Data = []byte("wipe")
		if _, err := js.PublishMsg(ctx, rollup); err == nil {
			t.Fatal("a roll-up of fm_agents was taken")
		}
		kv, _ := ajs.KeyValue(ctx, protocol.BucketAgents)
		if e, err := kv.Get(ctx, "in-b"); err != nil || string(e.Value()) != "b's status" {
			t.Fatalf("another instance's status after the roll-up: %v", err)
		}
	})

	t.Run("another instance's events and heartbeats", func(t *testing.T) {
		for _, subj := range []string{protocol.EventSubject("in-b", protocol.EventStep), protocol.HeartbeatSubject("in-b"),
			protocol.EventSubject("in-a", protocol.EventMachine), protocol.EventSubject("in-a", protocol.EventSnapshot),
			protocol.LogSubject("in-b", "dss"), "$KV.fm_agents.in-b", "$KV.fm_desired.in-a", protocol.ProvisionSubject("in-a", protocol.ProvisionDelete)} {
			agent.Publish(subj, []byte("forged"))
			agent.Flush()
			expectViolation(t, errs, "publish on "+subj)
		}
	})

	t.Run("administration", func(t *testing.T) {
		for _, subj := range []string{"$JS.API.STREAM.DELETE.FM_EVENTS", "$JS.API.STREAM.PURGE.FM_COMMANDS", "$JS.API.STREAM.NAMES",
			"$JS.API.STREAM.INFO.FM_COMMANDS", "$JS.API.CONSUMER.CREATE.FM_EVENTS.x.fm.evt.in-b.*"} {
			agent.Request(subj, nil, 500*time.Millisecond)
			expectViolation(t, errs, subj)
		}
		if _, err := agent.SubscribeSync("_INBOX.in-b.>"); err != nil {
			t.Fatal(err)
		}
		agent.Flush()
		expectViolation(t, errs, "another instance's inbox")
	})
}

func TestRevokedAgentIsDisconnectedAndStaysOut(t *testing.T) {
	r := start(t)
	creds, pub, err := r.auth.Creds("in-r", natsauth.AgentPermissions("in-r"), time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	closed := make(chan struct{})
	var once sync.Once
	nc, err := r.connectCreds(creds, protocol.InboxPrefix("in-r"), nil)
	if err != nil {
		t.Fatal(err)
	}
	nc.SetDisconnectErrHandler(func(*nats.Conn, error) { once.Do(func() { close(closed) }) })
	sysCreds, _, err := r.auth.SystemCreds()
	if err != nil {
		t.Fatal(err)
	}
	sys, err := r.connectCreds(sysCreds, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.auth.Push(ctx, sys, map[string]int64{pub: time.Now().Unix()}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("the revoked agent stays connected")
	}
	if _, err := r.connectCreds(creds, "", nil); err == nil || !strings.Contains(strings.ToLower(err.Error()), "authorization") {
		t.Fatalf("a revoked agent connected again: %v", err)
	}
	// The revocation outlives a restart of the server.
	r.emb.Shutdown()
	r.startServer()
	if _, err := r.connectCreds(creds, "", nil); err == nil {
		t.Fatal("a revoked agent connected after a restart")
	}
	// Other users are unaffected.
	if _, err := r.connectCreds(mustCreds(t, r, "in-other"), "", nil); err != nil {
		t.Fatalf("another user: %v", err)
	}
}

func TestReadOnlyOperator(t *testing.T) {
	r := start(t)
	errs := make(chan error, 10)
	ro := r.connect("operator-ro", natsauth.ReadOnlyPermissions(), "", errs)
	js, _ := jetstream.New(ro)
	ctx := context.Background()
	if _, err := js.Stream(ctx, protocol.StreamEvents); err != nil {
		t.Fatalf("stream info: %v", err)
	}
	kv, err := js.KeyValue(ctx, protocol.BucketNetworks)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "vn-x", []byte("nope")); err == nil {
		t.Fatal("a read-only operator wrote a key")
	}
	expectViolation(t, errs, "kv put")
	if err := js.DeleteStream(ctx, protocol.StreamEvents); err == nil {
		t.Fatal("a read-only operator deleted a stream")
	}
	expectViolation(t, errs, "stream delete")
	if err := ro.Publish(protocol.ProvisionSubject("in-a", protocol.ProvisionDelete), []byte("x")); err == nil {
		ro.Flush()
	}
	expectViolation(t, errs, "publish a provision request")
	if errors.Is(err, nats.ErrConnectionClosed) {
		t.Fatal("connection closed")
	}
}

func mustCreds(t *testing.T, r *rig, name string) []byte {
	creds, _, err := r.auth.Creds(name, jwt.Permissions{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	return creds
}

func TestAuthorityIsKept(t *testing.T) {
	dir := t.TempDir()
	a1, err := natsauth.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	a2, err := natsauth.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if a1.AccountPub() != a2.AccountPub() {
		t.Fatal("the account changed on reopen")
	}
	cfg, err := a1.ServerConfig()
	if err != nil || !strings.Contains(cfg, "operator: ") || !strings.Contains(cfg, a1.AccountPub()) {
		t.Fatalf("server config: %v\n%s", err, cfg)
	}
}

// TestAnAgentSendsNothingLargerThanItsLimit: an agent's user may publish
// what its largest message needs, and nothing larger (the bus itself takes
// up to 8 MiB from FM's own roles).
func TestAnAgentSendsNothingLargerThanItsLimit(t *testing.T) {
	r := start(t)
	kp, _ := nkeys.CreateUser()
	pub, _ := kp.PublicKey()
	seed, _ := kp.Seed()
	tok, err := r.auth.AgentJWT("in-l", pub, time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	creds, _ := jwt.FormatUserConfig(tok, seed)
	errs := make(chan error, 10)
	nc, err := r.connectCreds(creds, protocol.InboxPrefix("in-l"), errs)
	if err != nil {
		t.Fatal(err)
	}
	js, _ := jetstream.New(nc)
	ctx := context.Background()
	if _, err := js.Publish(ctx, protocol.EventSubject("in-l", protocol.EventStep), bytes.Repeat([]byte("x"), 512<<10)); err != nil {
		t.Fatalf("a 512 KiB event: %v", err)
	}
	// The server tells the connection the user's limit (and enforces it:
	// a client that ignores it is cut off with a payload violation).
	if got := nc.MaxPayload(); got != 1<<20 {
		t.Fatalf("an agent's connection may send %d bytes, want 1 MiB", got)
	}
	if err := nc.Publish(protocol.EventSubject("in-l", protocol.EventStep), bytes.Repeat([]byte("x"), 2<<20)); !errors.Is(err, nats.ErrMaxPayload) {
		t.Fatalf("a 2 MiB message from an agent: %v", err)
	}
}
