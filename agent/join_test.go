package agent

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/crashpoint"
	"github.com/fleetmanager/fm/internal/imdstest"
	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nkeys"
)

// fakeJoin is FM's join endpoint as the agent sees it: a token is bound to
// the first machine key it is exchanged for; the same key gets an answer
// again, another is refused. dropFirst loses the first answer (the
// connection closes after the token was bound).
type fakeJoin struct {
	t         *testing.T
	account   nkeys.KeyPair
	key       string
	dropFirst bool

	// requireIdentity answers 503 to a join without the EC2 instance
	// identity document, as an FM given AWS's certificates does.
	requireIdentity bool

	mu         sync.Mutex
	bound      string
	asked      []string
	identities []*protocol.EC2Identity
}

func newFakeJoin(t *testing.T) *fakeJoin {
	acc, err := nkeys.CreateAccount()
	if err != nil {
		t.Fatal(err)
	}
	return &fakeJoin{t: t, account: acc, key: base64.StdEncoding.EncodeToString(seal.NewKey())}
}

func (f *fakeJoin) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var req protocol.JoinRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		http.Error(w, err.Error(), 400)
		return
	}
	f.mu.Lock()
	f.asked = append(f.asked, req.PublicKey)
	f.identities = append(f.identities, req.EC2Identity)
	if f.requireIdentity && req.EC2Identity == nil {
		f.mu.Unlock()
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	first := len(f.asked) == 1
	if f.bound == "" {
		f.bound = req.PublicKey
	}
	bound := f.bound
	f.mu.Unlock()
	if req.PublicKey != bound {
		w.WriteHeader(http.StatusUnauthorized)
		_ = json.NewEncoder(w).Encode(map[string]string{"detailedMessage": "token already used by another machine"})
		return
	}
	if first && f.dropFirst {
		// Bound, then the answer never reaches the machine.
		conn, _, err := w.(http.Hijacker).Hijack()
		if err == nil {
			conn.Close()
		}
		return
	}
	uc := jwt.NewUserClaims(req.PublicKey)
	uc.Tags.Add(protocol.AgentsAccountTag) // a user of the agents' account, as FM makes
	tok, err := uc.Encode(f.account)
	if err != nil {
		f.t.Error(err)
		http.Error(w, err.Error(), 500)
		return
	}
	_ = json.NewEncoder(w).Encode(protocol.JoinResponse{JWT: tok, InstanceKey: f.key})
}

func (f *fakeJoin) keysAsked() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.asked...)
}

// TestJoinIsRetriedWithTheSameKey: a machine whose join answer is lost, or
// that dies before it keeps it, asks again with the key it made (and kept
// before asking), and FM, which bound the token to that key, answers it; a
// machine is never left without credentials by a token used once. What it
// gets is kept in one file, credentials and key together.
func TestJoinIsRetriedWithTheSameKey(t *testing.T) {
	join := newFakeJoin(t)
	join.dropFirst = true
	ts := httptest.NewServer(join)
	t.Cleanup(ts.Close)
	r := newRig(t)
	r.cfg.Join = &protocol.JoinSpec{URL: ts.URL + "/api/join", Token: "jt-test.secret"}

	// The first answer is lost: the agent asks again, with the same key.
	r.startAgent()
	r.waitReady(r.desire("14.0.0").Generation)
	asked := join.keysAsked()
	if len(asked) != 2 || asked[0] != asked[1] || asked[0] == "" {
		t.Fatalf("keys asked for: %v", asked)
	}
	m := newMachine(r.cfg, r.cfg.Logger)
	for _, p := range []string{m.credsPath(), m.instanceKeyPath()} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s written apart from the identity file", p)
		}
	}
	var id identity
	if b, err := os.ReadFile(m.identityPath()); err != nil || json.Unmarshal(b, &id) != nil || id.InstanceKey != join.key || id.Credentials == "" {
		t.Fatalf("identity: %v %+v", err, id)
	}
	if r.agent.box == nil {
		t.Fatal("the agent has no instance key")
	}
	r.stopAgent()

	// A new machine (a new OS disk) that dies between the answer and
	// keeping it: the next start asks again with the key it kept first.
	join2 := newFakeJoin(t)
	ts2 := httptest.NewServer(join2)
	t.Cleanup(ts2.Close)
	r.newMachineRoot()
	r.cfg.Join = &protocol.JoinSpec{URL: ts2.URL + "/api/join", Token: "jt-test2.secret"}
	crasher := &crashpoint.Crasher{N: 1}
	r.cfg.Crash = func(point string) {
		if point == "agent/join/keep-identity:before" {
			crasher.Hook()(point)
		}
	}
	a, err := New(r.cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	crasher.Die = cancel
	t.Cleanup(func() { cancel(); a.logFile.Close() })
	go func() { _ = a.Run(ctx) }()
	select {
	case <-crasher.Crashed():
	case <-time.After(30 * time.Second):
		t.Fatal("the agent never got its join answer")
	}
	r.cfg.Crash = nil
	r.since = time.Now()
	r.startAgent()
	r.waitReady(r.gen)
	if asked := join2.keysAsked(); len(asked) != 2 || asked[0] != asked[1] {
		t.Fatalf("keys asked for after the crash: %v", asked)
	}
}

// TestAnAgentOnEC2JoinsWithItsIdentity: an agent whose configuration names
// the instance metadata service sends its instance identity document and
// signature with its join, read with an IMDSv2 session token. A metadata
// service not answering yet does not hold the join up: the agent asks
// without the document, and again when FM (which requires it) answers 503.
func TestAnAgentOnEC2JoinsWithItsIdentity(t *testing.T) {
	join := newFakeJoin(t)
	join.requireIdentity = true
	ts := httptest.NewServer(join)
	t.Cleanup(ts.Close)
	imds := imdstest.Serve(t, imdstest.NewSigner(t).Proof(t, "i-0abc"), 1)
	r := newRig(t)
	r.cfg.Join = &protocol.JoinSpec{URL: ts.URL + "/api/join", Token: "jt-test.secret"}
	r.cfg.IMDSURL = imds.URL
	r.startAgent()
	r.waitReady(r.desire("14.0.0").Generation)
	join.mu.Lock()
	defer join.mu.Unlock()
	if n := len(join.identities); n != 2 || join.identities[0] != nil {
		t.Fatalf("%d joins, the first with %v: want one without the document (the service failing), then one with it", n, join.identities[0])
	}
	if id := join.identities[1]; id == nil || id.Document != imds.Proof.Document || id.Signature != imds.Proof.Signature {
		t.Fatalf("the join's identity: %+v", id)
	}
}
