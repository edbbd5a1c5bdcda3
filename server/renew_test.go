package server_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/natsauth"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
	"github.com/fleetmanager/fm/server/servertest"
	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
)

// startWithShortCredentials is startWithAuthority with agent credentials
// that last ttl.
func startWithShortCredentials(t *testing.T, ttl time.Duration) *fm {
	t.Helper()
	return startWithAuthority(t, time.Hour, servertest.WithConfig(func(c *server.Config) { c.AgentCredsTTL = ttl }))
}

// joined makes an instance whose machine joined with kp; it returns the
// instance and the JWT the join gave.
func (f *fm) joined(label string, kp nkeys.KeyPair) (string, string) {
	f.t.Helper()
	if f.joinFleet == nil {
		vn, tpl, _ := f.fleet()
		f.joinFleet = []string{vn.ID, tpl.ID}
	}
	vn, tpl := struct{ ID string }{f.joinFleet[0]}, struct{ ID string }{f.joinFleet[1]}
	im := f.addImageWithKit("dss-"+label, "14.0.0")
	in := f.createInstance(instanceBody(label, vn.ID, tpl.ID, im.ID))
	req := f.provisionRequest(in.ID)
	var resp protocol.JoinResponse
	f.ok(f.joinAs(in.ID, req.Spec.Join.Token, kp), &resp)
	return in.ID, resp.JWT
}

// replaceMachine aborts the instance's reprovision under way and makes it
// a new machine, which joins with a new key: the old machine's user is
// revoked.
func (f *fm) replaceMachine(id string) {
	f.t.Helper()
	f.abortOperation(id)
	req := f.provisionRequest(id)
	f.ok(f.joinAs(id, req.Spec.Join.Token, machineKey(f.t)), nil)
}

// abortOperation aborts the instance's operation under way, if any, and
// waits until it ended.
func (f *fm) abortOperation(id string) {
	f.t.Helper()
	var st struct {
		Operation *struct {
			JobID string `json:"jobId"`
		} `json:"operation"`
	}
	f.ok(f.do("GET", "/instances/"+id+"/status", ""), &st)
	if st.Operation != nil {
		f.ok(f.do("DELETE", "/futures/"+st.Operation.JobID, ""), nil)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		st.Operation = nil // a field the answer leaves out keeps its value
		f.ok(f.do("GET", "/instances/"+id+"/status", ""), &st)
		if st.Operation == nil {
			break
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("the aborted operation never ended: %s", f.do("GET", "/instances/"+id+"/status", "").body)
		}
	}
}

func renewRequest(t *testing.T, instance string, kp nkeys.KeyPair, at time.Time) protocol.RenewRequest {
	t.Helper()
	req := protocol.RenewRequest{Instance: instance, PublicKey: publicKey(kp), Time: at.UTC()}
	sig, err := kp.Sign(protocol.RenewProof(req.Instance, req.PublicKey, req.Time))
	if err != nil {
		t.Fatal(err)
	}
	req.Signature = base64.RawURLEncoding.EncodeToString(sig)
	return req
}

// renewOnBus sends a renew request on subject, with a reply subject in
// the inbox of the subject's instance (as that agent's connection does),
// and returns the answer.
func (f *fm) renewOnBus(subject string, req protocol.RenewRequest) protocol.RenewResponse {
	f.t.Helper()
	var resp protocol.RenewResponse
	reply := protocol.InboxPrefix(protocol.InstanceFromSubject(subject)) + "." + protocol.NewID("r")
	if !f.askAsAgent(subject, reply, &req, &resp, 10*time.Second) {
		f.t.Fatal("no answer to the renew request")
	}
	return resp
}

// askAsAgent sends req on subject with reply as its reply subject, as an
// agent does, and decodes the answer into resp; false if none came within
// wait.
func (f *fm) askAsAgent(subject, reply string, req, resp protocol.Message, wait time.Duration) bool {
	f.t.Helper()
	data, err := protocol.Encode(req)
	if err != nil {
		f.t.Fatal(err)
	}
	sub, err := f.env.Conn.SubscribeSync(reply)
	if err != nil {
		f.t.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := f.env.Conn.PublishRequest(subject, reply, data); err != nil {
		f.t.Fatal(err)
	}
	msg, err := sub.NextMsg(wait)
	if err != nil {
		return false
	}
	if err := protocol.Decode(msg.Data, resp); err != nil {
		f.t.Fatal(err)
	}
	return true
}

func claimsOf(t *testing.T, tok string) *jwt.UserClaims {
	t.Helper()
	c, err := jwt.DecodeUserClaims(tok)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestAgentCredentialsExpireAndAreRenewed: a join gives a JWT that
// expires; the machine's agent renews it on the bus (for its own
// instance's key only) and, once expired, over HTTP with a signed request.
func TestAgentCredentialsExpireAndAreRenewed(t *testing.T) {
	f := startWithShortCredentials(t, time.Hour)
	kp := machineKey(t)
	id, first := f.joined("renew", kp)
	c := claimsOf(t, first)
	if c.Expires == 0 || time.Until(time.Unix(c.Expires, 0)) > time.Hour+time.Minute || c.Subject != publicKey(kp) {
		t.Fatalf("the join's JWT: subject %s expires %d", c.Subject, c.Expires)
	}
	other := machineKey(t)
	otherID, _ := f.joined("other", other)
	time.Sleep(1100 * time.Millisecond) // a later second: a later expiry
	now := time.Now()
	for _, row := range []struct {
		name    string
		subject string
		req     protocol.RenewRequest
		ok      bool
	}{
		{"its own key", protocol.RenewSubject(id), renewRequest(t, id, kp, now), true},
		{"another instance's subject", protocol.RenewSubject(otherID), renewRequest(t, id, kp, now), false},
		{"another machine's key", protocol.RenewSubject(id), renewRequest(t, id, other, now), false},
		// On the bus the subject shows who asks: a machine whose clock is
		// off still renews (over HTTP it is refused, below).
		{"a machine whose clock is an hour behind", protocol.RenewSubject(id), renewRequest(t, id, kp, now.Add(-time.Hour)), true},
		{"a forged signature", protocol.RenewSubject(id), func() protocol.RenewRequest {
			r := renewRequest(t, id, kp, now)
			r.Signature = renewRequest(t, id, other, now).Signature
			return r
		}(), false},
	} {
		t.Run(row.name, func(t *testing.T) {
			time.Sleep(1100 * time.Millisecond) // after a renewal, an instance's requests wait a second
			resp := f.renewOnBus(row.subject, row.req)
			if row.ok != (resp.Error == nil) {
				t.Fatalf("renewal: %+v", resp.Error)
			}
			if !row.ok {
				if resp.Error.Code != protocol.CodeUnauthenticated {
					t.Fatalf("refused with %s", resp.Error.Code)
				}
				return
			}
			got := claimsOf(t, resp.JWT)
			if got.Subject != publicKey(kp) || got.Expires <= c.Expires || got.Name != id {
				t.Fatalf("renewed JWT: subject %s (want %s) expires %d (before: %d)", got.Subject, publicKey(kp), got.Expires, c.Expires)
			}
		})
	}
	// The answer goes to the agent's own inbox only: a reply subject of
	// FM's (a bucket's key) gets nothing written to it.
	t.Run("a reply subject outside the agent's inbox", func(t *testing.T) {
		data, _ := protocol.Encode(&protocol.RenewRequest{Instance: id, PublicKey: "junk", Time: time.Now(), Signature: "junk"})
		target := protocol.KVSubject(protocol.BucketSecrets, otherID)
		kv, err := f.env.Bus.JetStream(t).KeyValue(context.Background(), protocol.BucketSecrets)
		if err != nil {
			t.Fatal(err)
		}
		before, err := kv.Get(context.Background(), otherID)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.env.Conn.PublishRequest(protocol.RenewSubject(id), target, data); err != nil {
			t.Fatal(err)
		}
		// A request after it, answered: the server took the first one.
		time.Sleep(1100 * time.Millisecond)
		if resp := f.renewOnBus(protocol.RenewSubject(id), renewRequest(t, id, kp, time.Now())); resp.Error != nil {
			t.Fatal(resp.Error)
		}
		// And at once again: too soon.
		if resp := f.renewOnBus(protocol.RenewSubject(id), renewRequest(t, id, kp, time.Now())); resp.Error == nil || resp.Error.Code != protocol.CodeResourceExhausted {
			t.Fatalf("a second renewal within a second: %+v", resp.Error)
		}
		if after, err := kv.Get(context.Background(), otherID); err != nil || after.Revision() != before.Revision() {
			t.Fatalf("another instance's secrets were written through a renew's reply subject: %v", err)
		}
	})
	// Expired while the machine was off: over HTTP, signed.
	var resp protocol.RenewResponse
	f.ok(f.doAs("POST", server.RenewPath, mustJSON(t, renewRequest(t, id, kp, time.Now())), "", ""), &resp)
	if got := claimsOf(t, resp.JWT); got.Subject != publicKey(kp) {
		t.Fatalf("renewed over HTTP: %s", got.Subject)
	}
	f.failed(f.doAs("POST", server.RenewPath, mustJSON(t, renewRequest(t, id, other, time.Now())), "", ""), 401, "Unauthenticated")
	f.failed(f.doAs("POST", server.RenewPath, mustJSON(t, renewRequest(t, id, kp, time.Now().Add(-time.Hour))), "", ""), 401, "Unauthenticated")
	// A machine replaced (its key revoked) renews no more.
	f.replaceMachine(id)
	if r := f.renewOnBus(protocol.RenewSubject(id), renewRequest(t, id, kp, time.Now())); r.Error == nil {
		t.Fatal("a replaced machine's credentials were renewed")
	}
}

// TestRevocationsGoOnceTheirCredentialsExpired: the revocation list holds
// only the users whose JWTs may still be valid. Seeded with 12,000
// revocations of credentials expired since (near what the bucket's 1 MiB
// value holds), it comes down to the new one at the next revocation, and
// the account JWT stays far under NATS's 1 MB. (pruneRevocations is tested
// with 20,000 in TestPruningTwentyThousandRevocations.)
func TestRevocationsGoOnceTheirCredentialsExpired(t *testing.T) {
	f := startWithShortCredentials(t, time.Hour)
	ctx := context.Background()
	settings, err := f.env.Bus.JetStream(t).KeyValue(ctx, protocol.BucketSettings)
	if err != nil {
		t.Fatal(err)
	}
	const seeded = 12000
	doc := map[string]map[string]int64{"revocations": {}, "expiring": {}}
	past := time.Now().Add(-2 * time.Hour).Unix()
	for i := 0; i < seeded; i++ {
		doc["expiring"][publicKey(machineKey(t))] = past
	}
	// One from an FM whose credentials never expired: dropped (the FM
	// account no longer names the key that signed them).
	forever := publicKey(machineKey(t))
	doc["revocations"][forever] = past
	seedRevocations(t, settings, doc)
	kp := machineKey(t)
	id, _ := f.joined("pruned", kp)
	// The machine is replaced: its user is revoked.
	f.replaceMachine(id)
	got := storedRevocations(t, settings)
	if got.Expiring[publicKey(kp)] < time.Now().Add(50*time.Minute).Unix() {
		t.Fatalf("the replaced machine is revoked as of %d, not its JWT's expiry (%d entries)", got.Expiring[publicKey(kp)], len(got.Expiring))
	}
	if len(got.Revocations) != 0 || len(got.Expiring) != 1 {
		t.Fatalf("%d+%d revocations kept, want the new one alone", len(got.Revocations), len(got.Expiring))
	}
	all := map[string]int64{}
	for u, at := range got.Expiring {
		all[u] = at
	}
	auth, _ := natsauth.Open(t.TempDir())
	acc, err := auth.AgentsAccountJWT(all)
	if err != nil {
		t.Fatal(err)
	}
	if len(acc) > 1<<20 {
		t.Fatalf("the account JWT is %d bytes", len(acc))
	}
	fmt.Fprintf(testWriter{t}, "account JWT after pruning %d revocations: %d bytes\n", seeded, len(acc))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

// TestAFoldedListRevokesEveryAgentUntilRenewed: a revocation that takes
// the list past what NATS can carry folds it into one revocation of every
// agent user issued until then. The account JWT stays small, every user
// listed before and every agent still current is revoked, and a renewal
// made at once is answered only with a JWT issued after the cutoff.
func TestAFoldedListRevokesEveryAgentUntilRenewed(t *testing.T) {
	f := startWithShortCredentials(t, time.Hour)
	ctx := context.Background()
	settings, err := f.env.Bus.JetStream(t).KeyValue(ctx, protocol.BucketSettings)
	if err != nil {
		t.Fatal(err)
	}
	kpA, kpB := machineKey(t), machineKey(t)
	a, _ := f.joined("replaced", kpA)
	b, oldB := f.joined("current", kpB)
	// Machines replaced within the hour (credentials last an hour), their
	// revocations all in force.
	live := map[string]int64{}
	for range server.MaxListedRevocations {
		live[publicKey(machineKey(t))] = time.Now().Add(30 * time.Minute).Unix()
	}
	seedRevocations(t, settings, map[string]any{"expiring": live})
	// A's new machine joins: the old one's revocation is one more. The
	// JWT is made after it, so the join is told to try again until a JWT
	// made is issued after the cutoff.
	f.abortOperation(a)
	req := f.provisionRequest(a)
	newA := machineKey(t)
	f.failed(f.joinAs(a, req.Spec.Join.Token, newA), 503, "Unavailable")
	doc := storedRevocations(t, settings)
	// A's machine before joined a moment ago: its user stays listed, in
	// case a JWT of it was minted late.
	if _, ok := doc.Expiring[publicKey(kpA)]; !ok || len(doc.Expiring) != 1 || doc.RevokedBefore < time.Now().Unix() {
		t.Fatalf("the list was not folded: %d users, every one issued until %d", len(doc.Expiring), doc.RevokedBefore)
	}
	all := map[string]int64{natsauth.AllUsers: doc.RevokedBefore}
	auth, _ := natsauth.Open(t.TempDir())
	acc, err := auth.AgentsAccountJWT(all)
	if err != nil {
		t.Fatal(err)
	}
	claims, err := jwt.DecodeAccountClaims(acc)
	if err != nil {
		t.Fatal(err)
	}
	oldClaims, err := jwt.DecodeUserClaims(oldB)
	if err != nil {
		t.Fatal(err)
	}
	if !claims.IsClaimRevoked(oldClaims) {
		t.Fatal("the current agent's JWT of before the fold is not revoked")
	}
	// One the list named, its last JWT issued half an hour ago.
	named := jwt.NewUserClaims(slices.Collect(maps.Keys(live))[0])
	named.IssuedAt = time.Now().Add(-30 * time.Minute).Unix()
	if !claims.IsClaimRevoked(named) {
		t.Fatal("a user the list named is no longer revoked")
	}
	// The current agent, cut off, renews at the join endpoint at once: it
	// is told to try again until a JWT made is issued after the cutoff.
	var resp protocol.RenewResponse
	tries := 0
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		tries++
		r := f.doAs("POST", server.RenewPath, mustJSON(t, renewRequest(t, b, kpB, time.Now())), "", "")
		if r.status == 200 {
			f.ok(r, &resp)
			break
		}
		if r.status != 503 || time.Now().After(deadline) {
			t.Fatalf("the renewal after the fold: %d %s", r.status, r.body)
		}
	}
	if tries == 1 {
		t.Fatal("a renewal at once after the fold was answered")
	}
	// The new machine asks again, as an agent does, and joins.
	var joined protocol.JoinResponse
	f.ok(f.joinAs(a, req.Spec.Join.Token, newA), &joined)
	if c, err := jwt.DecodeUserClaims(joined.JWT); err != nil || c.IssuedAt <= doc.RevokedBefore {
		t.Fatalf("A's new machine's JWT: %v", err)
	}
	renewed, err := jwt.DecodeUserClaims(resp.JWT)
	if err != nil {
		t.Fatal(err)
	}
	if renewed.IssuedAt <= doc.RevokedBefore || claims.IsClaimRevoked(renewed) {
		t.Fatalf("the renewed JWT is issued at %d, the cutoff is %d", renewed.IssuedAt, doc.RevokedBefore)
	}
	fmt.Fprintf(testWriter{t}, "account JWT after the fold: %d bytes\n", len(acc))
}

// revocationsDoc is the revocation list as fm_settings keeps it.
type revocationsDoc struct {
	Revocations   map[string]int64 `json:"revocations"`
	Expiring      map[string]int64 `json:"expiring"`
	RevokedBefore int64            `json:"revokedBefore"`
}

// seedRevocations writes doc as the revocation list, as an FM would have.
func seedRevocations(t *testing.T, settings jetstream.KeyValue, doc any) {
	t.Helper()
	data, _ := json.Marshal(doc)
	if _, err := settings.Put(context.Background(), "system.nats-revocations", data); err != nil {
		t.Fatalf("seed %d bytes: %v", len(data), err)
	}
}

// storedRevocations reads the revocation list.
func storedRevocations(t *testing.T, settings jetstream.KeyValue) revocationsDoc {
	t.Helper()
	entry, err := settings.Get(context.Background(), "system.nats-revocations")
	if err != nil {
		t.Fatal(err)
	}
	var doc revocationsDoc
	if err := json.Unmarshal(entry.Value(), &doc); err != nil {
		t.Fatal(err)
	}
	return doc
}
