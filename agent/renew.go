package agent

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net/http"
	"os"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/internal/atomicfile"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/jwt/v2"
)

// An agent's NATS credentials expire (FM keeps a revocation only until
// then). The agent renews them over the bus when two thirds of their life
// has passed, and, when they expired while the machine was off (or the
// bus could not be reached in time), over HTTP at the join endpoint, with a
// request signed by the machine's key. The same user (the machine's key)
// gets a new JWT; the connection uses it at its next (re)connect, which
// NATS forces when the old one expires.

// currentCreds is the credentials the agent connects with.
func (a *Agent) currentCreds() []byte {
	a.credsMu.Lock()
	defer a.credsMu.Unlock()
	return a.creds
}

// credsTimes are the issue and expiry times of the credentials' JWT (a
// zero expiry: they never expire).
func credsTimes(creds []byte) (issued, expires time.Time, err error) {
	claims, err := userClaims(creds)
	if err != nil {
		return time.Time{}, time.Time{}, err
	}
	if claims.Expires != 0 {
		expires = time.Unix(claims.Expires, 0)
	}
	return time.Unix(claims.IssuedAt, 0), expires, nil
}

// inAgentsAccount says whether creds are a user of the agents' account
// (protocol.AgentsAccountTag); credentials minted before agents had an
// account of their own are the FM account's.
func inAgentsAccount(creds []byte) bool {
	claims, err := userClaims(creds)
	return err == nil && claims.Tags.Contains(protocol.AgentsAccountTag)
}

// userClaims decodes the user JWT of a creds file.
func userClaims(creds []byte) (*jwt.UserClaims, error) {
	tok, err := jwt.ParseDecoratedJWT(creds)
	if err != nil {
		return nil, err
	}
	return jwt.DecodeUserClaims(tok)
}

// renewalDue is when credentials issued at issued and expiring at expires
// are renewed: when two thirds of their life has passed.
func renewalDue(issued, expires time.Time) time.Time {
	return issued.Add(expires.Sub(issued) * 2 / 3)
}

// nearlyExpired says whether credentials are too close to their expiry to
// reach the bus with: within a minute of it, or a tenth of their life.
func nearlyExpired(issued, expires time.Time) bool {
	return time.Until(expires) < min(time.Minute, expires.Sub(issued)/10)
}

// keepCreds makes creds (a renewed JWT of the machine's key) the agent's,
// on disk first: a restart uses them.
func (a *Agent) keepCreds(creds []byte) error {
	b, err := os.ReadFile(a.m.identityPath())
	if err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	var id identity
	if err := json.Unmarshal(b, &id); err != nil {
		return fmt.Errorf("identity %s: %w", a.m.identityPath(), err)
	}
	id.Credentials = string(creds)
	if b, err = json.Marshal(id); err != nil {
		return err
	}
	if err := a.crash.Around("agent/renew/keep-identity", func() error {
		return atomicfile.WriteFile(a.m.identityPath(), b, 0o600)
	}); err != nil {
		return fmt.Errorf("keep the renewed credentials: %w", err)
	}
	a.credsMu.Lock()
	a.creds = creds
	a.credsMu.Unlock()
	return nil
}

// renewRequest is the machine's signed renew request for its key.
func (a *Agent) renewRequest() (protocol.RenewRequest, []byte, error) {
	kp, err := jwt.ParseDecoratedUserNKey(a.currentCreds())
	if err != nil {
		return protocol.RenewRequest{}, nil, err
	}
	defer kp.Wipe()
	pub, err := kp.PublicKey()
	if err != nil {
		return protocol.RenewRequest{}, nil, err
	}
	seed, err := kp.Seed()
	if err != nil {
		return protocol.RenewRequest{}, nil, err
	}
	seed = append([]byte(nil), seed...) // Wipe clears the key's own copy
	req := protocol.RenewRequest{Instance: a.cfg.Instance, PublicKey: pub, Time: time.Now().UTC()}
	sig, err := kp.Sign(protocol.RenewProof(req.Instance, req.PublicKey, req.Time))
	if err != nil {
		return protocol.RenewRequest{}, nil, err
	}
	req.Signature = base64.RawURLEncoding.EncodeToString(sig)
	return req, seed, nil
}

// errRenewRefused is FM refusing to renew: this machine is no longer the
// instance's, or was revoked.
var errRenewRefused = errors.New("renewal refused")

// renewOverBus asks FM for a new JWT on the instance's renew subject.
func (a *Agent) renewOverBus(ctx context.Context) ([]byte, error) {
	req, seed, err := a.renewRequest()
	if err != nil {
		return nil, err
	}
	data, err := protocol.Encode(&req)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	msg, err := a.nc.RequestWithContext(ctx, protocol.RenewSubject(a.cfg.Instance), data)
	if err != nil {
		return nil, fmt.Errorf("renew over the bus: %w", err)
	}
	var resp protocol.RenewResponse
	if err := protocol.Decode(msg.Data, &resp); err != nil {
		return nil, fmt.Errorf("renew over the bus: %w", err)
	}
	return renewedCreds(resp, seed)
}

// renewOverHTTP asks FM's join endpoint for a new JWT: for credentials that
// expired, with which the bus cannot be reached.
func (a *Agent) renewOverHTTP(ctx context.Context, tlsConf *tls.Config) ([]byte, error) {
	if a.cfg.Join == nil || a.cfg.Join.URL == "" {
		return nil, errors.New("no join endpoint to renew at")
	}
	req, seed, err := a.renewRequest()
	if err != nil {
		return nil, err
	}
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, a.cfg.Join.URL+"/renew", bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	hreq.Header.Set("Content-Type", "application/json")
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: tlsConf}}
	defer client.CloseIdleConnections()
	resp, err := client.Do(hreq)
	if err != nil {
		return nil, fmt.Errorf("renew at %s: %w", a.cfg.Join.URL, err)
	}
	defer resp.Body.Close()
	answer, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	switch {
	case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
		return nil, fmt.Errorf("%w: %s", errRenewRefused, bytes.TrimSpace(answer))
	case resp.StatusCode != http.StatusOK:
		return nil, fmt.Errorf("renew at %s: %s %s", a.cfg.Join.URL, resp.Status, bytes.TrimSpace(answer))
	}
	var out protocol.RenewResponse
	if err := json.Unmarshal(answer, &out); err != nil {
		return nil, fmt.Errorf("renew at %s: %w", a.cfg.Join.URL, err)
	}
	return renewedCreds(out, seed)
}

func renewedCreds(resp protocol.RenewResponse, seed []byte) ([]byte, error) {
	if resp.Error != nil {
		if resp.Error.Code == protocol.CodeUnauthenticated {
			return nil, fmt.Errorf("%w: %s", errRenewRefused, resp.Error.Message)
		}
		return nil, resp.Error
	}
	creds, err := jwt.FormatUserConfig(resp.JWT, seed)
	if err != nil {
		return nil, fmt.Errorf("the renewed JWT is unusable: %w", err)
	}
	return creds, nil
}

// renewExpired renews, over HTTP, credentials that expired or nearly (the
// machine was off): with them the bus cannot be reached. It tries until ctx
// ends. Credentials of the FM account (minted before agents had an account
// of their own, where a user may have JetStream answer into FM's keys) are
// no longer valid (FM's account has a new signing key since): they are
// renewed the same way, into the agents' account. Credentials that neither
// expire nor are of the FM account, or an agent that did not join, need
// nothing.
func (a *Agent) renewExpired(ctx context.Context, tlsConf *tls.Config) error {
	if a.currentCreds() == nil || a.cfg.Join == nil {
		return nil
	}
	issued, expires, err := credsTimes(a.currentCreds())
	if err != nil {
		return fmt.Errorf("credentials: %w", err)
	}
	move := !inAgentsAccount(a.currentCreds())
	if !move && (expires.IsZero() || !nearlyExpired(issued, expires)) {
		return nil
	}
	backoff := time.Second
	for {
		creds, err := a.renewOverHTTP(ctx, tlsConf)
		if err == nil {
			a.log.Info().Bool("moved_to_agents_account", move).Msg("credentials renewed at the join endpoint")
			return a.keepCreds(creds)
		}
		a.log.Warn().Err(err).Dur("retry_in", backoff).Msg("credentials not renewed yet")
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, renewRetryLimit(err))
	}
}

// renewRetryLimit is the longest wait between renewals that failed with
// err: a machine FM no longer knows as the instance's asks rarely.
func renewRetryLimit(err error) time.Duration {
	if errors.Is(err, errRenewRefused) {
		return 10 * time.Minute
	}
	return time.Minute
}

// renewCredentials keeps the credentials renewed until ctx ends: over the
// bus when they are due, over HTTP once they expired.
func (a *Agent) renewCredentials(ctx context.Context, tlsConf *tls.Config) {
	if a.currentCreds() == nil || a.cfg.Join == nil {
		return
	}
	backoff := 5 * time.Second
	refused := false // NATS refused the credentials before their time
	for {
		issued, expires, err := credsTimes(a.currentCreds())
		if err != nil || expires.IsZero() {
			return
		}
		if wait := time.Until(renewalDue(issued, expires)); wait > 0 && !refused {
			if refused = a.dueOrRefused(ctx, wait); ctx.Err() != nil {
				return
			}
			if refused {
				// Revoked: this machine's own user (it was replaced, and
				// FM will refuse too) or every agent's, when FM folded its
				// revocation list (server/revocations.go). The bus is out
				// of reach; the fleet's agents renew over HTTP, spread, and
				// the more often renewing does not cure it (a NATS server
				// that refuses them for another reason), the later.
				spread := refusedRenewSpread(issued, expires, int(a.refusedRenewals.Add(1)))
				a.log.Warn().Dur("renew_in", spread).Msg("NATS refused the credentials before their expiry: renewing them at the join endpoint")
				select {
				case <-ctx.Done():
					return
				case <-time.After(spread):
				}
			}
		}
		// Due: a refusal since (the bus cannot be reached with these)
		// sends the renewal over HTTP.
		if !refused && a.refusedNow() {
			refused = true
		}
		var creds []byte
		if !refused && !nearlyExpired(issued, expires) {
			creds, err = a.renewOverBus(ctx)
		} else {
			creds, err = a.renewOverHTTP(ctx, tlsConf)
		}
		if err == nil {
			err = a.keepCreds(creds)
		}
		if err == nil {
			_, next, _ := credsTimes(creds)
			a.log.Info().Time("expires", next).Msg("credentials renewed")
			if refused {
				// A refusal of a reconnect made with the old ones is old
				// news; the connection tries the new ones now rather than
				// after its next wait.
				select {
				case <-a.credsRefused:
				default:
				}
				if a.nc != nil && !a.nc.IsConnected() {
					_ = a.nc.ForceReconnect()
				}
			}
			backoff, refused = 5*time.Second, false
			continue
		}
		a.log.Warn().Err(err).Dur("retry_in", backoff).Time("expires", expires).Msg("credentials not renewed yet")
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, renewRetryLimit(err))
	}
}

// refusedRenewSpread is how long an agent whose credentials NATS refused
// waits before it renews them over HTTP, the nth time since it was last
// connected: a random part of a window of a hundredth of their life (at
// most 30 s), so that a fleet revoked at once (a folded revocation list)
// does not ask in the same second, doubled each time up to 10 minutes.
func refusedRenewSpread(issued, expires time.Time, nth int) time.Duration {
	window := min(30*time.Second, expires.Sub(issued)/100)
	for i := 1; i < nth && window < 10*time.Minute; i++ {
		window *= 2
	}
	window = min(window, 10*time.Minute)
	if window <= 0 {
		return 0
	}
	return mrand.N(window)
}

// refusalCheck is how often an agent waiting to renew looks whether NATS
// refused its credentials at a connect no callback tells of.
const refusalCheck = 5 * time.Second

// dueOrRefused waits wait, and says whether NATS refused the credentials
// meanwhile. A refusal is told by the connection, or read from it: nats.go
// tells a first connect's retries' refusals to no callback.
func (a *Agent) dueOrRefused(ctx context.Context, wait time.Duration) bool {
	due := time.NewTimer(wait)
	defer due.Stop()
	check := time.NewTicker(refusalCheck)
	defer check.Stop()
	for {
		select {
		case <-ctx.Done():
			return false
		case <-due.C:
			return false
		case <-a.credsRefused:
			return true
		case <-check.C:
			if a.refusedOnConnection() {
				return true
			}
		}
	}
}

// refusedNow says whether NATS refused the current credentials since the
// agent last looked, told or seen on the connection.
func (a *Agent) refusedNow() bool {
	select {
	case <-a.credsRefused:
		return true
	default:
		return a.refusedOnConnection()
	}
}

// refusedOnConnection says whether the connection is down because NATS
// refused the credentials it last presented, and those are the current ones.
func (a *Agent) refusedOnConnection() bool {
	return a.nc != nil && !a.nc.IsConnected() && bus.CredentialsRefused(a.nc.LastError()) && a.refusedAreCurrent()
}

// refusedAreCurrent says whether the credentials the connection last
// presented are the agent's current ones: a refusal of older ones (an
// expired JWT a renewal replaced, which the connection still held) asks
// for nothing.
func (a *Agent) refusedAreCurrent() bool {
	p := a.presented.Load()
	return p == nil || bytes.Equal(*p, a.currentCreds())
}
