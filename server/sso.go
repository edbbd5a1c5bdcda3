package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

// Single sign-on for FM's own users by OpenID Connect: when the SSO
// settings enable the OPENID protocol, a request may carry, instead of an
// API key, "Authorization: Bearer <ID token>" from the settings' issuer for
// their client. The token is verified (signature by the issuer's keys,
// issuer, audience, expiry) with go-oidc; the user is its identifier claim
// (remapped by the settings' rules), and the role the first of FM's role
// mappings that one of its group claim's values names, the highest if
// several do (fmRoleClaim, fmRoleMappings, fmDefaultRole: FM's keys in the
// settings). The web console signs people in the same way.

// ssoPrefix begins the principal id of a person signed in by SSO: no API
// key id has a colon.
const ssoPrefix = "sso:"

// ssoConfig is what verifying and mapping a token needs, from the settings.
type ssoConfig struct {
	issuer, clientID, jwksURI string
	idClaim                   string
	lowercase                 bool
	rules                     []remapRule
	roleClaim                 string
	roles                     map[string]string
	defaultRole               string
}

type remapRule struct {
	from *regexp.Regexp
	to   string
}

// key says which settings a verifier was made for.
func (c ssoConfig) key() string { return c.issuer + "|" + c.clientID + "|" + c.jwksURI }

// ssoVerifiers keeps the verifier of the settings in force: made once
// (the issuer's discovery document read), again when they change.
type ssoVerifiers struct {
	mu       sync.Mutex
	key      string
	verifier *oidc.IDTokenVerifier
}

// ssoConfig reads the SSO settings; false if OpenID sign-in is off.
func (s *Server) ssoConfig() (ssoConfig, bool) {
	doc, _, ok := s.st.settings.get(settingsKey(api.DefaultTenant, iamSettings["sso-settings"].setting))
	if !ok || doc.IAM == nil || !iamEnabled(doc.IAM) || iamString(doc.IAM, "protocol") != "OPENID" {
		return ssoConfig{}, false
	}
	var p struct {
		ClientID            string `json:"clientId"`
		Issuer              string `json:"issuer"`
		JWKSURI             string `json:"jwksUri"`
		ClaimKeyIdentifier  string `json:"claimKeyIdentifier"`
		LowercaseIdentifier bool   `json:"lowercaseIdentifier"`
		ClaimKeyGroups      string `json:"claimKeyGroups"`
	}
	_ = json.Unmarshal(doc.IAM["openIDParams"], &p)
	cfg := ssoConfig{issuer: p.Issuer, clientID: p.ClientID, jwksURI: p.JWKSURI, idClaim: p.ClaimKeyIdentifier,
		lowercase: p.LowercaseIdentifier, roleClaim: iamString(doc.IAM, "fmRoleClaim"), defaultRole: iamString(doc.IAM, "fmDefaultRole")}
	defaultString(&cfg.idClaim, "sub")
	defaultString(&cfg.roleClaim, p.ClaimKeyGroups)
	defaultString(&cfg.roleClaim, "groups")
	_ = json.Unmarshal(doc.IAM["fmRoleMappings"], &cfg.roles)
	var rules []struct{ RuleFrom, RuleTo string }
	_ = json.Unmarshal(doc.IAM["remappingRules"], &rules)
	for _, r := range rules {
		if re, err := regexp.Compile("^(?:" + r.RuleFrom + ")$"); err == nil {
			cfg.rules = append(cfg.rules, remapRule{from: re, to: r.RuleTo})
		}
	}
	return cfg, cfg.issuer != "" && cfg.clientID != ""
}

// verifierFor returns the verifier of cfg, made (the issuer's discovery
// document read, or its keys' URL taken as given) if the settings changed.
func (v *ssoVerifiers) verifierFor(ctx context.Context, cfg ssoConfig) (*oidc.IDTokenVerifier, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.verifier != nil && v.key == cfg.key() {
		return v.verifier, nil
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var verifier *oidc.IDTokenVerifier
	if cfg.jwksURI != "" {
		// Keys fetched later outlive this call: their context is not it.
		keys := oidc.NewRemoteKeySet(context.WithoutCancel(ctx), cfg.jwksURI)
		verifier = oidc.NewVerifier(cfg.issuer, keys, &oidc.Config{ClientID: cfg.clientID})
	} else {
		provider, err := oidc.NewProvider(oidc.ClientContext(dctx, http.DefaultClient), cfg.issuer)
		if err != nil {
			return nil, fmt.Errorf("discover the identity provider %s: %w", cfg.issuer, err)
		}
		verifier = provider.Verifier(&oidc.Config{ClientID: cfg.clientID})
	}
	v.key, v.verifier = cfg.key(), verifier
	return verifier, nil
}

// ssoPrincipal authenticates an ID token.
func (s *Server) ssoPrincipal(ctx context.Context, token string) (*Principal, error) {
	cfg, ok := s.ssoConfig()
	if !ok {
		return nil, newAPIError(protocol.CodeUnauthenticated, "Authentication failed",
			"single sign-on by OpenID Connect is not enabled (PUT /iam/sso-settings): send an API key as HTTP Basic credentials")
	}
	verifier, err := s.sso.verifierFor(ctx, cfg)
	if err != nil {
		return nil, unavailable(err, "the identity provider could not be reached")
	}
	idt, err := verifier.Verify(ctx, token)
	if err != nil {
		var expired *oidc.TokenExpiredError
		if errors.As(err, &expired) {
			return nil, newAPIError(protocol.CodeUnauthenticated, "Authentication failed", "the ID token expired: sign in again")
		}
		return nil, newAPIError(protocol.CodeUnauthenticated, "Authentication failed", "the ID token is not valid for this Fleet Manager: %v", err)
	}
	var claims map[string]any
	if err := idt.Claims(&claims); err != nil {
		return nil, newAPIError(protocol.CodeUnauthenticated, "Authentication failed", "the ID token's claims do not decode")
	}
	user, _ := claims[cfg.idClaim].(string)
	if user == "" {
		return nil, newAPIError(protocol.CodeUnauthenticated, "Authentication failed", "the ID token has no %s claim to name the user by", cfg.idClaim)
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
	role := cfg.defaultRole
	for _, v := range claimValues(claims[cfg.roleClaim]) {
		if mapped := cfg.roles[v]; roleRank[mapped] > roleRank[role] {
			role = mapped
		}
	}
	if roleRank[role] == 0 {
		return nil, newAPIError(protocol.CodePermissionDenied, "Permission denied",
			"%s signed in, but no role of Fleet Manager is given to them: map one of their %s to a role (fmRoleMappings), or set fmDefaultRole", user, cfg.roleClaim)
	}
	return &Principal{KeyID: ssoPrefix + user, Role: role}, nil
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

// checkBearer authenticates an ID token within the limit of its address,
// recording a failure as a wrong key is.
func (s *Server) checkBearer(r *http.Request, token string) (*Principal, error) {
	addr := clientAddr(r)
	byAddr, err := s.apiByAddr.reserve(r.Context(), addr)
	if err != nil {
		return nil, limited(err, "too many failed authentications from %s", addr)
	}
	p, err := s.ssoPrincipal(r.Context(), token)
	failed := err != nil && asAPIError(err).code == protocol.CodeUnauthenticated
	byAddr.settle(failed)
	if failed {
		s.log.Warn().Str("who", "sso").Str("remote", r.RemoteAddr).Msg("authentication failed")
		s.auditAs(r, "sso:(unknown)", "", "refused", http.StatusUnauthorized, asAPIError(err))
	}
	return p, err
}
