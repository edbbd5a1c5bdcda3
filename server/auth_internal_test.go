package server

import (
	"crypto/pbkdf2"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/seal"
)

// keysTable is a copy of fm_apikeys with no bucket behind it, for the
// authenticator alone.
func keysTable(keys ...apiKey) *table[apiKey] {
	t := &table[apiKey]{items: map[string]row[apiKey]{}, changed: make(chan struct{})}
	for i, k := range keys {
		t.items[k.ID] = row[apiKey]{val: k, rev: uint64(i + 1)}
	}
	return t
}

func pbkdf2Hash(t testing.TB, secret string) string {
	salt := []byte("0123456789abcdef")
	dk, err := pbkdf2.Key(sha256.New, secret, salt, 1000, 32)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("pbkdf2-sha256$1000$%s$%s", base64.RawStdEncoding.EncodeToString(salt), base64.RawStdEncoding.EncodeToString(dk))
}

// TestAuthenticate: what a key id and secret authenticate, and which keys
// are to be stored again as an HMAC.
func TestAuthenticate(t *testing.T) {
	secretKey := seal.NewKey()
	a, err := newAuthenticator(nil, secretKey)
	if err != nil {
		t.Fatal(err)
	}
	other, err := newAuthenticator(nil, seal.NewKey())
	if err != nil {
		t.Fatal(err)
	}
	revoked := time.Now()
	a.keys = keysTable(
		apiKey{ID: "current", Role: RoleViewer, Hash: a.hash("current", "s1")},
		apiKey{ID: "revoked", Role: RoleViewer, Hash: a.hash("revoked", "s2"), RevokedAt: &revoked},
		apiKey{ID: "legacy", Role: RoleOperator, Hash: pbkdf2Hash(t, "s3")},
		apiKey{ID: "legacyrevoked", Role: RoleOperator, Hash: pbkdf2Hash(t, "s4"), RevokedAt: &revoked},
		// Another key's hash: a hash is bound to its key id.
		apiKey{ID: "copied", Role: RoleAdmin, Hash: a.hash("current", "s1")},
		// Hashed with another server's secret key.
		apiKey{ID: "foreign", Role: RoleAdmin, Hash: other.hash("foreign", "s5")},
		apiKey{ID: "garbled", Role: RoleAdmin, Hash: "hmac-sha256$!!"},
	)
	for _, c := range []struct {
		id, secret string
		ok         bool
		legacy     uint64
	}{
		{"current", "s1", true, 0},
		{"current", "s1x", false, 0},
		{"current", "", false, 0},
		{"unknown", "s1", false, 0},
		{"revoked", "s2", false, 0},
		{"legacy", "s3", true, 3},
		{"legacy", "s3x", false, 0},
		{"legacyrevoked", "s4", false, 0},
		{"copied", "s1", false, 0},
		{"foreign", "s5", false, 0},
		{"garbled", "", false, 0},
	} {
		t.Run(c.id+":"+c.secret, func(t *testing.T) {
			p, legacy, err := a.authenticate(c.id, c.secret)
			if (err == nil) != c.ok || legacy != c.legacy {
				t.Fatalf("got %+v %d %v; want ok %v, legacy %d", p, legacy, err, c.ok, c.legacy)
			}
			if c.ok {
				k, _, _ := a.keys.get(c.id)
				if p.KeyID != c.id || p.Role != k.Role {
					t.Fatalf("principal %+v", p)
				}
			}
		})
	}
}

// BenchmarkAuthenticate: a key id that does not exist, or was revoked,
// costs what a known one does (an HMAC), so that timing does not tell them
// apart; only a key stored by an older FM (PBKDF2) costs more, until its
// first success.
func BenchmarkAuthenticate(b *testing.B) {
	a, err := newAuthenticator(nil, seal.NewKey())
	if err != nil {
		b.Fatal(err)
	}
	revoked := time.Now()
	a.keys = keysTable(
		apiKey{ID: "current", Role: RoleViewer, Hash: a.hash("current", "secret")},
		apiKey{ID: "revoked", Role: RoleViewer, Hash: a.hash("revoked", "secret"), RevokedAt: &revoked},
		apiKey{ID: "legacy", Role: RoleViewer, Hash: pbkdf2Hash(b, "secret")},
	)
	for _, c := range []struct{ name, id, secret string }{
		{"right secret", "current", "secret"},
		{"wrong secret", "current", "wrong"},
		{"unknown id", "unknown", "secret"},
		{"revoked", "revoked", "secret"},
		{"legacy 1000 iterations", "legacy", "wrong"},
	} {
		b.Run(c.name, func(b *testing.B) {
			for b.Loop() {
				_, _, _ = a.authenticate(c.id, c.secret)
			}
		})
	}
}

// TestForwardedFor: behind a trusted load balancer the client is the
// rightmost address of X-Forwarded-For, the one the balancer appended; from
// anywhere else the header is ignored, and so is anything left of it.
func TestForwardedFor(t *testing.T) {
	trusted := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("192.0.2.1/32")}
	cases := []struct {
		name, peer string
		xff        []string
		want       string
	}{
		{"not from a proxy: the header is ignored", "203.0.113.9:4000", []string{"1.2.3.4"}, "203.0.113.9"},
		{"from a proxy", "192.0.2.1:4000", []string{"1.2.3.4"}, "1.2.3.4"},
		{"what the client wrote itself is left of what the proxy saw", "192.0.2.1:4000", []string{"6.6.6.6, 1.2.3.4"}, "1.2.3.4"},
		{"a client in a trusted network names no one else", "10.1.2.3:4000", []string{"203.0.113.66, 10.0.5.5"}, "10.0.5.5"},
		{"headers in turn: the last one's last entry", "10.1.2.3:4000", []string{"6.6.6.6", "1.2.3.4,7.7.7.7"}, "7.7.7.7"},
		{"an IPv6 client", "10.1.2.3:4000", []string{"2001:db8::7"}, "2001:db8::7"},
		{"an IPv4-mapped client", "10.1.2.3:4000", []string{"::ffff:1.2.3.4"}, "1.2.3.4"},
		{"a zone: the proxy's own", "10.1.2.3:4000", []string{"fe80::1%" + strings.Repeat("z", 300)}, "10.1.2.3"},
		{"with a port", "10.1.2.3:4000", []string{"1.2.3.4:5678"}, "1.2.3.4"},
		{"IPv6 with a port", "10.1.2.3:4000", []string{"[2001:db8::7]:5678"}, "2001:db8::7"},
		{"unreadable: the proxy's own", "10.1.2.3:4000", []string{"1.2.3.4, not-an-address"}, "10.1.2.3"},
		{"no header: the proxy's own", "10.1.2.3:4000", nil, "10.1.2.3"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var got string
			h := forwardedFor(trusted, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { got = clientAddr(r) }))
			r := httptest.NewRequest("GET", "/", nil)
			r.RemoteAddr = c.peer
			for _, v := range c.xff {
				r.Header.Add("X-Forwarded-For", v)
			}
			h.ServeHTTP(httptest.NewRecorder(), r)
			if got != c.want {
				t.Fatalf("client %q, want %q", got, c.want)
			}
		})
	}
	// Without trusted proxies the header is never read.
	r := httptest.NewRequest("GET", "/", nil)
	r.RemoteAddr, r.Header["X-Forwarded-For"] = "10.1.2.3:4000", []string{"1.2.3.4"}
	var got string
	forwardedFor(nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { got = clientAddr(r) })).ServeHTTP(httptest.NewRecorder(), r)
	if got != "10.1.2.3" {
		t.Fatalf("without trusted proxies: client %q", got)
	}
}
