// Package oidctest is a small OpenID Connect provider for tests: its
// discovery document and signing keys served on a loopback port, and ID
// tokens signed (RS256) with whatever claims a test wants. It makes no
// login pages: tests ask it for tokens directly.
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
	"testing"
	"time"
)

// Provider is a running test provider.
type Provider struct {
	// Issuer is its issuer URL (http://127.0.0.1:PORT).
	Issuer string
	key    *rsa.PrivateKey
	keyID  string
}

// Run starts a provider, stopped when the test ends.
func Run(t testing.TB) *Provider {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	p := &Provider{key: key, keyID: "test-key-1"}
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
