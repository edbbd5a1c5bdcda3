package agent

import (
	"encoding/base64"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/natsauth"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nkeys"
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
