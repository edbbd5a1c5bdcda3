package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/protocol"
	natsjwt "github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
)

// The threat model's tests from inside the fleet (docs/security.md): a
// machine's agent turned hostile, with its real credentials, and an
// operator with read-only NATS credentials and the nats CLI. Every attempt
// is refused by NATS or ignored by the server, and the other instance's
// records are as they were.

// hostileAgent connects to fm dev's bus as instance id's agent, with the
// credentials its machine holds; violations receives the permission errors
// NATS sends it.
func hostileAgent(t *testing.T, d *devEnv, id string) (*nats.Conn, jetstream.JetStream, chan error) {
	t.Helper()
	creds := filepath.Join(t.TempDir(), "stolen.creds")
	if err := os.WriteFile(creds, machineCreds(t, filepath.Join(d.data, "local", "machines"), id), 0o600); err != nil {
		t.Fatal(err)
	}
	violations := make(chan error, 16)
	nc, js := d.connect(t, creds, nats.CustomInboxPrefix(protocol.InboxPrefix(id)),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			select {
			case violations <- err:
			default:
			}
		}))
	return nc, js, violations
}

// machineCreds is the NATS credentials the instance's machine (of the local
// backend's folder machines) holds: its join's answer (renewed since), kept
// in one file with the instance key.
func machineCreds(t *testing.T, machines, id string) []byte {
	t.Helper()
	var ident struct {
		Credentials string `json:"credentials"`
	}
	if err := json.Unmarshal([]byte(readFile(t, filepath.Join(machines, id, "root", "var", "lib", "fm-agent", "identity.json"))), &ident); err != nil || ident.Credentials == "" {
		t.Fatalf("the machine's identity: %v", err)
	}
	return []byte(ident.Credentials)
}

// refusedByNATS waits for NATS's permission error.
func refusedByNATS(t *testing.T, violations chan error) {
	t.Helper()
	select {
	case err := <-violations:
		if !strings.Contains(strings.ToLower(err.Error()), "permissions violation") {
			t.Fatalf("%v, want a permissions violation", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("NATS did not refuse it")
	}
}

// records is what FM holds about an instance that a hostile agent must
// not change.
func records(t *testing.T, d *devEnv, py *Python, js jetstream.JetStream, id string) map[string]any {
	t.Helper()
	var in map[string]any
	if code := py.Do(t, "GET", "/instances/"+id, "", &in); code != 200 {
		t.Fatalf("instance %s: %d", id, code)
	}
	st := d.status(t, py, id)
	ag, err := kvEntry(js, protocol.BucketAgents, id)
	if err != nil {
		t.Fatalf("the status of %s's agent: %v", id, err)
	}
	ds, err := kvEntry(js, protocol.BucketDesired, id)
	if err != nil {
		t.Fatalf("the desired state of %s: %v", id, err)
	}
	var key map[string]any
	py.Do(t, "GET", "/instances/"+id+"/admin-api-key", "", &key)
	var futures []map[string]any
	py.Do(t, "GET", "/futures", "", &futures)
	var mine []any
	for _, f := range futures {
		if strings.Contains(mustMarshal(t, f), id) {
			mine = append(mine, map[string]any{"jobId": f["jobId"], "state": f["state"]})
		}
	}
	return map[string]any{"instance": in, "state": st["state"], "dss": st["dss"], "hasAgentStatus": ag != nil,
		"desired": string(ds.Value()), "desiredRevision": ds.Revision(),
		"adminAPIKey": key["adminAPIKey"], "operations": mine}
}

func mustMarshal(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestAHostileAgentTouchesNothingButItself(t *testing.T) {
	data := filepath.Join(t.TempDir(), "fm")
	d := startDevFast(t, data)
	py := NewPython(t, d.url, d.keyFile)
	a := d.newInstance(t, "hostile", "dss-14.0.0-standin")
	b := d.newInstance(t, "target", "dss-14.0.0-standin")
	d.fm(t, "instance", "provision", a, "--wait")
	d.fm(t, "instance", "provision", b, "--wait")
	admin := d.jetStream(t)
	// Both have their credentials in FM before the attempts start.
	for _, id := range []string{a, b} {
		d.waitStatus(t, py, id, "with an admin API key", func(map[string]any) bool {
			var key map[string]any
			return py.Do(t, "GET", "/instances/"+id+"/admin-api-key", "", &key) == 200
		})
	}
	before := records(t, d, py, admin, b)
	ownBefore := records(t, d, py, admin, a)["adminAPIKey"]

	nc, js, violations := hostileAgent(t, d, a)
	ctx := context.Background()
	forged := func(e protocol.Event) []byte {
		t.Helper()
		e.ID, e.Time = protocol.NewID("ev"), time.Now().UTC()
		data, err := protocol.Encode(&e)
		if err != nil {
			t.Fatal(err)
		}
		return data
	}
	refusedPublish := func(subject string) func(t *testing.T) {
		return func(t *testing.T) {
			if err := nc.Publish(subject, []byte("forged")); err != nil {
				t.Fatal(err)
			}
			_ = nc.Flush()
			refusedByNATS(t, violations)
		}
	}
	drain := func() {
		for {
			select {
			case <-violations:
			default:
				return
			}
		}
	}
	for _, row := range []struct {
		name    string
		attempt func(t *testing.T)
	}{
		{"publish B's events", refusedPublish(protocol.EventSubject(b, protocol.EventStep))},
		{"publish B's heartbeat", refusedPublish(protocol.HeartbeatSubject(b))},
		{"publish B's logs", refusedPublish(protocol.LogSubject(b, protocol.LogSourceDSS))},
		{"publish logs of a source of its own making", refusedPublish(protocol.LogSubject(a, "diag-forever"))},
		{"write B's agent status", refusedPublish(protocol.KVSubject(protocol.BucketAgents, b))},
		{"write its own desired state", refusedPublish(protocol.KVSubject(protocol.BucketDesired, a))},
		{"send a provision request", refusedPublish(protocol.ProvisionSubject(b, protocol.ProvisionDelete))},
		{"pass for the provisioner", refusedPublish(protocol.EventSubject(a, protocol.EventMachine))},
		{"report a snapshot", refusedPublish(protocol.EventSubject(a, protocol.EventSnapshot))},
		{"list the fleet", func(t *testing.T) {
			_, _ = nc.Request("$JS.API.STREAM.INFO.KV_"+protocol.BucketAgents, []byte(`{"subjects_filter":">"}`), time.Second)
			refusedByNATS(t, violations)
		}},
		{"read B's desired state", func(t *testing.T) {
			_, _ = nc.Request("$JS.API.DIRECT.GET.KV_"+protocol.BucketDesired+"."+protocol.KVSubject(protocol.BucketDesired, b), nil, time.Second)
			refusedByNATS(t, violations)
		}},
		{"listen to the fleet", func(t *testing.T) {
			if _, err := nc.SubscribeSync("fm.>"); err != nil {
				t.Fatal(err)
			}
			_ = nc.Flush()
			refusedByNATS(t, violations)
		}},
		{"listen to B's inbox", func(t *testing.T) {
			if _, err := nc.SubscribeSync(protocol.InboxPrefix(b) + ".>"); err != nil {
				t.Fatal(err)
			}
			_ = nc.Flush()
			refusedByNATS(t, violations)
		}},
		{"read B's commands", func(t *testing.T) {
			_, err := js.CreateConsumer(ctx, protocol.StreamCommands, jetstream.ConsumerConfig{Name: "cmd_" + b,
				FilterSubject: protocol.CommandFilter(b), AckPolicy: jetstream.AckNonePolicy})
			if err == nil {
				t.Fatal("made a consumer on B's commands")
			}
			refusedByNATS(t, violations)
		}},
		{"receive B's commands as they are stored", func(t *testing.T) {
			if _, err := nc.SubscribeSync(protocol.CommandLiveSubject(b)); err != nil {
				t.Fatal(err)
			}
			_ = nc.Flush()
			refusedByNATS(t, violations)
		}},
		{"catch up with B's commands", func(t *testing.T) {
			req, _ := protocol.Encode(&protocol.CommandsAfterRequest{})
			if _, err := nc.Request(protocol.CommandsAfterSubject(b), req, time.Second); err == nil {
				t.Fatal("FM answered A's catch-up of B's commands")
			}
			refusedByNATS(t, violations)
		}},
		{"make a consumer that delivers into B's records", func(t *testing.T) {
			_, err := js.CreateConsumer(ctx, protocol.StreamCommands, jetstream.ConsumerConfig{Name: "cmd_" + a,
				FilterSubject: protocol.CommandFilter(a), AckPolicy: jetstream.AckNonePolicy, DeliverSubject: protocol.KVSubject(protocol.BucketInstances, b)})
			if err == nil {
				t.Fatal("made a consumer")
			}
			refusedByNATS(t, violations)
		}},
		{"have JetStream answer into B's records", func(t *testing.T) {
			// NATS does not check a reply subject: the answers go to the
			// agents' account, where nothing stores them.
			for _, m := range []*nats.Msg{
				{Subject: protocol.EventSubject(a, protocol.EventStep), Data: []byte("e"), Reply: protocol.KVSubject(protocol.BucketDesired, b)},
				{Subject: protocol.KVSubject(protocol.BucketAgents, a), Data: []byte("{}"), Reply: protocol.KVSubject(protocol.BucketInstances, b)},
				{Subject: "$JS.API.DIRECT.GET.KV_" + protocol.BucketDesired + "." + protocol.KVSubject(protocol.BucketDesired, a), Reply: protocol.KVSubject(protocol.BucketSecrets, b)},
				{Subject: "$JS.API.STREAM.INFO.OBJ_" + protocol.ObjectStoreKits, Reply: protocol.KVSubject(protocol.BucketDesired, b)},
				{Subject: protocol.CommandsAfterSubject(a), Data: []byte(`{"v":1}`), Reply: protocol.KVSubject(protocol.BucketSecrets, b)},
			} {
				if err := nc.PublishMsg(m); err != nil {
					t.Fatal(err)
				}
			}
			_ = nc.Flush()
		}},
		{"pile up durable consumers", func(t *testing.T) {
			_, err := js.CreateConsumer(ctx, protocol.StreamCommands, jetstream.ConsumerConfig{Durable: "forever",
				FilterSubject: protocol.CommandFilter(a), AckPolicy: jetstream.AckNonePolicy})
			if err == nil {
				t.Fatal("made a durable consumer")
			}
			refusedByNATS(t, violations)
		}},
		{"roll up every agent's status", func(t *testing.T) {
			// The relay in fm server drops the header: A's own status is
			// stored as a plain value, B's stays (checked at the end).
			own, err := kvEntry(admin, protocol.BucketAgents, a)
			if err != nil {
				t.Fatal(err)
			}
			m := nats.NewMsg(protocol.KVSubject(protocol.BucketAgents, a))
			m.Header.Set("Nats-Rollup", "all")
			m.Data = own.Value()
			ack, err := js.PublishMsg(ctx, m)
			if err != nil {
				t.Fatalf("A's own status: %v", err)
			}
			if after, err := kvEntry(admin, protocol.BucketAgents, a); err != nil || after.Revision() < ack.Sequence {
				t.Fatalf("A's status after the roll-up: %v", err)
			}
		}},
		// Taken by NATS (the agent's own subjects), ignored by the server.
		{"give B a credential from its own subject", func(t *testing.T) {
			if _, err := js.Publish(ctx, protocol.EventSubject(a, protocol.EventCommand), forged(protocol.Event{Instance: b,
				Kind: protocol.EventCommand, Source: "agent", CommandID: "sec-forged", Step: string(protocol.CommandGetAdminAPIKey),
				Status: protocol.StatusOK, Result: json.RawMessage(`{"adminAPIKey":"forged"}`)})); err != nil {
				t.Fatal(err)
			}
		}},
		{"have FM answer a renewal into B's secrets", func(t *testing.T) {
			m := nats.NewMsg(protocol.RenewSubject(a))
			m.Reply, m.Data = protocol.KVSubject(protocol.BucketSecrets, b), []byte("{}")
			if err := nc.PublishMsg(m); err != nil {
				t.Fatal(err)
			}
		}},
		{"beat for B", func(t *testing.T) {
			hb, _ := protocol.Encode(&protocol.Heartbeat{Instance: b, Time: time.Now().UTC()})
			if err := nc.Publish(protocol.HeartbeatSubject(a), hb); err != nil {
				t.Fatal(err)
			}
		}},
		{"replace its own credential in clear", func(t *testing.T) {
			if _, err := js.Publish(ctx, protocol.EventSubject(a, protocol.EventCommand), forged(protocol.Event{Instance: a,
				Kind: protocol.EventCommand, Source: "agent", CommandID: "sec-forged", Step: string(protocol.CommandGetAdminAPIKey),
				Status: protocol.StatusOK, Result: json.RawMessage(`{"adminAPIKey":"forged"}`)})); err != nil {
				t.Fatal(err)
			}
		}},
		{"a provisioner's event on a step subject", func(t *testing.T) {
			if _, err := js.Publish(ctx, protocol.EventSubject(a, protocol.EventStep), forged(protocol.Event{Instance: a,
				Kind: protocol.EventMachine, Source: "provisioner", Step: "deprovision", Status: protocol.StatusOK})); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		// A violation left by the row before must not pass for this one's.
		drain()
		t.Run(row.name, row.attempt)
	}
	// Once the server's consumer of FM_EVENTS has nothing pending, every
	// forged event the bus took was folded (or skipped).
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		cons, err := admin.Consumer(ctx, protocol.StreamEvents, "fm-server")
		if err != nil {
			t.Fatal(err)
		}
		info, err := cons.Info(ctx)
		if err == nil && info.NumPending == 0 && info.NumAckPending == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the server did not fold the events: %+v %v", info, err)
		}
	}
	if after := records(t, d, py, admin, b); !reflect.DeepEqual(before, after) {
		t.Fatalf("B's records changed:\nbefore %v\nafter  %v", before, after)
	}
	if own := records(t, d, py, admin, a)["adminAPIKey"]; own != ownBefore {
		t.Fatalf("A's admin API key is %v, was %v: a credential in clear was taken", own, ownBefore)
	}
	// And the fleet still works: B takes an action.
	d.fm(t, "instance", "restart-dss", b, "--wait")
}

// TestAHostileReadOnlyOperator: read-only NATS credentials look at
// everything and change nothing, with the nats CLI an operator uses.
func TestAHostileReadOnlyOperator(t *testing.T) {
	natsBin, err := exec.LookPath("nats")
	if err != nil {
		t.Fatal("the NATS CLI is not on PATH; `make test` installs it")
	}
	data := filepath.Join(t.TempDir(), "fm")
	d := startDevFast(t, data)
	id := d.newInstance(t, "watched", "dss-14.0.0-standin")
	admin := d.jetStream(t)
	before, err := kvEntry(admin, protocol.BucketInstances, id)
	if err != nil {
		t.Fatal(err)
	}
	env := []string{"NATS_URL=nats://" + strings.TrimSpace(readFile(t, filepath.Join(data, "nats.addr"))),
		"HOME=" + t.TempDir(), "NATS_CREDS=" + filepath.Join(data, "nats-readonly.creds")}
	nats := func(args ...string) (string, int) {
		t.Helper()
		out, errOut, code := Run(t, natsBin, env, args...)
		return out + errOut, code
	}
	if out, code := nats("stream", "ls"); code != 0 || !strings.Contains(out, protocol.StreamEvents) {
		t.Fatalf("a read-only operator cannot look: %s", out)
	}
	for _, row := range []struct {
		name string
		args []string
	}{
		{"publish an event", []string{"pub", protocol.EventSubject(id, protocol.EventStep), "forged"}},
		{"publish a request", []string{"req", protocol.ProvisionSubject(id, protocol.ProvisionDelete), "forged", "--timeout", "2s"}},
		{"change an instance", []string{"kv", "put", protocol.BucketInstances, id, "{}"}},
		{"delete an instance", []string{"kv", "del", protocol.BucketInstances, id, "-f"}},
		{"purge the events", []string{"stream", "purge", protocol.StreamEvents, "-f"}},
		{"delete the audit trail", []string{"stream", "rm", protocol.StreamAudit, "-f"}},
		{"delete a consumer", []string{"consumer", "rm", protocol.StreamEvents, "fm-server", "-f"}},
		{"make a consumer", []string{"consumer", "add", protocol.StreamEvents, "mine", "--pull", "--defaults"}},
		// NATS does not check a reply subject: JetStream's answer (here
		// an event, which an agent writes) goes to the readers' account,
		// where nothing stores it, not into the instance's record.
		{"have JetStream answer into an instance", []string{"pub", "$JS.API.STREAM.MSG.GET." + protocol.StreamEvents, `{"seq":1}`,
			"--reply", protocol.KVSubject(protocol.BucketInstances, id)}},
	} {
		t.Run(row.name, func(t *testing.T) {
			// The CLI exits 0 after some refusals, saying so; a publish
			// with a reply of its choosing is taken, and changes nothing.
			if out, code := nats(row.args...); code == 0 && !strings.Contains(strings.ToLower(out), "permissions violation") && row.args[0] != "pub" {
				t.Fatalf("nats %s: exit 0\n%s", strings.Join(row.args, " "), out)
			}
		})
	}
	var in map[string]any
	py := NewPython(t, d.url, d.keyFile)
	if code := py.Do(t, "GET", "/instances/"+id, "", &in); code != 200 || in["id"] != id {
		t.Fatalf("the instance after the attempts: %d %v", code, in)
	}
	if e, err := kvEntry(admin, protocol.BucketInstances, id); err != nil || e.Revision() != before.Revision() {
		t.Fatalf("the instance's record changed in the attempts (was at revision %d): %v %v", before.Revision(), err, e)
	}
	if st, err := admin.Stream(context.Background(), protocol.StreamAudit); err != nil || errors.Is(err, jetstream.ErrStreamNotFound) {
		t.Fatalf("the audit trail after the attempts: %v %v", st, err)
	}
}

// kvEntry reads key of bucket.
func kvEntry(js jetstream.JetStream, bucket, key string) (jetstream.KeyValueEntry, error) {
	kv, err := js.KeyValue(context.Background(), bucket)
	if err != nil {
		return nil, err
	}
	return kv.Get(context.Background(), key)
}

// agentJWTExpiry is when the JWT the instance's machine holds expires.
func agentJWTExpiry(t *testing.T, d *devEnv, id string) time.Time {
	t.Helper()
	tok, err := natsjwt.ParseDecoratedJWT(machineCreds(t, filepath.Join(d.data, "local", "machines"), id))
	if err != nil {
		t.Fatal(err)
	}
	c, err := natsjwt.DecodeUserClaims(tok)
	if err != nil || c.Expires == 0 {
		t.Fatalf("the machine's JWT: %v, expires %d", err, c.Expires)
	}
	return time.Unix(c.Expires, 0)
}

// TestAgentCredentialsAreRenewed: agents' credentials expire (so that FM
// forgets a revocation once its credentials expired); a running agent
// renews them over the bus, and one whose credentials expired while its
// machine was stopped renews them at the join endpoint when it starts.
func TestAgentCredentialsAreRenewed(t *testing.T) {
	data := filepath.Join(t.TempDir(), "fm")
	d := startDevAt(t, data, FreePort(t), "--heartbeat-seconds", "1", "--agent-creds-ttl", "30s")
	t.Cleanup(func() { StopUnder(data) })
	py := NewPython(t, d.url, d.keyFile)
	id := d.newInstance(t, "renewed", "dss-14.0.0-standin")
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("the agent's log:\n%s", tail(readFile(t, filepath.Join(data, "local", "machines", id, "root", "var", "log", "fm-agent.log")), 6000))
		}
	})
	d.fm(t, "instance", "provision", id, "--wait")
	first := agentJWTExpiry(t, d, id)
	// Due after two thirds of its life: renewed over the bus.
	for deadline := time.Now().Add(60 * time.Second); !agentJWTExpiry(t, d, id).After(first); time.Sleep(time.Second) {
		if time.Now().After(deadline) {
			t.Fatal("the agent's credentials were never renewed")
		}
	}
	// Past the first JWT's expiry, the agent is still on the bus.
	time.Sleep(time.Until(first) + 2*time.Second)
	d.waitStatus(t, py, id, "responding past its first credentials", func(st map[string]any) bool { return st["agentResponding"] == true })

	d.fm(t, "instance", "stop", id, "--wait")
	stopped := agentJWTExpiry(t, d, id)
	time.Sleep(time.Until(stopped) + 2*time.Second) // expired while the machine is off
	d.fm(t, "instance", "start", id, "--wait")
	if !agentJWTExpiry(t, d, id).After(stopped) {
		t.Fatal("the machine started with its expired credentials")
	}
	d.waitStatus(t, py, id, "responding after renewing expired credentials", func(st map[string]any) bool { return st["agentResponding"] == true })
}

// TestAFoldedRevocationListCutsNoAgentOffForGood: once machines replaced
// within a credentials lifetime pass what NATS's account can list (4,000,
// seeded here), the next revocation revokes every agent issued until then;
// each agent still current renews at the join endpoint by itself and
// carries on. The new machine whose join made the revocation gets a JWT
// issued after the cutoff.
func TestAFoldedRevocationListCutsNoAgentOffForGood(t *testing.T) {
	data := filepath.Join(t.TempDir(), "fm")
	d := startDevAt(t, data, FreePort(t), "--heartbeat-seconds", "1", "--agent-creds-ttl", "10m")
	t.Cleanup(func() { StopUnder(data) })
	replaced := d.newInstance(t, "replaced", "dss-14.0.0-standin")
	kept := d.newInstance(t, "kept", "dss-14.0.0-standin")
	agentLog := filepath.Join(data, "local", "machines", kept, "root", "var", "log", "fm-agent.log")
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("the kept agent's log:\n%s", tail(readFile(t, agentLog), 6000))
		}
	})
	d.fm(t, "instance", "provision", replaced, "--wait")
	d.fm(t, "instance", "provision", kept, "--wait")
	before := agentJWTExpiry(t, d, kept)
	settings, err := d.jetStream(t).KeyValue(context.Background(), protocol.BucketSettings)
	if err != nil {
		t.Fatal(err)
	}
	live := map[string]int64{}
	for range 4000 {
		kp, _ := nkeys.CreateUser()
		pub, _ := kp.PublicKey()
		live[pub] = time.Now().Add(5 * time.Minute).Unix() // replaced 5 minutes ago
	}
	data4k, _ := json.Marshal(map[string]any{"expiring": live})
	if _, err := settings.Put(context.Background(), "system.nats-revocations", data4k); err != nil {
		t.Fatal(err)
	}
	// The new machine joins; the old one's revocation is the 4,001st.
	d.fm(t, "instance", "reprovision", replaced, "--wait")
	var doc struct {
		Expiring      map[string]int64 `json:"expiring"`
		RevokedBefore int64            `json:"revokedBefore"`
	}
	e, err := settings.Get(context.Background(), "system.nats-revocations")
	// (The replaced machine's user, whose JWT was made minutes ago, may
	// stay listed beside the cutoff.)
	if err != nil || json.Unmarshal(e.Value(), &doc) != nil || doc.RevokedBefore == 0 || len(doc.Expiring) > 1 {
		t.Fatalf("the list was not folded: %v, %d listed, cutoff %d", err, len(doc.Expiring), doc.RevokedBefore)
	}
	// The kept agent was cut off with every other; it renews by itself.
	for deadline := time.Now().Add(90 * time.Second); !agentJWTExpiry(t, d, kept).After(before); time.Sleep(time.Second) {
		if time.Now().After(deadline) {
			t.Fatal("the kept agent never renewed its credentials")
		}
	}
	if !strings.Contains(readFile(t, agentLog), "NATS refused the credentials before their expiry") {
		t.Fatal("the kept agent renewed, but not because NATS refused it")
	}
	tok, err := natsjwt.ParseDecoratedJWT(machineCreds(t, filepath.Join(d.data, "local", "machines"), replaced))
	if err != nil {
		t.Fatal(err)
	}
	if c, err := natsjwt.DecodeUserClaims(tok); err != nil || c.IssuedAt <= doc.RevokedBefore {
		t.Fatalf("the new machine's JWT is issued at %d, the cutoff is %d: %v", c.IssuedAt, doc.RevokedBefore, err)
	}
	d.fm(t, "instance", "restart-dss", kept, "--wait")
	d.fm(t, "instance", "restart-dss", replaced, "--wait")
}
