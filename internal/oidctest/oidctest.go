// Package oidctest is a small OpenID Connect provider for tests: its
// discovery document and signing keys served on a loopback port, and ID
// tokens signed (RS256) with whatever claims a test wants. Tests ask it
// for tokens directly, or sign a browser in through its authorization
// endpoint (the authorization code flow, with PKCE): it shows no login
// page, and signs in whoever SignInAs named.
//
// Tests of the server (and the web console's, later) import it; nothing
// else may.
package oidctest

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync"
	"testing"
	"time"
)

// Provider is a running test provider.
type Provider struct {
	// Issuer is its issuer URL (http://127.0.0.1:PORT).
	Issuer string
	key    *rsa.PrivateKey
	keyID  string

	mu sync.Mutex
	// next is who the authorization endpoint signs in; codes are the
	// codes handed out, not yet redeemed.
	next  map[string]any
	codes map[string]grant
	// ClientID and ClientSecret are what the token endpoint wants (set
	// before use; "" takes any).
	ClientID, ClientSecret string
}

// grant is what a code stands for.
type grant struct {
	claims                              map[string]any
	clientID, redirectURI, nonce, chall string
}

// SignInAs makes the authorization endpoint sign in a user with claims
// (nil: it refuses, as a user who cancels).
func (p *Provider) SignInAs(claims map[string]any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.next = claims
}

// Run starts a provider, stopped when the test ends.
func Run(t testing.TB) *Provider {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	p := &Provider{key: key, keyID: "test-key-1", codes: map[string]grant{}}
	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	p.Issuer = srv.URL
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, map[string]any{"issuer": p.Issuer, "jwks_uri": p.Issuer + "/jwks",
			"authorization_endpoint": p.Issuer + "/authorize", "token_endpoint": p.Issuer + "/token",
			"response_types_supported": []string{"code"}, "subject_types_supported": []string{"public"},
			"id_token_signing_alg_values_supported": []string{"RS256"}})
	})
	mux.HandleFunc("/authorize", func(w http.ResponseWriter, r *http.Request) { p.authorize(t, w, r) })
	mux.HandleFunc("/token", func(w http.ResponseWriter, r *http.Request) { p.token(t, w, r) })
	mux.HandleFunc("/jwks", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, map[string]any{"keys": []map[string]string{{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": p.keyID,
			"n": b64(key.N.Bytes()), "e": b64(big.NewInt(int64(key.E)).Bytes())}}})
	})
	return p
}

// Token signs an ID token for audience with the standard claims (iss, aud,
// iat, exp an hour on) and claims on top.
func (p *Provider) Token(t testing.TB, audience string, claims map[string]any) string {
	t.Helper()
	all := map[string]any{"iss": p.Issuer, "aud": audience, "iat": time.Now().Unix(), "exp": time.Now().Add(time.Hour).Unix()}
	for k, v := range claims {
		all[k] = v
	}
	return p.sign(t, map[string]any{"alg": "RS256", "typ": "JWT", "kid": p.keyID}, all)
}

// Forged signs claims with another key than the provider's.
func (p *Provider) Forged(t testing.TB, audience string, claims map[string]any) string {
	t.Helper()
	other, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	q := &Provider{Issuer: p.Issuer, key: other, keyID: p.keyID}
	return q.Token(t, audience, claims)
}

func (p *Provider) sign(t testing.TB, header, claims map[string]any) string {
	h, err := json.Marshal(header)
	if err != nil {
		t.Fatal(err)
	}
	c, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	signing := b64(h) + "." + b64(c)
	sum := sha256.Sum256([]byte(signing))
	sig, err := rsa.SignPKCS1v15(rand.Reader, p.key, crypto.SHA256, sum[:])
	if err != nil {
		t.Fatal(err)
	}
	return signing + "." + b64(sig)
}

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

// authorize answers an authorization request: back to its redirect_uri
// with a code for the user SignInAs named, or with access_denied.
func (p *Provider) authorize(t testing.TB, w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	back, err := url.Parse(q.Get("redirect_uri"))
	if err != nil || back.Scheme == "" || q.Get("response_type") != "code" {
		http.Error(w, "bad authorization request", http.StatusBadRequest)
		return
	}
	v := back.Query()
	v.Set("state", q.Get("state"))
	p.mu.Lock()
	claims := p.next
	if claims == nil {
		v.Set("error", "access_denied")
	} else {
		code := rand.Text()
		p.codes[code] = grant{claims: claims, clientID: q.Get("client_id"), redirectURI: q.Get("redirect_uri"),
			nonce: q.Get("nonce"), chall: q.Get("code_challenge")}
		v.Set("code", code)
	}
	p.mu.Unlock()
	back.RawQuery = v.Encode()
	http.Redirect(w, r, back.String(), http.StatusFound)
}

// token redeems a code, once: the client's credentials (HTTP Basic or in
// the form), the same redirect_uri, and the PKCE verifier if a challenge
// was sent.
func (p *Provider) token(t testing.TB, w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil || r.PostForm.Get("grant_type") != "authorization_code" {
		http.Error(w, `{"error":"invalid_request"}`, http.StatusBadRequest)
		return
	}
	id, secret, ok := r.BasicAuth()
	if !ok {
		id, secret = r.PostForm.Get("client_id"), r.PostForm.Get("client_secret")
	}
	p.mu.Lock()
	g, found := p.codes[r.PostForm.Get("code")]
	delete(p.codes, r.PostForm.Get("code"))
	wantID, wantSecret := p.ClientID, p.ClientSecret
	p.mu.Unlock()
	sum := sha256.Sum256([]byte(r.PostForm.Get("code_verifier")))
	switch {
	case !found || g.redirectURI != r.PostForm.Get("redirect_uri") || g.clientID != id:
		w.WriteHeader(http.StatusBadRequest)
		writeJSON(w, map[string]string{"error": "invalid_grant"})
		return
	case (wantID != "" && id != wantID) || (wantSecret != "" && secret != wantSecret):
		w.WriteHeader(http.StatusUnauthorized)
		writeJSON(w, map[string]string{"error": "invalid_client"})
		return
	case g.chall != "" && b64(sum[:]) != g.chall:
		w.WriteHeader(http.StatusBadRequest)
		writeJSON(w, map[string]string{"error": "invalid_grant", "error_description": "PKCE verifier"})
		return
	}
	claims := map[string]any{}
	for k, v := range g.claims {
		claims[k] = v
	}
	if _, set := claims["nonce"]; !set && g.nonce != "" {
		claims["nonce"] = g.nonce // (a test's own nonce stands for a token of another sign-in)
	}
	writeJSON(w, map[string]any{"access_token": rand.Text(), "token_type": "Bearer", "expires_in": 3600,
		"id_token": p.Token(t, g.clientID, claims)})
}
