package server

import (
	"context"
	"encoding/base64"
	"errors"
	"net/http"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
)

// Agents' NATS credentials expire (Config.AgentCredsTTL), so that a
// revocation need only be remembered until the last JWT of the user it
// revokes has expired: the revocation list stays small however many
// machines come and go. An agent renews its credentials over the bus before
// they expire, and over HTTP (RenewPath) if they expired while its machine
// was off.

// RenewPath is where an agent whose credentials expired renews them, with a
// request signed by its machine's key.
const RenewPath = JoinPath + "/renew"

// defaultAgentCredsTTL is how long an agent's credentials last; agents
// renew them when two thirds of that have passed.
const defaultAgentCredsTTL = 24 * time.Hour

// renewClockSkew is how far a renew request's time may be from FM's.
const renewClockSkew = 10 * time.Minute

// serveRenewals answers the renew requests agents send on the bus.
func (s *Server) serveRenewals() (*nats.Subscription, error) {
	return serveAgentRequests(s, protocol.SubjectAllRenew, "a renewal", &s.renewals,
		func(ctx context.Context, instance string, data []byte) (*protocol.RenewResponse, error) {
			var req protocol.RenewRequest
			if err := protocol.Decode(data, &req); err != nil {
				return nil, protocol.Errorf(protocol.CodeInvalidArgument, "the renew request does not decode: %v", err)
			}
			tok, err := s.renewRequest(ctx, instance, req, false)
			if err != nil {
				return nil, err
			}
			return &protocol.RenewResponse{JWT: tok}, nil
		},
		func(perr *protocol.Error) *protocol.RenewResponse { return &protocol.RenewResponse{Error: perr} })
}

// renewHTTP serves POST RenewPath.
func (s *Server) renewHTTP(r *http.Request) (any, error) {
	if s.cfg.Authority == nil {
		return nil, newAPIError(protocol.CodeUnimplemented, "Not supported", "this Fleet Manager runs without NATS credentials")
	}
	// Refused renewals count with refused joins: the same callers, the
	// same proof.
	attempt, err := s.joinAttempt(r)
	if err != nil {
		return nil, err
	}
	refused := false
	defer func() { attempt.settle(refused) }()
	var req protocol.RenewRequest
	if err := readJSON(r, &req); err != nil {
		return nil, err
	}
	if err := req.Validate(); err != nil {
		return nil, invalid("%v", err)
	}
	tok, err := s.renewRequest(r.Context(), req.Instance, req, true)
	if err != nil {
		var perr *protocol.Error
		refused = errors.As(err, &perr) && perr.Code == protocol.CodeUnauthenticated
		return nil, err
	}
	return protocol.RenewResponse{JWT: tok}, nil
}

// renewRequest checks a renew request for instance and answers the JWT.
// Over HTTP (fresh), the signed time must be recent: nothing else shows
// the request is not a replay. On the bus the subject shows who sends, and
// a machine whose clock is off still renews.
func (s *Server) renewRequest(ctx context.Context, instance string, req protocol.RenewRequest, fresh bool) (string, error) {
	refused := func(reason string) error {
		s.log.Warn().Str("instance", safeToken(instance)).Str("reason", reason).Msg("credentials not renewed")
		return protocol.Errorf(protocol.CodeUnauthenticated, "credentials not renewed: %s", reason)
	}
	switch {
	case !protocol.ValidToken(instance) || req.Instance != instance:
		return "", refused("the request names another instance than its sender")
	case !nkeys.IsValidPublicUserKey(req.PublicKey):
		return "", refused("publicKey is not a NATS user key")
	case fresh && (req.Time.Before(time.Now().Add(-renewClockSkew)) || req.Time.After(time.Now().Add(renewClockSkew))):
		return "", refused("the request's time is more than 10 minutes from FM's (a replay, or a clock to set)")
	case !signedBy(req.PublicKey, req.Signature, protocol.RenewProof(req.Instance, req.PublicKey, req.Time)):
		return "", refused("no proof of holding the key")
	}
	return s.renewAgent(ctx, instance, req.PublicKey)
}

// renewAgent mints a new JWT for the instance's current agent user pub,
// after recording how long it lasts: a revocation is kept until the last
// JWT of its user expired, so the expiry is on record before any JWT
// carrying it leaves.
func (s *Server) renewAgent(ctx context.Context, instance, pub string) (string, error) {
	// Before the last fold's cutoff, as this server's copy of the list
	// shows it, nothing is written: the agents of a whole fleet ask at once.
	if doc, _, _ := s.st.settings.get(revocationsKey); doc.RevokedBefore >= time.Now().Unix() {
		return "", beforeCutoff(doc.RevokedBefore, time.Now().Unix())
	}
	expires := s.agentCredsExpiry()
	// Recorded on the instance's current user only, in a revision-checked
	// write: a machine retired meanwhile (revocations.go) is refused, and
	// one retired after finds this expiry on record and is revoked as of it.
	current := false
	_, err := s.changeSecrets(ctx, instance, func(sec *instanceSecrets) bool {
		current = sec.AgentUser == pub && pub != ""
		if current {
			sec.AgentUserExpires = later(sec.AgentUserExpires, expires)
		}
		return current
	})
	if err != nil {
		return "", protocol.Errorf(protocol.CodeUnavailable, "the renewal could not be recorded: %v", err)
	}
	if !current {
		return "", protocol.Errorf(protocol.CodeUnauthenticated, "credentials not renewed: not the key of the instance's current machine")
	}
	tok, err := s.mintAfterRevokeAll(ctx, func() (string, error) {
		tok, err := s.cfg.Authority.AgentJWT(instance, pub, expires)
		if err != nil {
			return "", protocol.Errorf(protocol.CodeInternal, "the agent's credentials could not be made: %v", err)
		}
		return tok, nil
	})
	if err != nil {
		return "", err
	}
	s.log.Debug().Str("instance", instance).Time("expires", expires).Msg("agent credentials renewed")
	return tok, nil
}

// renewInterval is how often an instance's credentials may be renewed on
// the bus (an agent renews once per two thirds of their life); a refused
// request costs a signature check, a renewal a write and a JWT.
const renewInterval = time.Second

// agentCredsExpiry is when agent credentials made now expire.
func (s *Server) agentCredsExpiry() time.Time {
	return time.Now().Add(s.agentCredsTTL()).UTC().Truncate(time.Second)
}

// agentCredsTTL is how long agent credentials last.
func (s *Server) agentCredsTTL() time.Duration {
	if s.cfg.AgentCredsTTL <= 0 {
		return defaultAgentCredsTTL
	}
	return s.cfg.AgentCredsTTL
}

// signedBy reports whether sig (base64, raw URL encoding) is pub's
// signature of proof.
func signedBy(pub, sig string, proof []byte) bool {
	raw, err := base64.RawURLEncoding.DecodeString(sig)
	if err != nil || len(raw) == 0 {
		return false
	}
	kp, err := nkeys.FromPublicKey(pub)
	if err != nil {
		return false
	}
	return kp.Verify(proof, raw) == nil
}
