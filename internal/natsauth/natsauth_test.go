package natsauth_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/bus/embedded"
	"github.com/fleetmanager/fm/internal/natsauth"
	"github.com/fleetmanager/fm/internal/objects"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"
)

// outside is the JetStream API prefix of agents and read-only operators.
const outside = protocol.OutsideJSAPIPrefix + "."

type rig struct {
	t    *testing.T
	auth *natsauth.Authority
	emb  *embedded.Server
	dir  string
	// admit is the relay's admission (nil: everything).
	admit func(ctx context.Context, subject string, size int) bool
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
	r.relay()
	return r
}

// relay runs the relay of what agents store, as FM's server does, on a
// connection of the FM account.
func (r *rig) relay() {
	r.t.Helper()
	relay, err := natsauth.StartRelay(r.connect("fm-server-relay", jwt.Permissions{}, "", nil), r.admit)
	if err != nil {
		r.t.Fatal(err)
	}
	r.t.Cleanup(relay.Stop)
}

func (r *rig) startServer() {
	r.t.Helper()
	emb, err := embedded.Start(embedded.Config{
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

// agentCreds mints credentials of instance's agent, as a join does: a key
// of the machine's, a JWT of the agents' account.
func (r *rig) agentCreds(instance string) ([]byte, string) {
	r.t.Helper()
	kp, _ := nkeys.CreateUser()
	pub, _ := kp.PublicKey()
	seed, _ := kp.Seed()
	tok, err := r.auth.AgentJWT(instance, pub, time.Now().Add(time.Hour))
	if err != nil {
		r.t.Fatal(err)
	}
	creds, err := jwt.FormatUserConfig(tok, seed)
	if err != nil {
		r.t.Fatal(err)
	}
	return creds, pub
}

// system connects as the system account's user, which pushes accounts.
func (r *rig) system() *nats.Conn {
	r.t.Helper()
	creds, _, err := r.auth.SystemCreds()
	if err != nil {
		r.t.Fatal(err)
	}
	nc, err := r.connectCreds(creds, "", nil)
	if err != nil {
		r.t.Fatal(err)
	}
	return nc
}

func (r *rig) connectAgent(instance string, errs chan error) *nats.Conn {
	r.t.Helper()
	creds, _ := r.agentCreds(instance)
	nc, err := r.connectCreds(creds, protocol.InboxPrefix(instance), errs)
	if err != nil {
		r.t.Fatal(err)
	}
	return nc
}

// unchanged fails t if key of bucket does not keep revision rev (and its
// value) for a while: what a misdirected answer would change, it changes
// within milliseconds.
func unchanged(t *testing.T, kv jetstream.KeyValue, key string, want []byte) {
	t.Helper()
	for range 10 {
		e, err := kv.Get(context.Background(), key)
		if err != nil || !bytes.Equal(e.Value(), want) {
			t.Fatalf("%s of %s changed: %v %q", key, kv.Bucket(), err, e.Value())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestAgentCredentialsAllowItsOwnAndNothingElse(t *testing.T) {
	r := start(t)
	admin := r.connect("fm-server", jwt.Permissions{}, "", nil)
	ajs, _ := jetstream.New(admin)
	ctx := context.Background()
	kvDesired, _ := ajs.KeyValue(ctx, protocol.BucketDesired)
	kvDesired.Put(ctx, "in-a", []byte(`{"v":1,"mine":true}`))
	otherDesired := []byte(`{"v":1,"secret":"other"}`)
	kvDesired.Put(ctx, "in-b", otherDesired)
	ajs.Publish(ctx, protocol.CommandSubject("in-a", "c1"), []byte(`{"for":"a"}`))
	ajs.Publish(ctx, protocol.CommandSubject("in-b", "c2"), []byte(`{"for":"b"}`))
	commands, err := ajs.Stream(ctx, protocol.StreamCommands)
	if err != nil {
		t.Fatal(err)
	}
	kits, _ := ajs.ObjectStore(ctx, protocol.ObjectStoreKits)
	kit := bytes.Repeat([]byte("KIT-"), 4<<20)
	if _, err := kits.PutBytes(ctx, "kit.tar.gz", kit); err != nil {
		t.Fatal(err)
	}
	// FM's server, as far as this test needs it: it answers the agent's
	// catch-ups, and takes heartbeats.
	heartbeats, _ := admin.SubscribeSync(protocol.SubjectAllHeartbeat)
	admin.Subscribe(protocol.SubjectAllCmdAfter, func(m *nats.Msg) {
		resp, err := bus.NewCommandReader(commands).After(ctx, protocol.InstanceFromSubject(m.Subject), 0)
		if err != nil {
			t.Error(err)
		}
		data, _ := protocol.Encode(&resp)
		m.Respond(data)
	})
	admin.Flush()

	errs := make(chan error, 10)
	agent := r.connectAgent("in-a", errs)
	js, _ := jetstream.New(agent)

	t.Run("its own", func(t *testing.T) {
		for _, prefix := range []string{"$JS.API.", outside} {
			msg, err := agent.Request(prefix+"DIRECT.GET.KV_fm_desired.$KV.fm_desired.in-a", nil, 5*time.Second)
			if err != nil || !strings.Contains(string(msg.Data), "mine") {
				t.Fatalf("direct get of its desired state under %s: %v", prefix, err)
			}
		}
		changes, err := agent.SubscribeSync(protocol.DesiredSubject("in-a"))
		if err != nil {
			t.Fatal(err)
		}
		agent.Flush()
		kvDesired.Put(ctx, "in-a", []byte(`{"v":1,"mine":"again"}`))
		if m, err := changes.NextMsg(5 * time.Second); err != nil || !strings.Contains(string(m.Data), "again") {
			t.Fatalf("its desired state's change: %v", err)
		}
		for _, subj := range []string{protocol.EventSubject("in-a", protocol.EventStep), protocol.LogSubject("in-a", protocol.LogSourceDSS),
			protocol.LogSubject("in-a", protocol.LogSourceAgent), protocol.DiagSubject("in-a", "c1-r1")} {
			if _, err := js.Publish(ctx, subj, []byte("e")); err != nil {
				t.Fatalf("publish on %s: %v", subj, err)
			}
		}
		if _, err := js.Publish(ctx, protocol.KVSubject(protocol.BucketAgents, "in-a"), []byte("status")); err != nil {
			t.Fatalf("put its status: %v", err)
		}
		req, _ := protocol.Encode(&protocol.CommandsAfterRequest{})
		m, err := agent.Request(protocol.CommandsAfterSubject("in-a"), req, 5*time.Second)
		var resp protocol.CommandsAfterResponse
		if err != nil || protocol.Decode(m.Data, &resp) != nil || len(resp.Commands) != 1 || string(resp.Commands[0].Command) != `{"for":"a"}` {
			t.Fatalf("catch up with its commands: %v %+v", err, resp)
		}
		live, err := agent.SubscribeSync(protocol.CommandLiveSubject("in-a"))
		if err != nil {
			t.Fatal(err)
		}
		agent.Flush()
		ajs.Publish(ctx, protocol.CommandSubject("in-a", "c3"), []byte(`{"for":"a, live"}`))
		if cm, err := live.NextMsg(5 * time.Second); err != nil || string(cm.Data) != `{"for":"a, live"}` {
			t.Fatalf("its command as it is stored: %v", err)
		}
		readCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		kr, err := objects.Open(readCtx, js, protocol.ObjectStoreKits, "kit.tar.gz", 10*time.Second)
		if err != nil {
			t.Fatalf("open a kit: %v", err)
		}
		if b, err := io.ReadAll(kr); err != nil || !bytes.Equal(b, kit) {
			t.Fatalf("read a kit: %v", err)
		}
		if err := agent.Publish(protocol.HeartbeatSubject("in-a"), []byte("hb")); err != nil {
			t.Fatal(err)
		}
		if m, err := heartbeats.NextMsg(5 * time.Second); err != nil || m.Subject != protocol.HeartbeatSubject("in-a") {
			t.Fatalf("its heartbeat did not reach FM: %v", err)
		}
		agent.Flush()
		select {
		case err := <-errs:
			t.Fatalf("its own use raised %v", err)
		default:
		}
	})

	t.Run("answers sent into FM's keys", func(t *testing.T) {
		// NATS does not check a reply subject: JetStream's answers to
		// these go to the agents' account, where nothing stores them.
		for _, m := range []*nats.Msg{
			{Subject: protocol.EventSubject("in-a", protocol.EventStep), Data: []byte("e")},
			{Subject: protocol.KVSubject(protocol.BucketAgents, "in-a"), Data: []byte("status")},
			{Subject: "$JS.API.DIRECT.GET.KV_fm_desired.$KV.fm_desired.in-a"},
			{Subject: protocol.CommandsAfterSubject("in-a"), Data: []byte(`{"v":1}`)},
			{Subject: "$JS.API.STREAM.INFO.OBJ_fm_kits"},
		} {
			m.Reply = protocol.KVSubject(protocol.BucketDesired, "in-b")
			if err := agent.PublishMsg(m); err != nil {
				t.Fatal(err)
			}
		}
		agent.Flush()
		unchanged(t, kvDesired, "in-b", otherDesired)
	})

	t.Run("another instance's commands", func(t *testing.T) {
		for _, subj := range []string{protocol.CommandFilter("in-b"), protocol.CommandLiveSubject("in-b")} {
			if _, err := agent.SubscribeSync(subj); err != nil {
				t.Fatal(err)
			}
			agent.Flush()
			expectViolation(t, errs, "subscribe to "+subj)
		}
		agent.Request("$JS.API.CONSUMER.MSG.NEXT.FM_COMMANDS.cmd_in-b", []byte(`{"batch":1}`), 500*time.Millisecond)
		expectViolation(t, errs, "pull from a consumer of FM_COMMANDS")
		// A read by subject names the subject in its body, which no
		// permission narrows: agents read none of FM_COMMANDS.
		agent.Request("$JS.API.STREAM.MSG.GET.FM_COMMANDS", []byte(`{"seq":1,"next_by_subj":"fm.cmd.in-b.*"}`), 500*time.Millisecond)
		expectViolation(t, errs, "a read of FM_COMMANDS by subject")
		agent.Request("$JS.API.DIRECT.GET.FM_COMMANDS", []byte(`{"seq":1,"next_by_subj":"fm.cmd.in-b.*"}`), 500*time.Millisecond)
		expectViolation(t, errs, "a direct get of FM_COMMANDS")
		agent.Request(protocol.CommandsAfterSubject("in-b"), nil, 500*time.Millisecond)
		expectViolation(t, errs, "catch up with in-b's commands")
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

	t.Run("a consumer of its own making", func(t *testing.T) {
		// Its delivery subject would be the FM account's: an agent makes
		// none, not even on its own commands.
		_, err := js.CreateConsumer(ctx, protocol.StreamCommands, jetstream.ConsumerConfig{Name: "cmd_in-a",
			FilterSubject: protocol.CommandFilter("in-a"), AckPolicy: jetstream.AckNonePolicy, DeliverSubject: "$KV.fm_desired.in-b"})
		if err == nil {
			t.Fatal("made a consumer")
		}
		expectViolation(t, errs, "a consumer on its commands")
		unchanged(t, kvDesired, "in-b", otherDesired)
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
		// The relay drops the header: what is stored is a plain status.
		if _, err := js.PublishMsg(ctx, rollup); err != nil {
			t.Fatalf("its own status, with a roll-up header: %v", err)
		}
		kv, _ := ajs.KeyValue(ctx, protocol.BucketAgents)
		if e, err := kv.Get(ctx, "in-b"); err != nil || string(e.Value()) != "b's status" {
			t.Fatalf("another instance's status after the roll-up: %v", err)
		}
		if e, err := kv.Get(ctx, "in-a"); err != nil || string(e.Value()) != "wipe" || e.Operation() != jetstream.KeyValuePut {
			t.Fatalf("its own status after the roll-up: %v", err)
		}
	})

	t.Run("another instance's events and heartbeats", func(t *testing.T) {
		for _, subj := range []string{protocol.EventSubject("in-b", protocol.EventStep), protocol.HeartbeatSubject("in-b"),
			protocol.EventSubject("in-a", protocol.EventMachine), protocol.EventSubject("in-a", protocol.EventSnapshot),
			protocol.LogSubject("in-b", "dss"), protocol.LogSubject("in-a", "other"), protocol.DiagSubject("in-b", "c-r"), "$KV.fm_agents.in-b", "$KV.fm_desired.in-a", protocol.ProvisionSubject("in-a", protocol.ProvisionDelete)} {
			agent.Publish(subj, []byte("forged"))
			agent.Flush()
			expectViolation(t, errs, "publish on "+subj)
		}
	})

	t.Run("administration", func(t *testing.T) {
		for _, subj := range []string{"$JS.API.STREAM.DELETE.FM_EVENTS", outside + "STREAM.DELETE.FM_EVENTS", "$JS.API.STREAM.PURGE.FM_COMMANDS", "$JS.API.STREAM.NAMES",
			"$JS.API.STREAM.INFO.FM_COMMANDS", "$JS.API.CONSUMER.CREATE.FM_EVENTS.x.fm.evt.in-b.*",
			"$JS.API.CONSUMER.DELETE.FM_COMMANDS.cmd_in-a"} {
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
	creds, pub := r.agentCreds("in-r")
	closed := make(chan struct{})
	var once sync.Once
	nc, err := r.connectCreds(creds, protocol.InboxPrefix("in-r"), nil)
	if err != nil {
		t.Fatal(err)
	}
	nc.SetDisconnectErrHandler(func(*nats.Conn, error) { once.Do(func() { close(closed) }) })
	sys := r.system()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.auth.PushRevocations(ctx, sys, map[string]int64{pub: time.Now().Unix()}); err != nil {
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

// TestRevokingEveryAgentIssuedBefore: one revocation of AllUsers refuses
// every agent user issued until its time, and none issued after (what FM
// folds a long revocation list into).
func TestRevokingEveryAgentIssuedBefore(t *testing.T) {
	r := start(t)
	kp, _ := nkeys.CreateUser()
	pub, _ := kp.PublicKey()
	seed, _ := kp.Seed()
	credsAt := func() []byte {
		tok, err := r.auth.AgentJWT("in-all", pub, time.Now().Add(time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		creds, _ := jwt.FormatUserConfig(tok, seed)
		return creds
	}
	before := credsAt()
	other, _ := r.agentCreds("in-other")
	sys := r.system()
	cutoff := time.Now().Unix()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.auth.PushRevocations(ctx, sys, map[string]int64{natsauth.AllUsers: cutoff}); err != nil {
		t.Fatal(err)
	}
	for name, creds := range map[string][]byte{"this user": before, "another user": other} {
		if _, err := r.connectCreds(creds, "", nil); err == nil || !strings.Contains(strings.ToLower(err.Error()), "authorization") {
			t.Fatalf("%s, issued before the cutoff, connected: %v", name, err)
		}
	}
	// The agent's connection, started with the revoked credentials: the
	// first connect's refusal is told (nats.go tells the retries' to no
	// callback), and it keeps trying until the renewed ones connect.
	var mu sync.Mutex
	current, refusals := before, 0
	nc, err := bus.Connect(bus.ConnectConfig{URL: r.emb.ClientURL(), RetryOnFailedConnect: true,
		CurrentCreds:   func() []byte { mu.Lock(); defer mu.Unlock(); return current },
		OnRefused:      func(error) { mu.Lock(); defer mu.Unlock(); refusals++ },
		ReconnectDelay: func(int) time.Duration { return 50 * time.Millisecond }, Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		mu.Lock()
		told := refusals
		mu.Unlock()
		if told > 0 && bus.CredentialsRefused(nc.LastError()) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a refused first connect: told %d times, last error %v", told, nc.LastError())
		}
	}
	// JWTs are issued in whole seconds: one issued after the cutoff.
	for time.Now().Unix() <= cutoff {
		time.Sleep(50 * time.Millisecond)
	}
	renewed := credsAt()
	if _, err := r.connectCreds(renewed, "", nil); err != nil {
		t.Fatalf("the same user issued after the cutoff: %v", err)
	}
	mu.Lock()
	current = renewed
	mu.Unlock()
	for deadline := time.Now().Add(10 * time.Second); !nc.IsConnected(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) || nc.IsClosed() {
			t.Fatalf("the connection never came back with the renewed credentials (closed: %v): %v", nc.IsClosed(), nc.LastError())
		}
	}
}

func TestReadOnlyOperator(t *testing.T) {
	r := start(t)
	admin := r.connect("fm-server", jwt.Permissions{}, "", nil)
	ajs, _ := jetstream.New(admin)
	ctx := context.Background()
	kvDesired, _ := ajs.KeyValue(ctx, protocol.BucketDesired)
	desired := []byte(`{"v":1}`)
	kvDesired.Put(ctx, "in-b", desired)
	ajs.Publish(ctx, protocol.EventSubject("in-a", protocol.EventStep), []byte(`{"v":1,"crafted":"by an agent"}`))

	errs := make(chan error, 10)
	creds, _, err := r.auth.ReaderCreds("operator-ro", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	agentCreds, _ := r.agentCreds("in-a")
	if r.auth.CredsAccount(creds) != natsauth.AccountReaders || r.auth.CredsAccount(mustCreds(t, r, "admin")) != natsauth.AccountFM ||
		r.auth.CredsAccount(agentCreds) != natsauth.AccountAgents {
		t.Fatal("CredsAccount does not tell a reader from an admin")
	}
	ro, err := r.connectCreds(creds, "", errs)
	if err != nil {
		t.Fatal(err)
	}
	js, _ := jetstream.New(ro)
	t.Run("looks", func(t *testing.T) {
		if _, err := js.Stream(ctx, protocol.StreamEvents); err != nil {
			t.Fatalf("stream info: %v", err)
		}
		kv, err := js.KeyValue(ctx, protocol.BucketDesired)
		if err != nil {
			t.Fatal(err)
		}
		if e, err := kv.Get(ctx, "in-b"); err != nil || !bytes.Equal(e.Value(), desired) {
			t.Fatalf("kv get: %v", err)
		}
		names := js.StreamNames(ctx)
		n := 0
		for range names.Name() {
			n++
		}
		if names.Err() != nil || n == 0 {
			t.Fatalf("stream names: %d %v", n, names.Err())
		}
		sub, err := ro.SubscribeSync("fm.>")
		if err != nil {
			t.Fatal(err)
		}
		ro.Flush()
		admin.Publish(protocol.HeartbeatSubject("in-a"), []byte("hb"))
		if m, err := sub.NextMsg(5 * time.Second); err != nil || m.Subject != protocol.HeartbeatSubject("in-a") {
			t.Fatalf("subscribe to FM's subjects: %v", err)
		}
	})
	t.Run("changes nothing", func(t *testing.T) {
		kv, _ := js.KeyValue(ctx, protocol.BucketNetworks)
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
	})
	t.Run("reads no diagnosis bundle", func(t *testing.T) {
		all, err := ro.SubscribeSync("fm.>")
		if err != nil {
			t.Fatal(err)
		}
		ro.Flush()
		ajs.Publish(ctx, protocol.DiagSubject("in-a", "c-r"), []byte("env-site.sh with a proxy password"))
		admin.Publish(protocol.HeartbeatSubject("in-a"), []byte("after the chunk"))
		if m, err := all.NextMsg(5 * time.Second); err != nil || m.Subject != protocol.HeartbeatSubject("in-a") {
			t.Fatalf("a subscription to fm.> got %v (%v), want the heartbeat after the chunk", m, err)
		}
		for _, subj := range []string{"$JS.API.DIRECT.GET." + protocol.StreamDiagnosis, "$JS.API.STREAM.MSG.GET." + protocol.StreamDiagnosis,
			"$JS.API.DIRECT.GET.OBJ_" + protocol.ObjectStoreDiagnosis, "$JS.API.STREAM.MSG.GET.OBJ_" + protocol.ObjectStoreDiagnosis} {
			if m, err := ro.Request(subj, []byte(`{"seq":1}`), time.Second); err == nil && strings.Contains(string(m.Data), "password") {
				t.Fatalf("%s gave a bundle's chunk", subj)
			}
			expectViolation(t, errs, subj)
		}
		if _, err := ro.SubscribeSync(protocol.DiagSubject("in-a", "*")); err != nil {
			t.Fatal(err)
		}
		ro.Flush()
		expectViolation(t, errs, "subscribe to diagnosis chunks")
	})
	t.Run("reads no console session", func(t *testing.T) {
		sessions, err := ajs.KeyValue(ctx, protocol.BucketSessions)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := sessions.Put(ctx, "0a1b", []byte(`{"keyId":"k","csrf":"the-token"}`)); err != nil {
			t.Fatal(err)
		}
		for _, req := range []struct{ subj, body string }{
			{"$JS.API.DIRECT.GET.KV_" + protocol.BucketSessions, `{"seq":1}`},
			{"$JS.API.DIRECT.GET.KV_" + protocol.BucketSessions + ".$KV." + protocol.BucketSessions + ".0a1b", ``},
			{"$JS.API.STREAM.MSG.GET.KV_" + protocol.BucketSessions, `{"seq":1}`},
		} {
			if m, err := ro.Request(req.subj, []byte(req.body), time.Second); err == nil && strings.Contains(string(m.Data), "the-token") {
				t.Fatalf("%s gave a session", req.subj)
			}
			expectViolation(t, errs, req.subj)
		}
	})
	t.Run("sends nothing into FM's keys", func(t *testing.T) {
		// An answer of its own choosing (the event an agent crafted),
		// addressed to a key: it lands in the readers' account.
		for _, m := range []*nats.Msg{
			{Subject: "$JS.API.STREAM.MSG.GET." + protocol.StreamEvents, Data: []byte(`{"seq":1}`)},
			{Subject: "$JS.API.DIRECT.GET." + protocol.StreamEvents, Data: []byte(`{"seq":1}`)},
			{Subject: "$JS.API.STREAM.INFO." + protocol.StreamEvents},
		} {
			m.Reply = protocol.KVSubject(protocol.BucketDesired, "in-b")
			if err := ro.PublishMsg(m); err != nil {
				t.Fatal(err)
			}
		}
		ro.Flush()
		unchanged(t, kvDesired, "in-b", desired)
		// A push consumer could deliver anywhere in FM's account: none.
		_, err := js.CreateConsumer(ctx, protocol.StreamEvents, jetstream.ConsumerConfig{DeliverSubject: "$KV.fm_desired.in-b", AckPolicy: jetstream.AckNonePolicy})
		if err == nil {
			t.Fatal("a read-only operator made a consumer")
		}
		expectViolation(t, errs, "a consumer")
		unchanged(t, kvDesired, "in-b", desired)
	})
}

// TestAnAuthorityFromBeforeTheAgentsAccount: a keys file without the
// agents' and readers' accounts gets them, keeping its accounts, and the FM
// account gets a new signing key: every user of it minted before (an
// agent's, a read-only operator's, whose credentials reach JetStream's
// answers inside it) is refused. An embedded server's resolver takes the
// FM account's exports and its new signing key.
func TestAnAuthorityFromBeforeTheAgentsAccount(t *testing.T) {
	dir := t.TempDir()
	a, err := natsauth.Open(filepath.Join(dir, "auth"))
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "auth", "keys.json")
	var keys map[string]string
	b, _ := os.ReadFile(path)
	json.Unmarshal(b, &keys)
	delete(keys, "agents")
	delete(keys, "readers")
	b, _ = json.Marshal(keys)
	os.WriteFile(path, b, 0o600)
	legacy, _, err := a.Creds("in-legacy", jwt.Permissions{Pub: jwt.Permission{Allow: []string{"fm.evt.in-legacy.step"}}}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	// What the resolver of such a data folder holds: the FM account alone,
	// with its signing key of then and no exports.
	res, err := server.NewDirAccResolver(filepath.Join(dir, "resolver"), 0, time.Minute, server.NoDelete)
	if err != nil {
		t.Fatal(err)
	}
	old := jwt.NewAccountClaims(a.AccountPub())
	signing, _ := nkeys.FromSeed([]byte(keys["signing"]))
	oldSigning, _ := signing.PublicKey()
	old.SigningKeys.Add(oldSigning)
	op, _ := nkeys.FromSeed([]byte(keys["operator"]))
	oldJWT, err := old.Encode(op)
	if err != nil {
		t.Fatal(err)
	}
	res.Store(a.AccountPub(), oldJWT)
	res.Close()

	again, err := natsauth.Open(filepath.Join(dir, "auth"))
	if err != nil {
		t.Fatal(err)
	}
	if again.AccountPub() != a.AccountPub() {
		t.Fatal("the FM account changed")
	}
	r := &rig{t: t, auth: again, dir: dir}
	r.startServer()
	stored, err := r.emb.NATS().AccountResolver().Fetch(a.AccountPub())
	if err != nil {
		t.Fatal(err)
	}
	ac, err := jwt.DecodeAccountClaims(stored)
	if err != nil {
		t.Fatal(err)
	}
	if len(ac.Exports) == 0 || ac.SigningKeys.Contains(oldSigning) || len(ac.SigningKeys) != 1 {
		t.Fatalf("the FM account after the upgrade: %d exports, signing keys %v (old %s)", len(ac.Exports), ac.SigningKeys.Keys(), oldSigning)
	}
	// Agents of the new account reach the FM account.
	admin := r.connect("admin", jwt.Permissions{}, "", nil)
	ajs, _ := jetstream.New(admin)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := bus.DefaultTopology().Declare(ctx, ajs); err != nil {
		t.Fatal(err)
	}
	r.relay()
	js, _ := jetstream.New(r.connectAgent("in-u", nil))
	if _, err := js.Publish(ctx, protocol.EventSubject("in-u", protocol.EventStep), []byte("e")); err != nil {
		t.Fatalf("an agent after the upgrade: %v", err)
	}
	if again.CredsAccount(legacy) != "" || again.CredsAccount(mustCreds(t, r, "new-admin")) != natsauth.AccountFM {
		t.Fatal("CredsAccount does not tell credentials of the old signing key from current ones")
	}
	if _, err := r.connectCreds(legacy, "", nil); err == nil {
		t.Fatal("credentials of the FM account minted before the upgrade connected")
	}
	// Opened again, nothing changes: the signing key is new once.
	third, err := natsauth.Open(filepath.Join(dir, "auth"))
	if err != nil || third.CredsAccount(mustCreds(t, r, "admin-2")) != natsauth.AccountFM {
		t.Fatalf("reopened: %v", err)
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
	// A diagnosis chunk, the largest message an agent stores.
	js, _ := jetstream.New(nc)
	ctx := context.Background()
	if _, err := js.Publish(ctx, protocol.DiagSubject("in-l", "c-r"), bytes.Repeat([]byte("x"), 256<<10)); err != nil {
		t.Fatalf("a 256 KiB diagnosis chunk: %v", err)
	}
	if err := nc.Publish(protocol.HeartbeatSubject("in-l"), bytes.Repeat([]byte("x"), 900<<10)); err != nil {
		t.Fatalf("a 900 KiB message: %v", err)
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

// TestTheRelayStoresAnAgentsMessagesWithItsOwnIDOnly: what an agent stores
// crosses into FM's account through the relay, which keeps no header but
// the message id, made the agent's own. A Nats-Expected-Last-Msg-Id that
// does not match, which stalls a stream of three replicas for good (and is
// refused on a single node), is dropped: the event is stored.
func TestTheRelayStoresAnAgentsMessagesWithItsOwnIDOnly(t *testing.T) {
	r := start(t)
	admin := r.connect("fm-server", jwt.Permissions{}, "", nil)
	ajs, _ := jetstream.New(admin)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	events, err := ajs.Stream(ctx, protocol.StreamEvents)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := jetstream.New(r.connectAgent("in-a", nil))
	b, _ := jetstream.New(r.connectAgent("in-b", nil))
	event := func(instance, id string) *nats.Msg {
		m := nats.NewMsg(protocol.EventSubject(instance, protocol.EventStep))
		m.Data = []byte(`{"v":1}`)
		m.Header.Set(jetstream.MsgIDHeader, id)
		m.Header.Set("Nats-Expected-Last-Msg-Id", "not-the-last")
		m.Header.Set("Nats-Expected-Stream", protocol.StreamEvents)
		m.Header.Set("X-Anything", "else")
		return m
	}
	ack, err := a.PublishMsg(ctx, event("in-a", "e-1"))
	if err != nil {
		t.Fatalf("an event with headers FM does not use: %v", err)
	}
	stored, err := events.GetMsg(ctx, ack.Sequence)
	if err != nil {
		t.Fatal(err)
	}
	if len(stored.Header) != 1 || stored.Header.Get(jetstream.MsgIDHeader) != "agent.in-a.e-1" {
		t.Fatalf("stored with the headers %v, want only Nats-Msg-Id agent.in-a.e-1", stored.Header)
	}
	if again, err := a.PublishMsg(ctx, event("in-a", "e-1")); err != nil || !again.Duplicate || again.Sequence != ack.Sequence {
		t.Fatalf("the same event again: %+v, %v; want the first's duplicate", again, err)
	}
	// Another agent's id, or FM's, is not the same id.
	if other, err := b.PublishMsg(ctx, event("in-b", "e-1")); err != nil || other.Duplicate {
		t.Fatalf("another agent's event with the same id: %+v, %v", other, err)
	}
	if _, err := ajs.Publish(ctx, protocol.EventSubject("in-a", protocol.EventMachine), []byte(`{"v":1}`), jetstream.WithMsgID("p-1")); err != nil {
		t.Fatal(err)
	}
	if own, err := a.PublishMsg(ctx, event("in-a", "p-1")); err != nil || own.Duplicate {
		t.Fatalf("an agent's event with the id of one of FM's: %+v, %v", own, err)
	}
	// An id longer than any agent's is not stored.
	before, _ := events.Info(ctx)
	short, cancelShort := context.WithTimeout(ctx, 2*time.Second)
	defer cancelShort()
	if _, err := a.PublishMsg(short, event("in-a", strings.Repeat("x", 201))); err == nil {
		t.Fatal("an event with a 201-character id was stored")
	}
	if after, _ := events.Info(ctx); after.State.LastSeq != before.State.LastSeq {
		t.Fatalf("the stream went from %d to %d", before.State.LastSeq, after.State.LastSeq)
	}
}
