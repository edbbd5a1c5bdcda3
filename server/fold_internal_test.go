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
	"github.com/nats-io/jwt/v2"
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

// TestTwentyThousandRevocationsInADay: 20,000 machines replaced within
// one credentials lifetime (two fleet-wide upgrades of 10,000), none of
// whose revocations may be pruned yet. The list never names more than
// maxListedRevocations users, so the account JWT stays far under NATS's
// 1 MB; every user revoked, before a fold or after the last, is refused;
// a user issued after the last fold is not.
func TestTwentyThousandRevocationsInADay(t *testing.T) {
	auth, err := natsauth.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	doc := settingsDoc{}
	var users []string
	folds, longest, largest := 0, 0, 0
	for i := 0; i < 20000; i++ {
		kp, _ := nkeys.CreateUser()
		pub, _ := kp.PublicKey()
		users = append(users, pub)
		if doc.Expiring == nil {
			doc.Expiring = map[string]int64{}
		}
		// As revokeUser does, 4 s apart: all 20,000 within 22 hours.
		at := now.Add(time.Duration(i) * 4 * time.Second)
		doc.Expiring[pub] = at.Add(24 * time.Hour).Unix()
		pruneRevocations(&doc, at)
		if foldRevocations(&doc, at, 24*time.Hour) > 0 {
			folds++
			// Its JWT was recorded a moment ago: one minted late, after
			// the cutoff, is refused too.
			if _, ok := doc.Expiring[pub]; !ok {
				t.Fatal("the user whose revocation folded the list is not listed")
			}
		}
		longest = max(longest, len(doc.Expiring))
		if len(doc.Expiring) == maxListedRevocations {
			acc, err := auth.AgentsAccountJWT(doc.revoked())
			if err != nil {
				t.Fatal(err)
			}
			largest = max(largest, len(acc))
		}
	}
	if folds < 20000/(maxListedRevocations+1) || longest > maxListedRevocations {
		t.Fatalf("%d folds, up to %d users listed", folds, longest)
	}
	if largest == 0 || largest > 1<<19 {
		t.Fatalf("the largest account JWT is %d bytes (want under 512 KiB)", largest)
	}
	acc, err := auth.AgentsAccountJWT(doc.revoked())
	if err != nil {
		t.Fatal(err)
	}
	claims, err := jwt.DecodeAccountClaims(acc)
	if err != nil {
		t.Fatal(err)
	}
	issued := func(pub string, at int64) *jwt.UserClaims {
		uc := jwt.NewUserClaims(pub)
		uc.IssuedAt = at
		return uc
	}
	// Each user's last JWT was issued before its machine was replaced.
	for i, pub := range users {
		at := now.Add(time.Duration(i) * 4 * time.Second).Unix()
		if !claims.IsClaimRevoked(issued(pub, at)) {
			t.Fatalf("user %d of 20,000 is not revoked", i)
		}
	}
	if fresh := issued(users[0], doc.RevokedBefore+1); claims.IsClaimRevoked(fresh) {
		t.Fatal("a JWT issued after the last fold is revoked")
	}

	t.Logf("%d folds; the largest account JWT %d bytes, the last %d", folds, largest, len(acc))
}

// TestAFoldKeepsTheLatestRecentUsers: a fold keeps listed the users whose
// JWT was recorded within recentMint, the latest maxRecentKept of them when
// a burst made more.
func TestAFoldKeepsTheLatestRecentUsers(t *testing.T) {
	now := time.Now()
	ttl := time.Hour
	for _, recent := range []int{10, maxRecentKept + 500} {
		t.Run(fmt.Sprint(recent, " recent"), func(t *testing.T) {
			doc := settingsDoc{Expiring: map[string]int64{}}
			for i := range maxListedRevocations + 1 - recent {
				doc.Expiring[fmt.Sprintf("old-%d", i)] = now.Add(ttl - time.Hour).Unix()
			}
			for i := range recent { // recorded i/10 s ago, within recentMint
				doc.Expiring[fmt.Sprintf("recent-%04d", i)] = now.Add(ttl - time.Duration(i)*100*time.Millisecond).Unix()
			}
			if n := foldRevocations(&doc, now, ttl); n != maxListedRevocations+1 {
				t.Fatalf("fold of %d listed says %d", maxListedRevocations+1, n)
			}
			want := min(recent, maxRecentKept)
			if len(doc.Expiring) != want {
				t.Fatalf("%d users kept, want %d", len(doc.Expiring), want)
			}
			oldest := now.Add(ttl - time.Duration(want)*100*time.Millisecond).Unix()
			for u, until := range doc.Expiring {
				if !strings.HasPrefix(u, "recent-") || until < oldest {
					t.Fatalf("kept %s (expiring %d), not one of the %d latest", u, until, want)
				}
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
