package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/natsauth"
	"github.com/nats-io/nkeys"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// TestWhatIsFoldedAgain: an event whose folding met the bus away, slow or
// busy, or lost a race, is folded again; one that would fail the same way
// is not, so that it does not hold a place every instance shares.
func TestWhatIsFoldedAgain(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{nats.ErrTimeout, true},
		{fmt.Errorf("update op: %w", nats.ErrNoResponders), true},
		{jetstream.ErrNoStreamResponse, true},
		{context.DeadlineExceeded, true},
		{fmt.Errorf("change op: %w", errConflict), true},
		{&jetstream.APIError{Code: 503, ErrorCode: 10008, Description: "JetStream system temporarily unavailable"}, true},
		{&jetstream.APIError{Code: 500, ErrorCode: 10009, Description: "JetStream cluster can not handle request"}, true},
		{fmt.Errorf("put: %w", nats.ErrConnectionDraining), true},
		{&jetstream.APIError{Code: 400, ErrorCode: 10054, Description: "maximum payload exceeded"}, false},
		{jetstream.ErrInvalidKey, false},
		{errors.New("the result does not decode"), false},
	} {
		t.Run(fmt.Sprint(c.err), func(t *testing.T) {
			if got := foldAgain(c.err); got != c.want {
				t.Fatalf("foldAgain(%v) = %v, want %v", c.err, got, c.want)
			}
		})
	}
}

// TestPruningTwentyThousandRevocations: revocations of users whose JWTs
// all expired go, and those minted without an expiry (users of the FM
// account from before agents had their own, no longer valid); those still
// valid stay. 20,000 revocations (two fleet-wide upgrades of 10,000 machines)
// made an account JWT of 1.9 MB, over NATS's 1 MB default.
func TestPruningTwentyThousandRevocations(t *testing.T) {
	now := time.Now()
	doc := settingsDoc{Expiring: map[string]int64{}}
	user := func() string {
		kp, _ := nkeys.CreateUser()
		pub, _ := kp.PublicKey()
		return pub
	}
	for i := 0; i < 20000; i++ {
		doc.Expiring[user()] = now.Add(-24 * time.Hour).Unix()
	}
	live := user()
	doc.Expiring[live] = now.Add(time.Hour).Unix()
	// Expired a moment ago: a NATS server whose clock is behind may still
	// take it.
	recent := user()
	doc.Expiring[recent] = now.Add(-time.Minute).Unix()
	// A user minted without an expiry, as an FM from before agents had an
	// account of their own kept it: no longer read.
	old := user()
	raw, _ := json.Marshal(map[string]any{"revocations": map[string]int64{old: now.Add(-1000 * time.Hour).Unix()}, "expiring": doc.Expiring})
	doc = settingsDoc{}
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	auth, err := natsauth.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	before, _ := auth.AgentsAccountJWT(doc.revoked())
	pruneRevocations(&doc, now)
	after, err := auth.AgentsAccountJWT(doc.revoked())
	if err != nil {
		t.Fatal(err)
	}
	revoked := doc.revoked()
	for _, pub := range []string{live, recent} {
		if _, ok := revoked[pub]; !ok {
			t.Errorf("revocation %s dropped", pub)
		}
	}
	if _, ok := revoked[old]; ok {
		t.Error("a revocation of a user minted without an expiry was kept")
	}
	if stored, _ := json.Marshal(doc); strings.Contains(string(stored), old) {
		t.Error("a revocation of a user minted without an expiry is written again")
	}
	if revoked[live] != now.Add(time.Hour).Unix() {
		t.Errorf("a user with an expiry is revoked as of %d, not its last JWT's expiry", revoked[live])
	}
	if len(revoked) != 2 || len(doc.Expiring) != 2 {
		t.Fatalf("%d revocations (%d with an expiry) kept, want 2", len(revoked), len(doc.Expiring))
	}
	if len(before) < 1<<20 || len(after) > 16<<10 {
		t.Fatalf("account JWT %d bytes before pruning, %d after", len(before), len(after))
	}
}
