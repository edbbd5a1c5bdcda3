package server_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/internal/natsauth"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
	"github.com/fleetmanager/fm/server/servertest"
	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nkeys"
)

// startWithAuthority starts a server that gives machines join tokens, with
// tokens valid for ttl.
func startWithAuthority(t *testing.T, ttl time.Duration, opts ...servertest.Option) *fm {
	t.Helper()
	auth, err := natsauth.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return start(t, append([]servertest.Option{servertest.WithConfig(func(c *server.Config) {
		c.Authority = auth
		c.Topology = bus.DefaultTopology()
		c.Topology.JoinTokenTTL = ttl
	})}, opts...)...)
}

// reprovision starts a reprovision of the instance and returns the join
// spec of the provision request it sent (no provisioner runs).
func (f *fm) reprovision(id string) *protocol.JoinSpec {
	f.t.Helper()
	req := f.provisionRequest(id)
	if req.Spec == nil || req.Spec.Join == nil || req.Spec.Join.Token == "" || !strings.HasSuffix(req.Spec.Join.URL, server.JoinPath) {
		f.t.Fatalf("the provision request has no join: %+v", req.Spec)
	}
	return req.Spec.Join
}

// provisionRequest starts a reprovision of the instance and returns the
// provision request it sent (no provisioner runs).
func (f *fm) provisionRequest(id string) protocol.ProvisionRequest {
	f.t.Helper()
	f.ok(f.do("GET", "/instances/"+id+"/actions/reprovision", ""), nil)
	st, err := f.env.Bus.JetStream(f.t).Stream(context.Background(), protocol.StreamProvision)
	if err != nil {
		f.t.Fatal(err)
	}
	// FM_PROVISION is a work queue: the request stays until a provisioner
	// takes it, and none runs here.
	m, err := st.GetLastMsgForSubject(context.Background(), protocol.ProvisionSubject(id, protocol.ProvisionReprovision))
	if err != nil {
		f.t.Fatal(err)
	}
	var req protocol.ProvisionRequest
	if err := protocol.Decode(m.Data, &req); err != nil {
		f.t.Fatal(err)
	}
	if req.Spec != nil && req.Spec.Join != nil {
		// The token travels sealed (read-only bus credentials read this
		// request); the provisioner opens it.
		if req.Spec.Join.Token != "" || req.Spec.Join.SealedToken == "" {
			f.t.Fatalf("the join token is not sealed: %+v", req.Spec.Join)
		}
		token, err := f.env.OpenSecret(req.Spec.Join.SealedToken, protocol.SealedJoinTokenPlace(req.Instance))
		if err != nil {
			f.t.Fatal(err)
		}
		req.Spec.Join.Token = token
		// Nor is it in clear in the operation's record.
		ops, err := f.env.Bus.JetStream(f.t).KeyValue(context.Background(), protocol.BucketOps)
		if err != nil {
			f.t.Fatal(err)
		}
		keys, _ := ops.ListKeys(context.Background())
		for k := range keys.Keys() {
			if e, err := ops.Get(context.Background(), k); err == nil && strings.Contains(string(e.Value()), token) {
				f.t.Fatalf("operation %s holds the join token in clear", k)
			}
		}
	}
	return req
}

// machineKey is a NATS user key, as a machine makes one for itself.
func machineKey(t testing.TB) nkeys.KeyPair {
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	return kp
}

// joinBody is a machine's join request, signed with its key as its agent
// signs it.
func joinBody(t testing.TB, instance, token string, kp nkeys.KeyPair) string {
	t.Helper()
	pub, _ := kp.PublicKey()
	sig, err := kp.Sign(protocol.JoinProof(instance, token))
	if err != nil {
		t.Fatal(err)
	}
	return mustJSON(t, protocol.JoinRequest{Instance: instance, Token: token, PublicKey: pub, Signature: base64.RawURLEncoding.EncodeToString(sig)})
}

func publicKey(kp nkeys.KeyPair) string {
	pub, _ := kp.PublicKey()
	return pub
}

func (f *fm) join(instance, token string) response {
	f.t.Helper()
	return f.joinAs(instance, token, machineKey(f.t))
}

func (f *fm) joinAs(instance, token string, kp nkeys.KeyPair) response {
	f.t.Helper()
	return f.doAs("POST", server.JoinPath, joinBody(f.t, instance, token, kp), "", "")
}

func (f *fm) joinRaw(req protocol.JoinRequest) response {
	f.t.Helper()
	return f.doAs("POST", server.JoinPath, mustJSON(f.t, req), "", "")
}

func TestJoinTokens(t *testing.T) {
	f := startWithAuthority(t, 3*time.Second)
	vn, tpl, _ := f.fleet()
	im := f.addImageWithKit("dss-join", "14.0.0")
	var ids []string
	for _, label := range []string{"a", "b", "c"} {
		ids = append(ids, f.createInstance(instanceBody(label, vn.ID, tpl.ID, im.ID)).ID)
	}
	a, b, c := ids[0], ids[1], ids[2]
	tokA, tokB := f.reprovision(a).Token, f.reprovision(b).Token

	t.Run("foreign", func(t *testing.T) {
		f.failed(f.join(b, tokA), 401, "Unauthenticated")
	})
	t.Run("exchanged by one machine", func(t *testing.T) {
		kp := machineKey(t)
		pub := publicKey(kp)
		var resp protocol.JoinResponse
		f.ok(f.joinAs(a, tokA, kp), &resp)
		claims, err := jwt.DecodeUserClaims(resp.JWT)
		if err != nil || claims.Subject != pub || resp.InstanceKey == "" || resp.Credentials != "" {
			t.Fatalf("join answer: %v %+v", err, resp)
		}
		// The same machine asking again (its answer lost, or killed before
		// it kept it) gets the same rights and key; another is refused.
		var again protocol.JoinResponse
		f.ok(f.joinAs(a, tokA, kp), &again)
		if again.InstanceKey != resp.InstanceKey {
			t.Fatal("a second exchange by the same machine gave another instance key")
		}
		if c, err := jwt.DecodeUserClaims(again.JWT); err != nil || c.Subject != pub {
			t.Fatalf("second answer: %v", err)
		}
		f.failed(f.join(a, tokA), 401, "Unauthenticated")
		// Whoever knows the token and the machine's public key (others may
		// read both) but not its seed is refused: unsigned, or signed with
		// another key.
		f.failed(f.joinRaw(protocol.JoinRequest{Instance: a, Token: tokA, PublicKey: pub}), 401, "Unauthenticated")
		var forged protocol.JoinRequest
		if err := json.Unmarshal([]byte(joinBody(t, a, tokA, machineKey(t))), &forged); err != nil {
			t.Fatal(err)
		}
		forged.PublicKey = pub
		f.failed(f.joinRaw(forged), 401, "Unauthenticated")
		// A machine must send a key of its own, and a NATS user key.
		f.failed(f.joinRaw(protocol.JoinRequest{Instance: b, Token: tokB, PublicKey: "not-a-key", Signature: "c2ln"}), 400, "InvalidArgument")
		f.failed(f.joinRaw(protocol.JoinRequest{Instance: b, Token: tokB}), 409, "FailedPrecondition")
		// An agent that does not sign (older than this FM) is told so.
		f.failed(f.joinRaw(protocol.JoinRequest{Instance: b, Token: tokB, PublicKey: publicKey(machineKey(t))}), 409, "FailedPrecondition")
	})
	t.Run("wrong secret", func(t *testing.T) {
		// The last character changed (a token ending in "x" gets a "y").
		wrong := tokB[:len(tokB)-1] + "x"
		if wrong == tokB {
			wrong = tokB[:len(tokB)-1] + "y"
		}
		f.failed(f.join(b, wrong), 401, "Unauthenticated")
		f.failed(f.join(b, "no-dot"), 401, "Unauthenticated")
		f.failed(f.join(b, ""), 401, "Unauthenticated")
	})
	t.Run("expired", func(t *testing.T) {
		tokC := f.reprovision(c).Token
		id, _, _ := strings.Cut(tokC, ".")
		kv, err := f.env.Bus.JetStream(t).KeyValue(context.Background(), protocol.BucketJoins)
		if err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(30 * time.Second)
		for _, err := kv.Get(context.Background(), id); err == nil; _, err = kv.Get(context.Background(), id) {
			if time.Now().After(deadline) {
				t.Fatal("the token never expired from fm_joins")
			}
			time.Sleep(200 * time.Millisecond)
		}
		f.failed(f.join(c, tokC), 401, "Unauthenticated")
	})
	t.Run("audited", func(t *testing.T) {
		var recs []protocol.AuditRecord
		f.ok(f.do("GET", "/audit?object=credentials&limit=100", ""), &recs)
		count := map[string]int{}
		for _, r := range recs {
			count[r.Action]++
			if r.Action == "join.refused" && (r.Error == nil || r.From == "") {
				t.Errorf("refusal without its reason or origin: %+v", r)
			}
		}
		if count["join.refused"] != 8 || count["credentials.exchanged"] != 2 || count["credentials.minted"] != 2 {
			t.Fatalf("credential events %v", count)
		}
		if raw := mustJSON(t, recs); strings.Contains(raw, tokA) || strings.Contains(raw, tokB) {
			t.Fatal("a token reached the audit trail")
		}
	})
	t.Run("rate limited", func(t *testing.T) {
		// Eight refusals so far; ten in a minute block the address.
		for n := 0; n < 2; n++ {
			f.failed(f.join(b, "jt-x.y"), 401, "Unauthenticated")
		}
		f.failed(f.join(b, tokB), 429, string(protocol.CodeResourceExhausted))
	})
}

// TestJoinWithoutAuthority: a server without NATS authority says so.
func TestJoinWithoutAuthority(t *testing.T) {
	f := start(t)
	if e := f.failed(f.join("in-x", "jt-a.b"), 501, string(protocol.CodeUnimplemented)); e.DetailedMessage == "" {
		t.Fatal("no reason given")
	}
}

// TestAJoinWithdrawsItsInstancesOlderTokens: once a machine joins, the
// tokens made for its instance before its own go (an earlier machine's
// must not join in its place); other instances' tokens stay.
func TestAJoinWithdrawsItsInstancesOlderTokens(t *testing.T) {
	f := startWithAuthority(t, time.Hour)
	vn, tpl, _ := f.fleet()
	im := f.addImageWithKit("dss-withdraw", "14.0.0")
	a := f.createInstance(instanceBody("a", vn.ID, tpl.ID, im.ID)).ID
	b := f.createInstance(instanceBody("b", vn.ID, tpl.ID, im.ID)).ID
	tok := f.reprovision(a).Token
	kv, err := f.env.Bus.JetStream(t).KeyValue(context.Background(), protocol.BucketJoins)
	if err != nil {
		t.Fatal(err)
	}
	older := func(instance string) string {
		key := "jt-older" + strings.TrimPrefix(instance, "in-")
		rec, _ := json.Marshal(map[string]any{"instance": instance, "hash": "x", "expires": time.Now().Add(time.Minute).UTC()})
		if _, err := kv.Put(context.Background(), key, rec); err != nil {
			t.Fatal(err)
		}
		return key
	}
	olderA, olderB := older(a), older(b)
	f.ok(f.joinAs(a, tok, machineKey(t)), nil)
	deadline := time.Now().Add(10 * time.Second)
	for _, err := kv.Get(context.Background(), olderA); err == nil; _, err = kv.Get(context.Background(), olderA) {
		if time.Now().After(deadline) {
			t.Fatal("an older token of the instance that joined is still there")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := kv.Get(context.Background(), olderB); err != nil {
		t.Fatalf("another instance's token went: %v", err)
	}
}
