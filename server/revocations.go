package server

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/fleetmanager/fm/internal/natsauth"
	"github.com/fleetmanager/fm/protocol"
)

// An agent's NATS user is revoked when its machine goes (a reprovision's new
// machine joins, or the instance is deprovisioned or deleted). It is first
// retired in fm_secrets, in one revision-checked write that also takes it
// off AgentUser: from then on no renewal of its key goes through, and the
// retired record holds the expiry of the last JWT minted for it. Then it
// is added to the revocation list (fm_settings) and the account is pushed;
// then the retired record is cleared. A server that dies between these
// steps leaves the retired user on record, revoked by the next step that
// runs for the instance.
//
// A user minted with an expiry is revoked as of that expiry: NATS refuses
// every JWT of it issued before then, which is every JWT FM made for it
// (a renewal that raced the retirement either wrote its expiry first, and
// the retirement took it, or was refused). Its entry is dropped from the
// list once that time (and a margin for NATS servers' clocks) has passed:
// its JWTs have all expired. So the list holds one credentials lifetime
// of revocations, not every machine ever replaced.
//
// More than maxListedRevocations within one lifetime (two fleet-wide
// upgrades of 10,000 machines in a day would make 20,000) would not fit
// NATS's 1 MB message nor the bucket's 1 MiB value, so the list is folded
// into one revocation of every agent user issued until a moment from now
// (NATS's "*"): each user it named was retired, hence had its last JWT
// minted, before the fold. Users whose last JWT was recorded within
// recentMint stay listed too, in case its mint came late. The agents of the
// machines still current are cut off too; each renews over HTTP (the agent
// does so when NATS refuses its credentials) and gets a JWT issued after
// the cutoff: a server answers "try again" rather than mint one issued
// until then, and checks the list again after minting (mintAfterRevokeAll).

// maxListedRevocations is how many users the list names before it is
// folded: 4,000 make an account JWT of about 390 KB and a value of about
// 300 KB.
const maxListedRevocations = 4000

// revokeAllMargin is how far past this server's clock a fold's cutoff is
// set: a JWT minted by a server whose clock runs ahead, for a user the fold
// drops, is still issued before it.
const revokeAllMargin = 10 * time.Second

// recentMint is how long after a JWT's expiry was recorded its user stays
// listed through a fold: the mint follows the record at once, but a JWT
// minted after the cutoff would escape "*".
const recentMint = 2 * time.Minute

// revocationsKey is where fm_settings keeps the revoked NATS users.
const revocationsKey = "system.nats-revocations"

// revocationSkew is how long after its JWTs' expiry a revocation is kept:
// NATS servers' clocks may be behind FM's.
const revocationSkew = 10 * time.Minute

// retiredUser is an agent's NATS user whose revocation is under way.
type retiredUser struct {
	User string `json:"user"`
	// Until is when the last JWT minted for it expires (zero: minted by an
	// FM whose credentials never expired).
	Until time.Time `json:"until,omitzero"`
}

// retire moves the instance's current agent user, if any, to Retired,
// and says whether there was one.
func (sec *instanceSecrets) retire() bool {
	if sec.AgentUser == "" {
		return false
	}
	if !slices.ContainsFunc(sec.Retired, func(r retiredUser) bool { return r.User == sec.AgentUser }) {
		sec.Retired = append(sec.Retired, retiredUser{User: sec.AgentUser, Until: sec.AgentUserExpires})
	}
	sec.AgentUser, sec.AgentUserExpires = "", time.Time{}
	return true
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// revoked is every user the agents' account must refuse, as of its last
// JWT's expiry.
func (d settingsDoc) revoked() map[string]int64 {
	all := make(map[string]int64, len(d.Expiring)+1)
	for u, until := range d.Expiring {
		all[u] = until
	}
	if d.RevokedBefore != 0 {
		all[natsauth.AllUsers] = d.RevokedBefore
	}
	return all
}

// changeSecrets applies change to the instance's fm_secrets record, with
// a revision check (retried on a conflict), and returns the record; a
// change that returns false writes nothing.
func (s *Server) changeSecrets(ctx context.Context, instance string, change func(*instanceSecrets) bool) (instanceSecrets, error) {
	for attempt := 0; ; attempt++ {
		sec, rev, err := s.st.secrets.fetch(ctx, instance)
		if err != nil && !errors.Is(err, errNotFound) {
			return sec, err
		}
		if !change(&sec) {
			return sec, nil
		}
		if rev == 0 {
			_, err = s.st.secrets.create(ctx, instance, sec)
		} else {
			_, err = s.st.secrets.update(ctx, instance, sec, rev)
		}
		if err == nil || !errors.Is(err, errConflict) && !errors.Is(err, errExists) || attempt >= 5 {
			return sec, err
		}
	}
}

// revokeAgent revokes the NATS user of an instance's machine (it was
// deprovisioned or deleted) and the join tokens it did not use.
func (s *Server) revokeAgent(ctx context.Context, instance string) error {
	if s.cfg.Authority == nil {
		return nil
	}
	// Every token of the instance goes, used ones too: the machine that
	// used one must not exchange it again.
	s.withdrawTokens(ctx, instance, func(string, joinRecord) bool { return true })
	sec, err := s.changeSecrets(ctx, instance, (*instanceSecrets).retire)
	if err != nil {
		return fmt.Errorf("retire the agent's credentials: %w", err)
	}
	return s.revokeRetired(ctx, instance, sec)
}

// revokeRetired revokes the retired agent users of sec, the instance's
// record as last read or written, and clears them from the record.
func (s *Server) revokeRetired(ctx context.Context, instance string, sec instanceSecrets) error {
	for _, r := range sec.Retired {
		if err := s.revokeUser(ctx, instance, r.User, r.Until); err != nil {
			return err
		}
	}
	if len(sec.Retired) == 0 {
		return nil
	}
	s.crash.At("server/revoke/revoked")
	done := sec.Retired
	_, err := s.changeSecrets(ctx, instance, func(sec *instanceSecrets) bool {
		n := len(sec.Retired)
		sec.Retired = slices.DeleteFunc(sec.Retired, func(r retiredUser) bool { return slices.Contains(done, r) })
		return len(sec.Retired) != n
	})
	return err
}

// revokeUser adds a user, whose last JWT expires at until (zero: never),
// to the revocation list kept in fm_settings, and pushes the account with
// the whole list (so that replicas never drop each other's revocations).
// Entries whose JWTs have all expired are dropped as the list is written.
func (s *Server) revokeUser(ctx context.Context, instance, user string, until time.Time) error {
	if until.IsZero() {
		// Minted without an expiry: by an FM from before agents had a
		// NATS account of their own, a user of the FM account signed with
		// a key it no longer names (natsauth). Nothing to revoke.
		s.log.Info().Str("instance", instance).Str("user", user).Msg("agent credentials of before the agents' account: no longer valid, nothing to revoke")
		return nil
	}
	// One revocation at a time on this server: instances are reconciled
	// several at once, and a push of the list one wrote may otherwise
	// land after the push of a longer list another wrote, which the
	// resolver keeps (same issue time) with a revocation lost.
	s.revokeMu.Lock()
	defer s.revokeMu.Unlock()
	var list map[string]int64
	added := false
	for attempt := 0; attempt < 10; attempt++ {
		doc, rev, err := s.st.settings.fetch(ctx, revocationsKey)
		if err != nil && !errors.Is(err, errNotFound) {
			return fmt.Errorf("revocations unreadable: %w", err)
		}
		if at, ok := doc.Expiring[user]; ok && at >= until.Unix() {
			list = doc.revoked()
			break // recorded before (a push may have failed then: pushed again below)
		}
		if doc.Expiring == nil {
			doc.Expiring = map[string]int64{}
		}
		doc.Expiring[user] = until.Unix()
		pruneRevocations(&doc, time.Now())
		folded := foldRevocations(&doc, time.Now(), s.agentCredsTTL())
		if rev == 0 {
			_, err = s.st.settings.create(ctx, revocationsKey, doc)
		} else {
			_, err = s.st.settings.update(ctx, revocationsKey, doc, rev)
		}
		if err == nil {
			list, added = doc.revoked(), true
			if folded > 0 {
				s.log.Warn().Time("issued_until", time.Unix(doc.RevokedBefore, 0)).Int("listed", folded).Int("kept", len(doc.Expiring)).
					Msg("revocations folded into one of every agent user issued until now: agents renew their credentials over HTTP")
			}
			break
		}
		if !errors.Is(err, errConflict) && !errors.Is(err, errExists) {
			return fmt.Errorf("revocation not recorded: %w", err)
		}
	}
	if list == nil {
		return fmt.Errorf("revocation not recorded: %w", errConflict)
	}
	if s.cfg.SystemConn == nil {
		// Nothing to push with (NATS is not FM's own): in force once the
		// account is pushed, at a start of a server that can.
		s.log.Warn().Str("instance", instance).Msg("revocation recorded; no system account connection to push it to NATS")
	} else if err := s.pushRevocations(ctx, list); err != nil {
		return fmt.Errorf("revocation recorded but not pushed to NATS: %w", err)
	}
	if added {
		s.recordByFM(ctx, "credentials.revoked", "credentials", instance, nil)
		s.log.Info().Str("instance", instance).Str("user", user).Msg("agent credentials revoked")
	}
	return nil
}

// foldRevocations replaces a list longer than maxListedRevocations by one
// revocation of every agent user issued until now (and revokeAllMargin),
// keeping listed the users whose last JWT was recorded within recentMint
// (their JWT's expiry is after now+ttl-recentMint), the latest
// maxRecentKept of them. It returns how many users were listed before a
// fold (0: no fold).
func foldRevocations(doc *settingsDoc, now time.Time, ttl time.Duration) int {
	n := len(doc.Expiring)
	if n <= maxListedRevocations {
		return 0
	}
	doc.RevokedBefore = max(doc.RevokedBefore, now.Add(revokeAllMargin).Unix())
	recent := now.Add(ttl - recentMint).Unix()
	maps.DeleteFunc(doc.Expiring, func(_ string, until int64) bool { return until <= recent })
	if len(doc.Expiring) > maxRecentKept {
		users := slices.SortedFunc(maps.Keys(doc.Expiring), func(a, b string) int {
			return cmp.Or(cmp.Compare(doc.Expiring[b], doc.Expiring[a]), strings.Compare(a, b))
		})
		for _, u := range users[maxRecentKept:] {
			delete(doc.Expiring, u)
		}
	}
	return n
}

// maxRecentKept is how many recent users a fold keeps listed, at most.
const maxRecentKept = maxListedRevocations / 4

// mintAfterRevokeAll mints a JWT with mint unless one minted now could be
// issued until the last fold's cutoff (NATS compares whole seconds), which
// NATS would refuse at once: then, or when a fold came meanwhile, the
// caller is told to try again. The list is read from the bucket, not the
// copy: a fold by another replica a moment ago counts.
func (s *Server) mintAfterRevokeAll(ctx context.Context, mint func() (string, error)) (string, error) {
	cutoff := func() (int64, error) {
		doc, _, err := s.st.settings.fetch(ctx, revocationsKey)
		if err != nil && !errors.Is(err, errNotFound) {
			return 0, protocol.Errorf(protocol.CodeUnavailable, "the revocations could not be read: %v", err)
		}
		return doc.RevokedBefore, nil
	}
	issued := time.Now().Unix()
	before, err := cutoff()
	if err != nil {
		return "", err
	}
	if before >= issued {
		return "", beforeCutoff(before, issued)
	}
	tok, err := mint()
	if err != nil {
		return "", err
	}
	if before, err = cutoff(); err != nil {
		return "", err
	} else if before >= issued {
		return "", protocol.Errorf(protocol.CodeUnavailable, "every agent was revoked as the credentials were made: try again in %d s", before-issued+1)
	}
	return tok, nil
}

// beforeCutoff is the answer to a join or renewal made (at now, unix)
// before a fold's cutoff.
func beforeCutoff(cutoff, now int64) error {
	return protocol.Errorf(protocol.CodeUnavailable, "credentials are made again in %d s, after a revocation of every agent: try again then", cutoff-now+1)
}

// pruneRevocations drops the revocations of users whose every JWT has
// expired.
func pruneRevocations(doc *settingsDoc, now time.Time) {
	for user, until := range doc.Expiring {
		if time.Unix(until, 0).Add(revocationSkew).Before(now) {
			delete(doc.Expiring, user)
		}
	}
}

// pushRevocations pushes the agents' account with list through the system
// connection (which the caller checked there is).
func (s *Server) pushRevocations(ctx context.Context, list map[string]int64) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return s.cfg.Authority.PushRevocations(ctx, s.cfg.SystemConn, list)
}

// syncAccount pushes every account, the agents' with the recorded
// revocations, once the server starts, retrying until it is through: the
// accounts as this version declares them are in force, and so is a
// revocation whose push failed.
func (s *Server) syncAccount(ctx context.Context) {
	if s.cfg.Authority == nil || s.cfg.SystemConn == nil {
		return
	}
	for {
		doc, _, _ := s.st.settings.get(revocationsKey)
		pushCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := s.cfg.Authority.Push(pushCtx, s.cfg.SystemConn, doc.revoked())
		cancel()
		if err == nil {
			return
		}
		s.log.Warn().Err(err).Msg("the NATS account is not pushed yet; retrying")
		select {
		case <-ctx.Done():
			return
		case <-time.After(10 * time.Second):
		}
	}
}
