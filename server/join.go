package server

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nkeys"
)

// JoinPath is the join endpoint: outside the tenant's API, and without an
// API key (the join token is the machine's credential).
const JoinPath = "/api/join"

// joinRecord is a join token as fm_joins keeps it (the bucket expires it):
// only a hash of its secret, the instance key of the machine it is for
// (sealed with FM's key), and, once used, the NATS key of the machine that
// used it.
type joinRecord struct {
	Instance string    `json:"instance"`
	Hash     string    `json:"hash"`
	Expires  time.Time `json:"expires"`
	// Request is the provision request that made the token, for the machine
	// it makes.
	Request string `json:"request,omitempty"`
	// Key is that machine's instance key, sealed: it becomes the
	// instance's only once the machine joins, so that a reprovision that
	// never gets that far leaves the running machine's key as it was.
	Key string `json:"key,omitempty"`
	// Agent is the NATS user key of the machine that exchanged the token;
	// the same machine may exchange it again, no other may.
	Agent string `json:"agent,omitempty"`
	// Used marks a token exchanged before tokens were bound to the key of
	// the machine exchanging them (an FM from before): such a token is
	// spent for good.
	Used bool `json:"used,omitempty"`
}

// used reports whether the token was exchanged.
func (r joinRecord) used() bool { return r.Used || r.Agent != "" }

// newJoinToken makes a single-use token for the machine a provision
// request makes, "<id>.<secret>", with a new instance key for it, and
// returns the token and the key's box (which seals what FM tells that
// machine before it joins, its license). The key becomes the instance's
// when the machine joins.
func (s *Server) newJoinToken(ctx context.Context, instance, request string) (string, *seal.Box, error) {
	id, secret := protocol.NewID("jt"), randomToken(40)
	sum := sha256.Sum256([]byte(secret))
	key := base64.StdEncoding.EncodeToString(seal.NewKey())
	rec := joinRecord{Instance: instance, Hash: hex.EncodeToString(sum[:]), Request: request, Key: s.box.Seal(key, joinKeyPlace(id)),
		Expires: time.Now().Add(s.cfg.Topology.JoinTokenTTL).UTC()}
	if _, err := s.st.joins.create(ctx, id, rec); err != nil {
		return "", nil, err
	}
	return id + "." + secret, boxOf(key), nil
}

// joinRefused is the answer to a refused join; the reason goes to the log
// and the audit trail, not to the caller.
func joinRefused() error {
	return newAPIError(protocol.CodeUnauthenticated, "Join refused",
		"the join token is not valid for this instance: unknown, already used, expired or issued to another instance")
}

// join serves POST /api/join: a new machine's agent exchanges its join token
// for its NATS credentials and instance key. A used, expired or foreign
// token is refused (and logged and audited).
func (s *Server) join(r *http.Request) (any, error) {
	if s.cfg.Authority == nil {
		return nil, newAPIError(protocol.CodeUnimplemented, "Not supported", "this Fleet Manager runs without NATS credentials; agents need no join")
	}
	attempt, err := s.joinAttempt(r)
	if err != nil {
		return nil, err
	}
	refused := false
	defer func() { attempt.settle(refused) }()
	var req protocol.JoinRequest
	if err := readJSON(r, &req); err != nil {
		return nil, err
	}
	ctx := r.Context()
	refuse := func(reason string) error {
		refused = true
		s.log.Warn().Str("instance", safeToken(req.Instance)).Str("remote", r.RemoteAddr).Str("reason", reason).Msg("join refused")
		s.record(ctx, protocol.AuditRecord{Who: "instance:" + safeToken(req.Instance), From: clientAddr(r), Action: "join.refused",
			Object: "credentials", ObjectID: safeToken(req.Instance), Outcome: "refused", Status: http.StatusUnauthorized,
			Error: &protocol.Error{Code: protocol.CodeUnauthenticated, Message: reason}})
		return joinRefused()
	}
	id, secret, ok := strings.Cut(req.Token, ".")
	if !ok || !protocol.ValidToken(id) || !protocol.ValidToken(req.Instance) {
		return nil, refuse("malformed token or instance")
	}
	for attempt := 0; attempt < 5; attempt++ {
		rec, rev, err := s.st.joins.fetch(ctx, id)
		if errors.Is(err, errNotFound) {
			return nil, refuse("unknown or expired token")
		}
		if err != nil {
			return nil, unavailable(err, "the join token could not be read")
		}
		sum := sha256.Sum256([]byte(secret))
		switch {
		case subtle.ConstantTimeCompare([]byte(hex.EncodeToString(sum[:])), []byte(rec.Hash)) != 1:
			return nil, refuse("wrong token secret")
		case rec.used() && rec.Agent != req.PublicKey:
			return nil, refuse("token already used by another machine")
		case time.Now().After(rec.Expires):
			return nil, refuse("token expired")
		case rec.Instance != req.Instance:
			return nil, refuse("token issued to instance " + rec.Instance)
		case !s.tokenCurrent(ctx, rec):
			return nil, refuse("token of a machine that was replaced or taken down")
		case req.PublicKey == "" || req.Signature == "" && !rec.used():
			// An agent from before machines made and signed with keys of
			// their own (a token already used, asked for unsigned, is
			// refused below like any forgery).
			return nil, newAPIError(protocol.CodeFailedPrecondition, "Agent too old",
				"this agent does not sign its join with a NATS key of its own; run the fm agent this Fleet Manager serves (%s)", DownloadPath)
		case !nkeys.IsValidPublicUserKey(req.PublicKey):
			return nil, invalid("publicKey: not a NATS user public key")
		case !holdsKey(req):
			// The token and the public key may both be known to others
			// (the key is no secret); only the machine can sign.
			return nil, refuse("no proof of holding the key")
		}
		again := rec.Agent == req.PublicKey
		if !again {
			// Checked before the token is bound: someone who read the token
			// (the EC2 API shows a machine's user data) must not bind it to
			// a key of theirs and lock the machine out.
			reason, err := s.ec2IdentityRefusal(ctx, rec, req.EC2Identity)
			switch {
			case errors.Is(err, errMachineNotRecorded):
				return nil, unavailable(err, "the machine this join token was made for is not recorded yet; ask again")
			case errors.Is(err, errNoIdentity):
				refused = true
				s.log.Warn().Str("instance", safeToken(req.Instance)).Str("remote", r.RemoteAddr).Msg("a join without the EC2 instance identity document; the agent asks again")
				return nil, unavailable(err, "this Fleet Manager joins an EC2 machine with its instance identity document, which the join lacks; ask again once the machine's metadata service answers")
			case err != nil:
				return nil, unavailable(err, "the machine this join token was made for could not be read")
			case reason != "":
				return nil, refuse(reason)
			}
			// Bound to this machine's key before anything is minted: a
			// failure after this, or an answer lost, is retried by the same
			// machine with the same key.
			rec.Agent = req.PublicKey
			if _, err := s.st.joins.update(ctx, id, rec, rev); errors.Is(err, errConflict) {
				continue // raced with another use: look again
			} else if err != nil {
				return nil, unavailable(err, "the join token could not be used")
			}
			s.crash.At("server/join/token-bound")
		}
		resp, err := s.mintAgent(ctx, id, rec, req.PublicKey)
		if err != nil {
			return nil, err
		}
		s.record(ctx, protocol.AuditRecord{Who: "instance:" + req.Instance, From: clientAddr(r), Action: "credentials.exchanged",
			Object: "credentials", ObjectID: req.Instance, Outcome: "ok", Status: http.StatusOK})
		s.log.Info().Str("instance", req.Instance).Str("token", id).Bool("again", again).Msg("agent joined")
		return resp, nil
	}
	return nil, conflict("the join token is being used; retry")
}

// joinAttempt reserves a join's (or a renewal's) place in the limit of
// refused ones by address, counted apart from the API's failures
// (attemptLimiter): agents behind one NAT share an address with whoever
// mistyped an API key there.
func (s *Server) joinAttempt(r *http.Request) (*reservation, error) {
	addr := clientAddr(r)
	attempt, err := s.joinByAddr.reserve(r.Context(), addr)
	if err != nil {
		return nil, limited(err, "too many refused joins from %s", addr)
	}
	return attempt, nil
}

// holdsKey reports whether a join request is signed by the seed of the
// public key it names.
func holdsKey(req protocol.JoinRequest) bool {
	return signedBy(req.PublicKey, req.Signature, protocol.JoinProof(req.Instance, req.Token))
}

// tokenCurrent reports whether a token is for the instance's machine of
// now: the one its latest reprovision makes (a token of an earlier one, or
// of an instance taken down since, is not).
func (s *Server) tokenCurrent(ctx context.Context, rec joinRecord) bool {
	lc, _, err := s.st.lifecycle.fetch(ctx, rec.Instance)
	if err != nil {
		return false
	}
	if oneOfStr(lc.State, stateCreated, stateDeprovisioning, stateDeprovisioned, stateDeleting) {
		return false
	}
	return rec.Request == "" || lc.Machine == rec.Request
}

// joinKeyPlace is where a join record's sealed instance key belongs.
func joinKeyPlace(tokenID string) string { return protocol.BucketJoins + "/" + tokenID + "/key" }

// safeToken keeps a caller-given id fit for a log or audit field.
func safeToken(v string) string {
	if protocol.ValidToken(v) {
		return v
	}
	return "(invalid)"
}

// mintAgent gives the instance's new machine its NATS user (a JWT for the
// key it made) and makes the machine's key the instance's (sealedKey, from
// its join record token). The machine before is retired in the same write
// (no renewal of its key goes through after it), then revoked: a server
// that dies between the two leaves the retired user on record, revoked
// when the machine asks again (or by any revocation of the instance). The
// instance's other tokens are withdrawn: a machine replaced cannot join
// again with its old one; tokens made after this one (a newer
// reprovision's) stay. Done again for the same machine, it gives the same
// rights and revokes nothing more. The JWT is made last, once its expiry is
// on record and the machine before is revoked: a revocation that folds the
// list (revocations.go) then comes before it, not after.
func (s *Server) mintAgent(ctx context.Context, token string, rec joinRecord, pub string) (protocol.JoinResponse, error) {
	instance, sealedKey := rec.Instance, rec.Key
	expires := s.agentCredsExpiry()
	var err error
	key := ""
	if sealedKey != "" {
		if key, err = s.box.Open(sealedKey, joinKeyPlace(token)); err != nil {
			return protocol.JoinResponse{}, internal(err, "the machine's instance key could not be opened")
		}
	}
	sec, err := s.changeSecrets(ctx, instance, func(sec *instanceSecrets) bool {
		if sec.AgentUser != pub {
			sec.retire()
			sec.AgentUser = pub
		}
		sec.AgentUserExpires = later(sec.AgentUserExpires, expires)
		if key != "" {
			sec.InstanceKey = key
		}
		return true
	})
	if err != nil {
		return protocol.JoinResponse{}, unavailable(err, "the agent's credentials could not be recorded")
	}
	s.crash.At("server/join/credentials-recorded")
	if err := s.revokeRetired(ctx, instance, sec); err != nil {
		return protocol.JoinResponse{}, unavailable(err, "the previous machine's credentials could not be revoked")
	}
	s.crash.At("server/join/previous-revoked")
	tok, err := s.mintAfterRevokeAll(ctx, func() (string, error) {
		tok, err := s.cfg.Authority.AgentJWT(instance, pub, expires)
		if err != nil {
			return "", internal(err, "the agent's credentials could not be made")
		}
		return tok, nil
	})
	if err != nil {
		return protocol.JoinResponse{}, err
	}
	s.recordByFM(ctx, "credentials.minted", "credentials", instance, nil)
	s.withdrawTokens(ctx, instance, func(id string, r joinRecord) bool {
		// Every token has the same lifetime: one that expires later was
		// made later.
		return id != token && !r.Expires.After(rec.Expires)
	})
	return protocol.JoinResponse{JWT: tok, InstanceKey: sec.InstanceKey}, nil
}

// withdrawTokens deletes the join tokens of the instance that match; one
// left behind expires within the hour anyway.
func (s *Server) withdrawTokens(ctx context.Context, instance string, match func(id string, rec joinRecord) bool) {
	if s.cfg.Authority == nil {
		return
	}
	for _, row := range s.st.joins.rowsOf(instance) {
		if match(row.key, row.val) {
			if err := s.st.joins.remove(ctx, row.key, row.rev); err != nil && !errors.Is(err, errConflict) && !errors.Is(err, errNotFound) {
				s.log.Warn().Err(err).Str("instance", row.val.Instance).Msg("a join token was not withdrawn; it expires on its own")
			}
		}
	}
}

// withdrawJoinTokens deletes the unused join tokens made for an instance's
// provision request (its machine will not be made).
func (s *Server) withdrawJoinTokens(ctx context.Context, instance, request string) {
	if request == "" {
		return
	}
	s.withdrawTokens(ctx, instance, func(_ string, r joinRecord) bool { return r.Request == request && !r.used() })
}

// instanceBox is the box of an instance's key, nil when it has none (FM runs
// without join).
func (s *Server) instanceBox(instance string) *seal.Box {
	sec, _, _ := s.st.secrets.get(instance)
	return boxOf(sec.InstanceKey)
}

func boxOf(key string) *seal.Box {
	if key == "" {
		return nil
	}
	raw, err := base64.StdEncoding.DecodeString(key)
	if err != nil {
		return nil
	}
	b, err := seal.New(raw)
	if err != nil {
		return nil
	}
	return b
}

// maxMonitorHours caps the life of monitoring credentials: users of the
// system account, which FM cannot revoke.
const maxMonitorHours = 30 * 24

// natsCredentials serves POST /nats-credentials {role} (FM; admin): NATS
// credentials for an operator (readonly or admin), a provisioner run on
// its own, or a cluster's monitoring (monitor: the system account's server
// state requests only).
func (s *Server) natsCredentials(r *http.Request) (any, error) {
	if s.cfg.Authority == nil {
		return nil, newAPIError(protocol.CodeUnimplemented, "Not supported", "this Fleet Manager does not manage NATS credentials")
	}
	var req struct {
		Role string `json:"role"`
		// ExpiresHours is how long the credentials last (0: forever).
		ExpiresHours int `json:"expiresHours"`
	}
	if err := readJSON(r, &req); err != nil {
		return nil, err
	}
	if req.ExpiresHours < 0 {
		return nil, invalid("expiresHours: %d is negative", req.ExpiresHours)
	}
	var expires time.Time
	if req.ExpiresHours > 0 {
		expires = time.Now().Add(time.Duration(req.ExpiresHours) * time.Hour).UTC()
	}
	name := req.Role + "-by-" + principalID(r.Context())
	var creds []byte
	var pub string
	var err error
	switch req.Role {
	case "readonly":
		creds, pub, err = s.cfg.Authority.ReaderCreds(name, expires)
	case "admin", "provisioner":
		creds, pub, err = s.cfg.Authority.Creds(name, jwt.Permissions{}, expires)
	case "monitor":
		if expires.IsZero() || req.ExpiresHours > maxMonitorHours {
			return nil, invalid("expiresHours: monitoring credentials last at most %d hours (they cannot be revoked)", maxMonitorHours)
		}
		creds, pub, err = s.cfg.Authority.MonitorCreds(name, expires)
	default:
		return nil, invalid("role: %q is not readonly, admin, provisioner or monitor", req.Role)
	}
	if err != nil {
		return nil, internal(err, "the credentials could not be made")
	}
	s.record(r.Context(), protocol.AuditRecord{Who: whoFrom(r.Context()), From: clientAddr(r), Action: "credentials.minted",
		Object: "credentials", ObjectID: req.Role, Outcome: "ok"})
	resp := map[string]string{"credentials": string(creds), "user": pub, "role": req.Role}
	if !expires.IsZero() {
		resp["expires"] = expires.Format(time.RFC3339)
	}
	return resp, nil
}
