package server

import (
	"context"
	"crypto/hmac"
	"encoding/json"
	"net/http"
	"strings"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
	"golang.org/x/oauth2"
)

// The console's single sign-on: OpenID Connect's authorization code flow
// (with PKCE when the settings ask for it), for a person whose identity
// provider the SSO settings name (sso.go). The browser goes to the
// provider from SSOStartPath and comes back to SSOCallbackPath with a
// code; FM redeems it with the client's secret, checks the ID token as it
// checks a bearer token (issuer, audience, signature, expiry, role
// mapping) and that it carries the nonce of this sign-in, and starts a
// console session, which lasts no longer than the token.
//
// The sign-in under way (its state, nonce and PKCE verifier) travels in a
// cookie of its own, sealed with FM's secret key: nothing is stored before
// a person is signed in, so that calls to SSOStartPath cost no more than a
// redirect; only the browser that started a sign-in can finish it (whoever
// sees the callback's URL has no cookie to go with it); and the provider
// redeems a code once.
const (
	// SSOPath tells the sign-in page whether single sign-on is on.
	SSOPath         = "/console/sso"
	SSOStartPath    = "/console/sso/start"
	SSOCallbackPath = "/console/sso/callback"
	ssoStateCookie  = "fm_sso_state"
	ssoPendingLife  = 10 * time.Minute
	// ssoSealPlace binds the sealed cookie to its use.
	ssoSealPlace = "console/sso-sign-in"
)

// ssoPending is a sign-in under way, as its sealed cookie carries it.
type ssoPending struct {
	State       string    `json:"state"`
	Nonce       string    `json:"nonce"`
	Verifier    string    `json:"verifier,omitempty"`
	RedirectURI string    `json:"redirectUri"`
	Expires     time.Time `json:"expires"`
}

// What a failed sign-in tells the sign-in page: a code, which the page
// words itself, so that a link to FM cannot make its page say anything
// else.
const (
	ssoErrOff         = "off"
	ssoErrUnreachable = "unreachable"
	ssoErrStale       = "stale"
	ssoErrRefused     = "refused"
	ssoErrNoRole      = "no-role"
	ssoErrDenied      = "denied"
	ssoErrUnavailable = "unavailable"
)

// ssoStateCookie is the sign-in's cookie, without its value: Lax, as the
// provider's redirect back is a top-level navigation from another site,
// which a Strict cookie would not follow; over TLS named __Host- (and so
// for the whole site), so that no other host can plant its own sign-in.
func (s *Server) ssoStateCookie(r *http.Request) *http.Cookie {
	c := &http.Cookie{Name: ssoStateCookie, Path: SSOCallbackPath, HttpOnly: true, SameSite: http.SameSiteLaxMode}
	if s.consoleSecure(r) {
		c.Name, c.Path, c.Secure = "__Host-"+ssoStateCookie, "/", true
	}
	return c
}

// serveSSO serves SSOPath: {"enabled": …}.
func (s *Server) serveSSO(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	_, ok := s.ssoConfig()
	writeJSON(w, http.StatusOK, map[string]bool{"enabled": ok})
}

// ssoEndpoint is the provider's authorization and token endpoints: the
// settings', or its discovery document's (read once per issuer, and again
// only ssoRetryAfter after a failure, as the verifier's).
func (s *Server) ssoEndpoint(cfg ssoConfig) (oauth2.Endpoint, error) {
	ep := oauth2.Endpoint{AuthURL: cfg.authURL, TokenURL: cfg.tokenURL}
	if ep.AuthURL != "" && ep.TokenURL != "" {
		return ep, nil
	}
	// A lock of its own: the verifier's (mu) is taken by every bearer
	// token's check, which a discovery under way must not hold up.
	v := &s.sso
	v.discoverMu.Lock()
	defer v.discoverMu.Unlock()
	if v.discoveredFor == cfg.issuer {
		if v.discoverErr == nil || time.Since(v.discoveredAt) < ssoRetryAfter {
			return fillEndpoint(ep, v.discovered), v.discoverErr
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), ssoFetchLimit)
	defer cancel()
	p, err := oidc.NewProvider(oidc.ClientContext(ctx, ssoClient), cfg.issuer)
	v.discoveredFor, v.discoveredAt, v.discoverErr = cfg.issuer, time.Now(), err
	if err != nil {
		s.log.Warn().Err(trimmed(err)).Str("issuer", cfg.issuer).Msg("the identity provider's discovery failed")
		return ep, err
	}
	v.discovered = p.Endpoint()
	return fillEndpoint(ep, v.discovered), nil
}

func fillEndpoint(ep, discovered oauth2.Endpoint) oauth2.Endpoint {
	if ep.AuthURL == "" {
		ep.AuthURL = discovered.AuthURL
	}
	if ep.TokenURL == "" {
		ep.TokenURL = discovered.TokenURL
	}
	return ep
}

// oauthConfig is FM's client of the settings in force.
func (s *Server) oauthConfig(cfg ssoConfig, redirectURI string) (*oauth2.Config, error) {
	ep, err := s.ssoEndpoint(cfg)
	if err != nil {
		return nil, err
	}
	ep.AuthStyle = oauth2.AuthStyleInHeader
	if cfg.secretInForm {
		ep.AuthStyle = oauth2.AuthStyleInParams
	}
	scopes := strings.Fields(cfg.scope)
	if len(scopes) == 0 {
		scopes = []string{oidc.ScopeOpenID, "profile", "email"}
	}
	secret := ""
	if doc, _, ok := s.st.settings.get(settingsKey(api.DefaultTenant, iamSettings["sso-settings"].setting)); ok {
		secret = doc.IAMSecret
	}
	return &oauth2.Config{ClientID: cfg.clientID, ClientSecret: secret, Endpoint: ep, RedirectURL: redirectURI, Scopes: scopes}, nil
}

// ssoFailed sends the browser back to the sign-in page with what went
// wrong.
func ssoFailed(w http.ResponseWriter, r *http.Request, code string) {
	http.Redirect(w, r, "/#sso-error="+code, http.StatusFound)
}

// consoleBase is the console's origin as browsers reach it.
func (s *Server) consoleBase(r *http.Request) string {
	if s.cfg.ConsoleURL != "" {
		return s.cfg.ConsoleURL
	}
	scheme := "http"
	if s.consoleSecure(r) {
		scheme = "https"
	}
	// The identity provider sends the browser back only to an address
	// registered for FM's client: a Host header made up sends it nowhere.
	return scheme + "://" + r.Host
}

// startSSO serves SSOStartPath: off to the identity provider.
func (s *Server) startSSO(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	if r.Method != http.MethodGet {
		s.writeError(w, r, methodNotAllowed(w, r, "GET"))
		return
	}
	cfg, ok := s.ssoConfig()
	if !ok {
		ssoFailed(w, r, ssoErrOff)
		return
	}
	redirectURI := s.consoleBase(r) + SSOCallbackPath
	oc, err := s.oauthConfig(cfg, redirectURI)
	if err != nil {
		ssoFailed(w, r, ssoErrUnreachable)
		return
	}
	pending := ssoPending{State: randomSecret(32), Nonce: randomSecret(16), RedirectURI: redirectURI, Expires: time.Now().Add(ssoPendingLife)}
	opts := []oauth2.AuthCodeOption{oidc.Nonce(pending.Nonce)}
	if cfg.pkce {
		pending.Verifier = oauth2.GenerateVerifier()
		opts = append(opts, oauth2.S256ChallengeOption(pending.Verifier))
	}
	v, _ := json.Marshal(pending)
	c := s.ssoStateCookie(r)
	c.Value, c.MaxAge = s.box.Seal(string(v), ssoSealPlace), int(ssoPendingLife.Seconds())
	http.SetCookie(w, c)
	http.Redirect(w, r, oc.AuthCodeURL(pending.State, opts...), http.StatusFound)
}

// finishSSO serves SSOCallbackPath: the code redeemed, the ID token
// checked, a session started.
func (s *Server) finishSSO(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	q := r.URL.Query()
	var pending ssoPending
	clear := s.ssoStateCookie(r)
	c, err := r.Cookie(clear.Name)
	if err == nil {
		clear.MaxAge = -1
		http.SetCookie(w, clear)
		var plain string
		if plain, err = s.box.Open(c.Value, ssoSealPlace); err == nil {
			err = json.Unmarshal([]byte(plain), &pending)
		}
	}
	if q.Get("error") != "" {
		ssoFailed(w, r, ssoErrDenied)
		return
	}
	// The state in the URL must be the one this browser's sealed cookie
	// holds: a callback started in another browser, or replayed from a
	// log, finds no cookie, or another state.
	if err != nil || pending.State == "" || !hmac.Equal([]byte(q.Get("state")), []byte(pending.State)) || time.Now().After(pending.Expires) {
		ssoFailed(w, r, ssoErrStale)
		return
	}
	cfg, ok := s.ssoConfig()
	if !ok {
		ssoFailed(w, r, ssoErrOff)
		return
	}
	oc, err := s.oauthConfig(cfg, pending.RedirectURI)
	if err != nil {
		ssoFailed(w, r, ssoErrUnreachable)
		return
	}
	var opts []oauth2.AuthCodeOption
	if pending.Verifier != "" {
		opts = append(opts, oauth2.VerifierOption(pending.Verifier))
	}
	// A code the provider refuses (a callback replayed, with its cookie)
	// counts against the address as a wrong key does: FM does not call
	// the provider for anyone as often as they like.
	addr := clientAddr(r)
	byAddr, err := s.apiByAddr.reserve(r.Context(), addr)
	if err != nil {
		ssoFailed(w, r, ssoErrUnavailable)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), ssoFetchLimit)
	defer cancel()
	tok, err := oc.Exchange(oidc.ClientContext(ctx, ssoClient), q.Get("code"), opts...)
	byAddr.settle(err != nil)
	if err != nil {
		s.log.Info().Err(trimmed(err)).Msg("the identity provider did not redeem a sign-in's code")
		ssoFailed(w, r, ssoErrRefused)
		return
	}
	raw, _ := tok.Extra("id_token").(string)
	if raw == "" {
		s.log.Warn().Msg("the identity provider sent no ID token: FM's client needs the openid scope")
		ssoFailed(w, r, ssoErrRefused)
		return
	}
	p, err := s.checkIDToken(r, raw, pending.Nonce)
	if err != nil {
		code := ssoErrRefused
		if ae := asAPIError(err); ae.code == protocol.CodePermissionDenied {
			code = ssoErrNoRole
		} else if httpStatus(ae.code) >= 500 || httpStatus(ae.code) == http.StatusTooManyRequests {
			code = ssoErrUnavailable
		}
		ssoFailed(w, r, code)
		return
	}
	if _, err := s.startSession(w, r, p, p.until); err != nil {
		ssoFailed(w, r, ssoErrUnavailable)
		return
	}
	http.Redirect(w, r, "/", http.StatusFound)
}
