package server

import (
	"context"
	"crypto/hmac"
	"encoding/json"
	"errors"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
	"golang.org/x/oauth2"
)

// Single sign-on for FM's own users by OpenID Connect: when the SSO
// settings enable the OPENID protocol, a request may carry, instead of an
// API key, "Authorization: Bearer <ID token>" from the settings' issuer for
// their client. The token is verified (signature by the issuer's keys,
// issuer, audience and authorized party, expiry, age) with go-oidc; the
// user is its identifier claim (remapped by the settings' rules), and the
// role the highest FM's role mappings give one of the values of its group
// claim (fmRoleClaim, fmRoleMappings, fmDefaultRole: FM's keys in the
// settings). The web console signs people in the same way.

// ssoPrefix begins the principal id of a person signed in by SSO: no API
// key id has a colon.
const ssoPrefix = "sso:"

// ssoMaxAge bounds how long after it was issued an ID token is taken,
// whatever its expiry: the only way to end a session early is to turn
// sign-in off, so a token must not live long.
const ssoMaxAge = 12 * time.Hour

// ssoConfig is what verifying and mapping a token needs, from the settings.
type ssoConfig struct {
	issuer, clientID, jwksURI string
	// What the console's sign-in (consolesso.go) needs besides: the
	// endpoints (discovered from the issuer when not given), the scope,
	// PKCE, and how the client authenticates to the token endpoint.
	authURL, tokenURL, scope string
	pkce, secretInForm       bool
	idClaim                  string
	lowercase                bool
	rules                    []remapRule
	roleClaim                string
	roles                    map[string]string
	defaultRole              string
	authorized               []string // groups one of which a user must have, if any
}

type remapRule struct {
	from *regexp.Regexp
	to   string
}

// verifierKey says which settings a verifier was made for.
type verifierKey struct{ issuer, clientID, jwksURI string }

// ssoVerifiers keeps the verifier of the settings in force (made once, the
// issuer's discovery document read; again when they change), and the
// settings parsed, by their revision.
type ssoVerifiers struct {
	mu       sync.Mutex
	key      verifierKey
	verifier *oidc.IDTokenVerifier
	// failedAt and failure are the last discovery that failed: asked again
	// only after ssoRetryAfter, so that an identity provider away does not
	// make every request wait on it.
	failedAt time.Time
	failure  error

	// discovered is the endpoints of discoveredFor's discovery document,
	// for the console's sign-in (consolesso.go), or discoverErr; under
	// discoverMu.
	discoverMu    sync.Mutex
	discoveredFor string
	discoveredAt  time.Time
	discovered    oauth2.Endpoint
	discoverErr   error

	cfgMu  sync.Mutex // apart: a discovery under way holds mu
	cfgRev uint64
	cfg    ssoConfig
	cfgOK  bool
}

const (
	ssoRetryAfter = 30 * time.Second
	ssoFetchLimit = 10 * time.Second
)

// ssoClient fetches the issuer's discovery document and keys: bounded in
// time, never following the request that caused it.
var ssoClient = &http.Client{Timeout: ssoFetchLimit}

// ssoConfig reads the SSO settings (parsed once per revision); false if
// OpenID sign-in is off.
func (s *Server) ssoConfig() (ssoConfig, bool) {
	doc, rev, ok := s.st.settings.get(settingsKey(api.DefaultTenant, iamSettings["sso-settings"].setting))
	if !ok || doc.IAM == nil {
		return ssoConfig{}, false
	}
	s.sso.cfgMu.Lock()
	defer s.sso.cfgMu.Unlock()
	if s.sso.cfgRev == rev {
		return s.sso.cfg, s.sso.cfgOK
	}
	cfg, ok := parseSSO(doc.IAM)
	s.sso.cfgRev, s.sso.cfg, s.sso.cfgOK = rev, cfg, ok
	return cfg, ok
}

func parseSSO(obj map[string]json.RawMessage) (ssoConfig, bool) {
	if !iamEnabled(obj) || iamString(obj, "protocol") != "OPENID" {
		return ssoConfig{}, false
	}
	var p struct {
		ClientID            string `json:"clientId"`
		Issuer              string `json:"issuer"`
		JWKSURI             string `json:"jwksUri"`
		ClaimKeyIdentifier  string `json:"claimKeyIdentifier"`
		LowercaseIdentifier bool   `json:"lowercaseIdentifier"`
		ClaimKeyGroups      string `json:"claimKeyGroups"`
		AuthURL             string `json:"authorizationEndpoint"`
		TokenURL            string `json:"tokenEndpoint"`
		Scope               string `json:"scope"`
		UsePKCE             bool   `json:"usePKCE"`
		AuthMethod          string `json:"tokenEndpointAuthMethod"`
	}
	_ = json.Unmarshal(obj["openIDParams"], &p)
	cfg := ssoConfig{issuer: p.Issuer, clientID: p.ClientID, jwksURI: p.JWKSURI, idClaim: p.ClaimKeyIdentifier,
		lowercase: p.LowercaseIdentifier, roleClaim: iamString(obj, "fmRoleClaim"), defaultRole: iamString(obj, "fmDefaultRole"),
		authorized: iamStrings(obj, "authorizedGroups"),
		authURL:    p.AuthURL, tokenURL: p.TokenURL, scope: p.Scope, pkce: p.UsePKCE, secretInForm: p.AuthMethod == "CLIENT_SECRET_POST"}
	defaultString(&cfg.idClaim, "sub")
	defaultString(&cfg.roleClaim, p.ClaimKeyGroups)
	defaultString(&cfg.roleClaim, "groups")
	_ = json.Unmarshal(obj["fmRoleMappings"], &cfg.roles)
	var rules []struct{ RuleFrom, RuleTo string }
	_ = json.Unmarshal(obj["remappingRules"], &rules)
	for _, r := range rules {
		// Checked when saved (checkSSO): one that does not compile is not
		// stored.
		if re, err := compileRemap(r.RuleFrom); err == nil {
			cfg.rules = append(cfg.rules, remapRule{from: re, to: r.RuleTo})
		}
	}
	return cfg, cfg.issuer != "" && cfg.clientID != ""
}

// compileRemap compiles a remapping rule's ruleFrom, which matches a whole
// identifier.
func compileRemap(from string) (*regexp.Regexp, error) {
	return regexp.Compile("^(?:" + from + ")$")
}

// iamStrings is a list of strings at key, or a comma-separated string.
func iamStrings(obj map[string]json.RawMessage, key string) []string {
	var list []string
	if json.Unmarshal(obj[key], &list) == nil {
		return list
	}
	for _, v := range strings.Split(iamString(obj, key), ",") {
		if v = strings.TrimSpace(v); v != "" {
			list = append(list, v)
		}
	}
	return list
}

// verifierFor returns the verifier of cfg, made (the issuer's discovery
// document read, or its keys' URL taken as given) if the settings changed.
func (s *Server) verifierFor(cfg ssoConfig) (*oidc.IDTokenVerifier, error) {
	v := &s.sso
	key := verifierKey{cfg.issuer, cfg.clientID, cfg.jwksURI}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.key == key {
		if v.verifier != nil {
			return v.verifier, nil
		}
		if time.Since(v.failedAt) < ssoRetryAfter {
			return nil, v.failure
		}
	}
	// The key set fetches keys long after this call: its context is the
	// server's, bounded per fetch by ssoClient.
	ctx := oidc.ClientContext(context.Background(), ssoClient)
	var verifier *oidc.IDTokenVerifier
	if cfg.jwksURI != "" {
		verifier = oidc.NewVerifier(cfg.issuer, oidc.NewRemoteKeySet(ctx, cfg.jwksURI), &oidc.Config{ClientID: cfg.clientID})
	} else {
		provider, err := oidc.NewProvider(ctx, cfg.issuer)
		if err != nil {
			v.key, v.verifier, v.failedAt, v.failure = key, nil, time.Now(), err
			s.log.Warn().Err(trimmed(err)).Str("issuer", cfg.issuer).Msg("the identity provider's discovery failed")
			return nil, err
		}
		verifier = provider.Verifier(&oidc.Config{ClientID: cfg.clientID})
	}
	v.key, v.verifier, v.failure = key, verifier, nil
	return verifier, nil
}

// trimmed bounds an error's text for a log line: go-oidc puts whole
// response bodies in its errors.
func trimmed(err error) error {
	if msg := err.Error(); len(msg) > 300 {
		return errors.New(msg[:300] + "…")
	}
	return err
}

// errTokenRefused is what a caller is told of a token that is not taken:
// what was wrong goes to the log only (go-oidc's errors may carry what the
// identity provider answered).
func errTokenRefused() error {
	return newAPIError(protocol.CodeUnauthenticated, "Authentication failed",
		"the ID token is not valid for this Fleet Manager (wrong issuer or client, expired, or not signed by the issuer): sign in again")
}

// ssoPrincipal authenticates an ID token; with nonce, the token must carry
// it (the console's sign-in: a token obtained for another sign-in is not
// taken). user is who it names, once known (for the audit of a refusal).
func (s *Server) ssoPrincipal(ctx context.Context, token, nonce string) (p *Principal, user string, err error) {
	cfg, ok := s.ssoConfig()
	if !ok {
		return nil, "", newAPIError(protocol.CodeUnauthenticated, "Authentication failed",
			"single sign-on by OpenID Connect is not enabled (PUT /iam/sso-settings): send an API key as HTTP Basic credentials")
	}
	verifier, err := s.verifierFor(cfg)
	if err != nil {
		return nil, "", unavailable(nil, "the identity provider %s could not be reached; try again shortly", cfg.issuer)
	}
	idt, err := verifier.Verify(ctx, token)
	if err != nil {
		s.log.Info().Err(trimmed(err)).Msg("an ID token was refused")
		return nil, "", errTokenRefused()
	}
	if nonce != "" && !hmac.Equal([]byte(idt.Nonce), []byte(nonce)) {
		s.log.Info().Msg("an ID token of another sign-in (its nonce) was refused")
		return nil, "", errTokenRefused()
	}
	if time.Since(idt.IssuedAt) > ssoMaxAge {
		return nil, "", newAPIError(protocol.CodeUnauthenticated, "Authentication failed", "the ID token was issued more than %s ago: sign in again", ssoMaxAge)
	}
	var claims map[string]any
	if err := idt.Claims(&claims); err != nil {
		return nil, "", errTokenRefused()
	}
	// A token for several audiences is taken only if FM is the party it
	// was given to.
	if len(idt.Audience) > 1 {
		if azp, _ := claims["azp"].(string); azp != cfg.clientID {
			s.log.Info().Msg("an ID token for several audiences, not given to FM (azp), was refused")
			return nil, "", errTokenRefused()
		}
	}
	// An e-mail the user may set, unverified, names nobody.
	if (cfg.idClaim == "email" || cfg.roleClaim == "email") && claims["email_verified"] == false {
		return nil, "", newAPIError(protocol.CodeUnauthenticated, "Authentication failed", "the ID token's e-mail is not verified")
	}
	user, _ = claims[cfg.idClaim].(string)
	if user == "" {
		return nil, "", newAPIError(protocol.CodeUnauthenticated, "Authentication failed", "the ID token has no %s claim to name the user by", cfg.idClaim)
	}
	if cfg.lowercase {
		user = strings.ToLower(user)
	}
	for _, r := range cfg.rules {
		if r.from.MatchString(user) {
			user = r.from.ReplaceAllString(user, r.to)
			break
		}
	}
	groups := claimValues(claims[cfg.roleClaim])
	if len(cfg.authorized) > 0 && !slices.ContainsFunc(groups, func(g string) bool { return slices.Contains(cfg.authorized, g) }) {
		return nil, user, newAPIError(protocol.CodePermissionDenied, "Permission denied",
			"%s is in none of the groups allowed to sign in (authorizedGroups)", user)
	}
	role := cfg.defaultRole
	for _, g := range groups {
		if mapped := cfg.roles[g]; roleRank[mapped] > roleRank[role] {
			role = mapped
		}
	}
	if roleRank[role] == 0 {
		return nil, user, newAPIError(protocol.CodePermissionDenied, "Permission denied",
			"%s signed in, but no role of Fleet Manager is given to them: map one of their %s to a role (fmRoleMappings), or set fmDefaultRole", user, cfg.roleClaim)
	}
	return &Principal{KeyID: ssoPrefix + user, Role: role, until: idt.Expiry}, user, nil
}

// claimValues are a claim's values: a string, or strings in a list.
func claimValues(v any) []string {
	switch x := v.(type) {
	case string:
		return []string{x}
	case []any:
		var out []string
		for _, e := range x {
			if s, ok := e.(string); ok {
				out = append(out, s)
			}
		}
		return out
	}
	return nil
}

// checkIDToken authenticates an ID token (ssoPrincipal) within the limit
// of its address, recording a failure as a wrong key is.
func (s *Server) checkIDToken(r *http.Request, token, nonce string) (*Principal, error) {
	addr := clientAddr(r)
	byAddr, err := s.apiByAddr.reserve(r.Context(), addr)
	if err != nil {
		return nil, limited(err, "too many failed authentications from %s", addr)
	}
	p, user, err := s.ssoPrincipal(r.Context(), token, nonce)
	code := protocol.Code("")
	if err != nil {
		code = asAPIError(err).code
	}
	byAddr.settle(code == protocol.CodeUnauthenticated)
	switch code {
	case protocol.CodeUnauthenticated:
		s.log.Warn().Str("who", "sso").Str("remote", r.RemoteAddr).Msg("authentication failed")
		s.auditAs(r, ssoPrefix+"(unknown)", "", "refused", http.StatusUnauthorized, asAPIError(err))
	case protocol.CodePermissionDenied:
		s.auditAs(r, ssoPrefix+user, "", "refused", http.StatusForbidden, asAPIError(err))
	}
	return p, err
}
