package agent

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/natsauth"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"
)

func TestWhenCredentialsAreRenewed(t *testing.T) {
	now := time.Now()
	for _, c := range []struct {
		name            string
		issued, expires time.Time
		due             time.Time
		nearlyExpired   bool
	}{
		{"a day, just issued", now, now.Add(24 * time.Hour), now.Add(16 * time.Hour), false},
		{"a day, 30 s left", now.Add(-24 * time.Hour).Add(30 * time.Second), now.Add(30 * time.Second), now.Add(-8 * time.Hour).Add(30 * time.Second), true},
		{"30 s, just issued", now, now.Add(30 * time.Second), now.Add(20 * time.Second), false},
		{"30 s, 2 s left", now.Add(-28 * time.Second), now.Add(2 * time.Second), now.Add(-8 * time.Second), true},
		{"expired", now.Add(-2 * time.Hour), now.Add(-time.Hour), now.Add(-80 * time.Minute), true},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := renewalDue(c.issued, c.expires); got.Sub(c.due).Abs() > time.Second {
				t.Errorf("renewalDue = %s, want %s", got, c.due)
			}
			if got := nearlyExpired(c.issued, c.expires); got != c.nearlyExpired {
				t.Errorf("nearlyExpired = %v", got)
			}
		})
	}
}

// TestARenewalKeepsTheMachineKey: the renew request is signed by the
// machine's key, and the renewed credentials pair the new JWT with the
// same seed (a wiped copy of it once made them unusable).
func TestARenewalKeepsTheMachineKey(t *testing.T) {
	auth, err := natsauth.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	kp, _ := nkeys.CreateUser()
	pub, _ := kp.PublicKey()
	seed, _ := kp.Seed()
	tok, err := auth.AgentJWT("in-r", pub, time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	creds, _ := jwt.FormatUserConfig(tok, seed)
	a := &Agent{cfg: Config{Instance: "in-r"}, creds: creds}
	req, kept, err := a.renewRequest()
	if err != nil {
		t.Fatal(err)
	}
	sig, _ := base64.RawURLEncoding.DecodeString(req.Signature)
	if req.PublicKey != pub || kp.Verify(protocol.RenewProof(req.Instance, req.PublicKey, req.Time), sig) != nil {
		t.Fatalf("the renew request is not signed by the machine's key: %+v", req)
	}
	fresh, err := auth.AgentJWT("in-r", pub, time.Now().Add(2*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	renewed, err := renewedCreds(protocol.RenewResponse{JWT: fresh}, kept)
	if err != nil {
		t.Fatal(err)
	}
	got, err := jwt.ParseDecoratedUserNKey(renewed)
	if err != nil {
		t.Fatal(err)
	}
	if p, _ := got.PublicKey(); p != pub {
		t.Fatalf("renewed credentials hold key %s, want %s", p, pub)
	}
	if _, expires, err := credsTimes(renewed); err != nil || expires.Before(time.Now().Add(90*time.Minute)) {
		t.Fatalf("renewed credentials expire %s (%v)", expires, err)
	}
	if _, err := renewedCreds(protocol.RenewResponse{Error: protocol.Errorf(protocol.CodeUnauthenticated, "revoked")}, kept); err == nil {
		t.Fatal("a refusal made credentials")
	}
}

// TestCredentialsOfTheFMAccountMoveToTheAgentsAccount: a machine that
// joined before agents had a NATS account of their own holds credentials
// of the FM account (no agents' tag), no longer valid; the agent renews
// them at the join endpoint before it first connects, and keeps the
// renewed ones. Refused, it keeps asking (as for expired credentials).
func TestCredentialsOfTheFMAccountMoveToTheAgentsAccount(t *testing.T) {
	auth, err := natsauth.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	kp, _ := nkeys.CreateUser()
	pub, _ := kp.PublicKey()
	seed, _ := kp.Seed()
	legacy := jwt.NewUserClaims(pub)
	tok, _ := legacy.Encode(must(nkeys.CreateAccount()))
	old, _ := jwt.FormatUserConfig(tok, seed)
	for _, c := range []struct {
		name   string
		refuse bool
		moved  bool
	}{{"renewed", false, true}, {"refused", true, false}} {
		t.Run(c.name, func(t *testing.T) {
			asked := 0
			ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				asked++
				var req protocol.RenewRequest
				if r.URL.Path != "/api/join/renew" || json.NewDecoder(r.Body).Decode(&req) != nil || req.PublicKey != pub {
					http.Error(w, "bad request", 400)
					return
				}
				if c.refuse {
					http.Error(w, `{"detailedMessage":"not the current machine"}`, http.StatusUnauthorized)
					return
				}
				fresh, _ := auth.AgentJWT("in-m", pub, time.Now().Add(time.Hour))
				_ = json.NewEncoder(w).Encode(protocol.RenewResponse{JWT: fresh})
			}))
			t.Cleanup(ts.Close)
			cfg := Config{Instance: "in-m", RootDir: t.TempDir(), Join: &protocol.JoinSpec{URL: ts.URL + "/api/join"}}
			a := &Agent{cfg: cfg, creds: old, m: newMachine(cfg, zerolog.Nop()), log: zerolog.Nop()}
			if err := os.MkdirAll(filepath.Dir(a.m.identityPath()), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(a.m.identityPath(), []byte(`{"credentials":"old"}`), 0o600); err != nil {
				t.Fatal(err)
			}
			timeout := 30 * time.Second
			if c.refuse {
				timeout = 2500 * time.Millisecond
			}
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			err := a.renewExpired(ctx, nil)
			if c.refuse {
				if !errors.Is(err, context.DeadlineExceeded) || asked < 2 {
					t.Fatalf("a refused move: %v after %d requests, want it asked until the context ended", err, asked)
				}
				asked = 1
			} else if err != nil {
				t.Fatal(err)
			}
			if asked != 1 || inAgentsAccount(a.currentCreds()) != c.moved {
				t.Fatalf("asked %d times; in the agents' account: %v", asked, inAgentsAccount(a.currentCreds()))
			}
			b, _ := os.ReadFile(a.m.identityPath())
			if kept := strings.Contains(string(b), "old"); kept == c.moved {
				t.Fatalf("the identity file after the move: %s", b)
			}
			// Once moved, nothing more to do.
			if c.moved {
				if err := a.renewExpired(context.Background(), nil); err != nil || asked != 1 {
					t.Fatalf("moved credentials renewed again: %v, asked %d times", err, asked)
				}
			}
		})
	}
}

func must(kp nkeys.KeyPair, err error) nkeys.KeyPair {
	if err != nil {
		panic(err)
	}
	return kp
}

// TestARefusedAgentSpreadsItsRenewals: an agent whose credentials NATS
// refused waits a random part of a hundredth of their life (30 s at most)
// before it renews them, and twice as long each time renewing did not
// bring it back on the bus, up to 10 minutes.
func TestARefusedAgentSpreadsItsRenewals(t *testing.T) {
	now := time.Now()
	for _, c := range []struct {
		name   string
		life   time.Duration
		nth    int
		window time.Duration
	}{
		{"a day, first", 24 * time.Hour, 1, 30 * time.Second},
		{"ten minutes, first", 10 * time.Minute, 1, 6 * time.Second},
		{"ten minutes, third", 10 * time.Minute, 3, 24 * time.Second},
		{"a day, tenth", 24 * time.Hour, 10, 10 * time.Minute},
		{"no life left", 0, 1, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			var longest time.Duration
			for range 2000 {
				d := refusedRenewSpread(now, now.Add(c.life), c.nth)
				if d < 0 || d > c.window || (c.window > 0 && d == c.window) {
					t.Fatalf("waits %s, outside [0, %s)", d, c.window)
				}
				longest = max(longest, d)
			}
			if longest < c.window*3/4 {
				t.Fatalf("the longest of 2,000 waits is %s: not spread over %s", longest, c.window)
			}
		})
	}
}
