package server

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/time/rate"
)

// The web console (package console) signs a person in once, with an API
// key or by SSO (consolesso.go), and then calls the REST API as any client
// does, with a session cookie in place of the key: the API's roles,
// revisions and audit apply unchanged, as the principal is the key's (or
// the person's).
//
// A session is a random cookie (256 bits), stored in fm_sessions under its
// SHA-256 only, so that whoever reads the bucket learns no cookie (and
// read-only users of the bus may not read it at all). The cookie is
// HttpOnly and SameSite=Strict; over TLS it is Secure and named with the
// __Host- prefix, which a sibling host cannot set. Every call made with it
// must also carry the session's CSRF token in the X-FM-CSRF header,
// whatever its method: Dataiku's API changes things on GET
// (…/actions/delete), so a method check alone would let another site's
// <img> delete an instance. A browser sends no custom header across origins
// without a CORS preflight, which FM never grants; Go's cross-origin
// protection (Sec-Fetch-Site, Origin) refuses the changes of another origin
// too.
const (
	// SessionPath signs in (POST), tells who is signed in (GET) and signs
	// out (DELETE).
	SessionPath = "/console/session"
	// sessionCookie is the cookie's name over plain HTTP; secureCookie
	// over TLS.
	sessionCookie = "fm_session"
	secureCookie  = "__Host-fm_session"
	csrfHeader    = "X-FM-CSRF"
	// defaultSessionLifetime is used when the topology gives none.
	defaultSessionLifetime = 12 * time.Hour
	maxSignInBody          = 4 << 10
	// sessionReadTime bounds the retries of a session's read or write on
	// a bus that does not answer (a leader election).
	sessionReadTime = 3 * time.Second
)

// consoleSession is a signed-in console, as fm_sessions keeps it.
type consoleSession struct {
	// KeyID is the API key signed in with: its role is read at every
	// call, so that a key revoked ends the session at once. A person
	// signed in by SSO is "sso:<user>", with the Role their ID token gave,
	// and SSORev the revision of the SSO settings then: a change of them
	// (turned off, other role mappings, another issuer) ends the session.
	KeyID   string    `json:"keyId"`
	Role    string    `json:"role,omitempty"`
	SSORev  uint64    `json:"ssoRev,omitempty"`
	CSRF    string    `json:"csrf"`
	Created time.Time `json:"created"`
	Expires time.Time `json:"expires"`
	From    string    `json:"from"`
}

// SessionInfo is the body of GET and POST /console/session.
type SessionInfo struct {
	Who     string    `json:"who"`
	KeyID   string    `json:"keyId"`
	Role    string    `json:"role"`
	CSRF    string    `json:"csrf"`
	Expires time.Time `json:"expires"`
}

// sessionStore keeps the console's sessions in fm_sessions, shared by
// every replica.
type sessionStore struct {
	kv       jetstream.KeyValue
	lifetime time.Duration
	// signIns paces the sessions each API key (or person) starts on this
	// replica (a key that signs in in a loop would fill the bucket): a
	// burst of 10, then one every 6 s.
	mu      sync.Mutex
	signIns map[string]*rate.Limiter
}

// newSessionStore keeps sessions in kv for lifetime: the TTL the server
// declared fm_sessions with (bus.Topology.SessionLifetime).
func newSessionStore(kv jetstream.KeyValue, lifetime time.Duration) *sessionStore {
	if lifetime <= 0 {
		lifetime = defaultSessionLifetime
	}
	return &sessionStore{kv: kv, lifetime: lifetime, signIns: map[string]*rate.Limiter{}}
}

// mayStart reports whether who may start one more session now.
func (ss *sessionStore) mayStart(who string) bool {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	l, ok := ss.signIns[who]
	if !ok {
		if len(ss.signIns) >= 10000 {
			// Forget the keys and people that signed in long enough ago
			// to have their burst back.
			for k, l := range ss.signIns {
				if l.Tokens() >= 10 {
					delete(ss.signIns, k)
				}
			}
		}
		l = rate.NewLimiter(rate.Every(6*time.Second), 10)
		ss.signIns[who] = l
	}
	return l.Allow()
}

// sessionKey is where a cookie's session is kept: its SHA-256.
func sessionKey(cookie string) string {
	sum := sha256.Sum256([]byte(cookie))
	return hex.EncodeToString(sum[:])
}

// randomSecret returns n random bytes, base64url-encoded.
func randomSecret(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(fmt.Sprintf("crypto/rand failed: %v", err))
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

var errNoSession = errors.New("no console session")

// retrying runs op until it succeeds, fails for good (stop), or
// sessionReadTime passes (each attempt within what is left of it): the bus
// may be electing a leader.
func retrying(ctx context.Context, op func(context.Context) error, stop func(error) bool) error {
	ctx, cancel := context.WithTimeout(ctx, sessionReadTime)
	defer cancel()
	for wait := 50 * time.Millisecond; ; wait *= 2 {
		err := op(ctx)
		if err == nil || stop(err) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(wait):
		}
	}
}

// lookup returns the session of a cookie; errNoSession if there is none
// or it has expired.
func (ss *sessionStore) lookup(ctx context.Context, cookie string) (consoleSession, error) {
	var cs consoleSession
	if cookie == "" || len(cookie) > 128 {
		return cs, errNoSession
	}
	var e jetstream.KeyValueEntry
	err := retrying(ctx, func(ctx context.Context) (err error) {
		e, err = ss.kv.Get(ctx, sessionKey(cookie))
		return err
	}, func(err error) bool { return errors.Is(err, jetstream.ErrKeyNotFound) })
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return cs, errNoSession
	}
	if err != nil {
		return cs, unavailable(err, "the console's sessions cannot be read")
	}
	if err := json.Unmarshal(e.Value(), &cs); err != nil || cs.KeyID == "" || cs.CSRF == "" {
		return cs, errNoSession
	}
	if !time.Now().Before(cs.Expires) {
		return cs, errNoSession
	}
	return cs, nil
}

// end deletes a cookie's session.
func (ss *sessionStore) end(ctx context.Context, cookie string) error {
	return retrying(ctx, func(ctx context.Context) error { return ss.kv.Delete(ctx, sessionKey(cookie)) }, func(error) bool { return false })
}

// consoleSecure reports whether the console is reached over HTTPS:
// Config.ConsoleURL says so, or this server serves TLS.
func (s *Server) consoleSecure(r *http.Request) bool {
	return strings.HasPrefix(s.cfg.ConsoleURL, "https://") || r.TLS != nil || s.cfg.TLS != nil
}

// sessionCookieName is the session cookie's name for r.
func (s *Server) sessionCookieName(r *http.Request) string {
	if s.consoleSecure(r) {
		return secureCookie
	}
	return sessionCookie
}

// sessionCookieOf is the session cookie r carries, if any.
func (s *Server) sessionCookieOf(r *http.Request) (string, bool) {
	c, err := r.Cookie(s.sessionCookieName(r))
	if err != nil || c.Value == "" {
		return "", false
	}
	return c.Value, true
}

var errSessionEnded = newAPIError(protocol.CodeUnauthenticated, "Authentication required",
	"the console session ended (signed out, expired, its key revoked, or the SSO settings changed): sign in again")

// sessionOf returns the request's console session and its cookie, stored
// and not expired; with csrf, the request must carry the session's token.
// A request without one is refused as unauthenticated.
func (s *Server) sessionOf(r *http.Request, csrf bool) (consoleSession, string, error) {
	cookie, ok := s.sessionCookieOf(r)
	if !ok {
		return consoleSession{}, "", errSessionEnded
	}
	cs, err := s.sessions.lookup(r.Context(), cookie)
	if errors.Is(err, errNoSession) {
		return cs, cookie, errSessionEnded
	}
	if err != nil {
		return cs, cookie, err
	}
	if csrf && !hmac.Equal([]byte(r.Header.Get(csrfHeader)), []byte(cs.CSRF)) {
		return cs, cookie, newAPIError(protocol.CodePermissionDenied, "Cross-site request refused",
			"a call made with the console's session must carry its %s header", csrfHeader)
	}
	return cs, cookie, nil
}

// sessionFrom returns the request's console session (sessionOf) and the
// principal it stands for, if that is still one.
func (s *Server) sessionFrom(r *http.Request, csrf bool) (*Principal, consoleSession, error) {
	cs, _, err := s.sessionOf(r, csrf)
	if err != nil {
		return nil, cs, err
	}
	if strings.HasPrefix(cs.KeyID, ssoPrefix) {
		if _, on := s.ssoConfig(); !on || roleRank[cs.Role] == 0 || s.ssoRevision() != cs.SSORev {
			return nil, cs, errSessionEnded
		}
		return &Principal{KeyID: cs.KeyID, Role: cs.Role}, cs, nil
	}
	k, _, ok := s.st.keys.get(cs.KeyID)
	if !ok || k.RevokedAt != nil {
		return nil, cs, errSessionEnded
	}
	return &Principal{KeyID: cs.KeyID, Role: k.Role}, cs, nil
}

// ssoRevision is the revision of the SSO settings in force (0: none).
func (s *Server) ssoRevision() uint64 {
	_, rev, _ := s.st.settings.get(settingsKey(api.DefaultTenant, iamSettings["sso-settings"].setting))
	return rev
}

// refuseCrossOrigin refuses a change a browser sent from another origin.
func (s *Server) refuseCrossOrigin(w http.ResponseWriter, r *http.Request) bool {
	if err := s.crossOrigin.Check(r); err != nil {
		s.writeError(w, r, newAPIError(protocol.CodePermissionDenied, "Cross-site request refused", "%v", err))
		return true
	}
	return false
}

// serveSession serves SessionPath.
func (s *Server) serveSession(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	if s.refuseCrossOrigin(w, r) {
		return
	}
	switch r.Method {
	case http.MethodGet:
		p, cs, err := s.sessionFrom(r, false)
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, SessionInfo{Who: p.who(), KeyID: p.KeyID, Role: p.Role, CSRF: cs.CSRF, Expires: cs.Expires})
	case http.MethodPost:
		s.signIn(w, r)
	case http.MethodDelete:
		s.signOut(w, r)
	default:
		s.writeError(w, r, methodNotAllowed(w, r, "DELETE", "GET", "POST"))
	}
}

// signIn checks an API key (with the API's limits on failed attempts) and
// starts a session.
func (s *Server) signIn(w http.ResponseWriter, r *http.Request) {
	if ct, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); ct != "application/json" {
		s.writeError(w, r, newAPIError(protocol.CodeInvalidArgument, "Invalid request",
			"sign in with a JSON body {\"keyId\": …, \"secret\": …}"))
		return
	}
	var body struct {
		KeyID  string `json:"keyId"`
		Secret string `json:"secret"`
	}
	b, err := io.ReadAll(io.LimitReader(r.Body, maxSignInBody+1))
	if err != nil || len(b) > maxSignInBody || json.Unmarshal(b, &body) != nil {
		s.writeError(w, r, invalid("sign in with a JSON body {\"keyId\": …, \"secret\": …} of at most %d bytes", maxSignInBody))
		return
	}
	body.KeyID, body.Secret = strings.TrimSpace(body.KeyID), strings.TrimSpace(body.Secret)
	if body.KeyID == "" || body.Secret == "" {
		s.writeError(w, r, invalid("give the API key's id and its secret"))
		return
	}
	p, legacy, err := s.checkKey(r, body.KeyID, body.Secret)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	if legacy != 0 {
		s.rehash(r.Context(), body.KeyID, body.Secret, legacy)
	}
	cs, err := s.startSession(w, r, p, time.Time{})
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, SessionInfo{Who: p.who(), KeyID: p.KeyID, Role: p.Role, CSRF: cs.CSRF, Expires: cs.Expires})
}

// startSession starts a session for p (an API key's, or a person's signed
// in by SSO, until their ID token expires): always a new cookie, and the
// one the browser brought, if any, ended, so that a cookie planted before
// sign-in never becomes a signed-in one (session fixation). The sign-in is
// audited.
func (s *Server) startSession(w http.ResponseWriter, r *http.Request, p *Principal, until time.Time) (consoleSession, error) {
	if !s.sessions.mayStart(p.KeyID) {
		e := newAPIError(protocol.CodeResourceExhausted, "Too many sign-ins",
			"%s started too many console sessions lately; retry in a minute", p.who())
		e.retryAfter = time.Minute
		return consoleSession{}, e
	}
	if old, ok := s.sessionCookieOf(r); ok && len(old) <= 128 {
		_ = s.sessions.end(r.Context(), old)
	}
	now := time.Now().UTC()
	cookie := randomSecret(32)
	cs := consoleSession{KeyID: p.KeyID, CSRF: randomSecret(32), Created: now, Expires: now.Add(s.sessions.lifetime), From: clientAddr(r)}
	if strings.HasPrefix(p.KeyID, ssoPrefix) {
		cs.Role, cs.SSORev = p.Role, s.ssoRevision()
		if !until.IsZero() && until.Before(cs.Expires) {
			cs.Expires = until.UTC()
		}
	}
	v, _ := json.Marshal(cs)
	// A put, not a create: a retry after an answer lost finds the key
	// there (256 random bits name no other session).
	if err := retrying(r.Context(), func(ctx context.Context) error {
		_, err := s.sessions.kv.Put(ctx, sessionKey(cookie), v)
		return err
	}, func(error) bool { return false }); err != nil {
		return cs, unavailable(err, "the console's session could not be stored")
	}
	http.SetCookie(w, s.sessionCookie(r, cookie, cs.Expires))
	s.auditAs(r, p.who(), p.Role, "ok", http.StatusOK, nil)
	return cs, nil
}

// signOut ends the session. It needs the session's CSRF token (another
// site must not sign a person out), not a principal: a session whose key
// was revoked, or whose SSO settings changed, is ended too, so that it
// cannot come back if they change back.
func (s *Server) signOut(w http.ResponseWriter, r *http.Request) {
	cs, cookie, err := s.sessionOf(r, true)
	if err != nil {
		if errors.Is(err, errSessionEnded) && cookie != "" {
			http.SetCookie(w, s.sessionCookie(r, "", time.Unix(0, 0)))
		}
		s.writeError(w, r, err)
		return
	}
	if err := s.sessions.end(r.Context(), cookie); err != nil {
		s.writeError(w, r, unavailable(err, "the console's session could not be ended"))
		return
	}
	http.SetCookie(w, s.sessionCookie(r, "", time.Unix(0, 0)))
	p := &Principal{KeyID: cs.KeyID, Role: cs.Role}
	if k, _, ok := s.st.keys.get(cs.KeyID); ok && !strings.HasPrefix(cs.KeyID, ssoPrefix) {
		p.Role = k.Role
	}
	s.auditAs(r, p.who(), p.Role, "ok", http.StatusOK, nil)
	writeJSON(w, http.StatusOK, map[string]string{"status": "signed out"})
}

// sessionCookie is the cookie of a session; an empty value with a past
// expiry clears it.
func (s *Server) sessionCookie(r *http.Request, value string, expires time.Time) *http.Cookie {
	return &http.Cookie{Name: s.sessionCookieName(r), Value: value, Path: "/", Expires: expires,
		HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: s.consoleSecure(r)}
}
