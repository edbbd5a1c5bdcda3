package server

import (
	"context"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/fleetmanager/fm/internal/atomicfile"
	"github.com/fleetmanager/fm/protocol"
)

// Roles an API key can have.
const (
	RoleAdmin    = "admin"
	RoleOperator = "operator"
	RoleViewer   = "viewer"
)

// apiKey is an API key as stored in fm_apikeys. The secret is kept only as
// a keyed hash (authenticator).
type apiKey struct {
	ID        string     `json:"id"`
	Label     string     `json:"label"`
	Role      string     `json:"role"`
	Hash      string     `json:"hash"`
	CreatedAt time.Time  `json:"createdAt"`
	CreatedBy string     `json:"createdBy"`
	RevokedAt *time.Time `json:"revokedAt,omitempty"`
}

// KeyFile is the JSON shape of a key file, as Dataiku's tooling writes them.
type KeyFile struct {
	ID     string `json:"id"`
	Secret string `json:"secret"`
}

// Principal is the authenticated caller of a request.
type Principal struct {
	// KeyID is the API key's id, or "sso:<user>" for a person signed in
	// by SSO (sso.go).
	KeyID string
	Role  string
	// until is when an SSO principal's ID token expires (zero for a
	// key): a console session it starts ends then.
	until time.Time
}

// who names the principal on the audit trail: "key:<id>", or "sso:<user>".
func (p *Principal) who() string {
	if strings.HasPrefix(p.KeyID, ssoPrefix) {
		return p.KeyID
	}
	return "key:" + p.KeyID
}

// isViewer reports whether the request's caller only has the viewer role.
func isViewer(r *http.Request) bool {
	p := principalFrom(r.Context())
	return p == nil || !p.may(RoleOperator)
}

// redacted stands for a secret a viewer may not see ("" stays "").
func redacted(secret string) string {
	if secret == "" {
		return ""
	}
	return "(redacted)"
}

// roleRank orders the roles: each may do what those below it may.
var roleRank = map[string]int{RoleViewer: 1, RoleOperator: 2, RoleAdmin: 3}

// may reports whether the principal's role covers role.
func (p *Principal) may(role string) bool { return roleRank[p.Role] >= roleRank[role] }

type principalKey struct{}

func principalFrom(ctx context.Context) *Principal {
	p, _ := ctx.Value(principalKey{}).(*Principal)
	return p
}

// An API key's secret is stored as an HMAC-SHA-256 of the key id and the
// secret, keyed with a key derived from the server's secret key. Secrets are
// 40 random characters (238 bits), so a slow hash adds nothing against
// guessing them, and checking one costs a microsecond rather than the
// tenth of a second PBKDF2 cost on every failed attempt; without the
// server's secret key a copy of fm_apikeys gives nothing to test a guess
// against.
//
// FMs before this one stored PBKDF2-SHA256 hashes ("pbkdf2-sha256$..."):
// such a key still authenticates, and is stored as an HMAC after its first
// success.
const (
	macPrefix    = "hmac-sha256$"
	pbkdf2Prefix = "pbkdf2-sha256$"
	// macLabel derives the HMAC key from the server's secret key: a label
	// of its own, so that key serves nothing else.
	macLabel = "fm api key secret hmac v1"
)

// checkPBKDF2 checks secret against a hash an older FM stored.
func checkPBKDF2(encoded, secret string) bool {
	parts := strings.Split(encoded, "$")
	if len(parts) != 4 || parts[0]+"$" != pbkdf2Prefix {
		return false
	}
	iter, err := strconv.Atoi(parts[1])
	if err != nil || iter < 1 {
		return false
	}
	salt, err1 := base64.RawStdEncoding.DecodeString(parts[2])
	want, err2 := base64.RawStdEncoding.DecodeString(parts[3])
	if err1 != nil || err2 != nil {
		return false
	}
	got, err := pbkdf2.Key(sha256.New, secret, salt, iter, len(want))
	return err == nil && hmac.Equal(got, want)
}

// authenticator checks HTTP Basic credentials against fm_apikeys.
type authenticator struct {
	keys *table[apiKey]
	key  []byte   // the HMAC key
	none [32]byte // what a key id that does not exist is checked against
}

func newAuthenticator(keys *table[apiKey], secretKey []byte) (*authenticator, error) {
	k, err := hkdf.Key(sha256.New, secretKey, nil, macLabel, 32)
	if err != nil {
		return nil, fmt.Errorf("derive the API key hashing key: %w", err)
	}
	a := &authenticator{keys: keys, key: k}
	if _, err := rand.Read(a.none[:]); err != nil {
		return nil, fmt.Errorf("random: %w", err)
	}
	return a, nil
}

// mac is the HMAC of a key id and its secret.
func (a *authenticator) mac(id, secret string) []byte {
	m := hmac.New(sha256.New, a.key)
	m.Write([]byte(id))
	m.Write([]byte{0})
	m.Write([]byte(secret))
	return m.Sum(nil)
}

// hash is the stored form of a key's secret.
func (a *authenticator) hash(id, secret string) string {
	return macPrefix + base64.RawStdEncoding.EncodeToString(a.mac(id, secret))
}

var errBadCredentials = errors.New("bad credentials")

// authenticate checks a key id and secret. Whether the key id exists, is
// revoked or not, and the secret right or not, the same work is done (an
// HMAC and a constant-time comparison), so that the time taken does not
// tell one from another; only a key an older FM stored costs its PBKDF2
// as well. For such a key, legacy is the revision of fm_apikeys the secret
// was checked at, for rehash; 0 otherwise.
func (a *authenticator) authenticate(id, secret string) (p *Principal, legacy uint64, err error) {
	got := a.mac(id, secret)
	k, rev, known := a.keys.get(id)
	want := a.none[:]
	if enc, ok := strings.CutPrefix(k.Hash, macPrefix); known && ok {
		if w, err := base64.RawStdEncoding.DecodeString(enc); err == nil {
			want = w
		}
	}
	match := hmac.Equal(got, want) && known
	if known && strings.HasPrefix(k.Hash, pbkdf2Prefix) {
		match = checkPBKDF2(k.Hash, secret)
		if match && k.RevokedAt == nil {
			legacy = rev
		}
	}
	if !match || k.RevokedAt != nil {
		return nil, 0, errBadCredentials
	}
	return &Principal{KeyID: id, Role: k.Role}, legacy, nil
}

// rehash stores, as an HMAC, the secret of a key an older FM stored with
// PBKDF2, once the secret checked out at revision rev. The write is
// revision-checked, so that a key revoked or rehashed meanwhile is left as
// it is; a failure is only logged (the key keeps working, at PBKDF2's cost,
// and the next success tries again).
func (s *Server) rehash(ctx context.Context, id, secret string, rev uint64) {
	k, cur, ok := s.st.keys.get(id)
	if !ok || cur != rev || !strings.HasPrefix(k.Hash, pbkdf2Prefix) {
		return
	}
	k.Hash = s.auth.hash(id, secret)
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if _, err := s.st.keys.update(ctx, id, k, rev); errors.Is(err, errConflict) {
		s.log.Info().Str("key", id).Msg("API key changed while its hash was being upgraded; left as it is")
	} else if err != nil {
		s.log.Warn().Err(err).Str("key", id).Msg("API key hash not upgraded from PBKDF2; it is tried again at its next use")
	} else {
		s.log.Info().Str("key", id).Msg("API key hash upgraded from PBKDF2 to HMAC-SHA-256")
	}
}

// forwardedFor makes the request's remote address the client's, as the
// load balancer in trusted (Config.TrustedProxies) that sent the request
// reports it in X-Forwarded-For: behind a balancer every request comes from
// its address, and the limits on failed attempts (and the audit trail) must
// count clients, not the balancer. One hop only: the client is the
// rightmost address of the header, which the balancer itself appended.
// Walking further left would let a client whose own address is in a trusted
// network (a machine in the balancer's VPC) name any address it likes. An
// entry that is not an address (with a port or not) leaves the request
// counted as the balancer's; so does one with a zone, or anything long.
func forwardedFor(trusted []netip.Prefix, next http.Handler) http.Handler {
	if len(trusted) == 0 {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		peer, err := netip.ParseAddrPort(r.RemoteAddr)
		if err != nil || !slices.ContainsFunc(trusted, func(p netip.Prefix) bool { return p.Contains(peer.Addr().Unmap()) }) {
			next.ServeHTTP(w, r)
			return
		}
		values := r.Header.Values("X-Forwarded-For")
		if len(values) == 0 {
			next.ServeHTTP(w, r)
			return
		}
		last := values[len(values)-1]
		last = strings.TrimSpace(last[strings.LastIndexByte(last, ',')+1:])
		a, err := netip.ParseAddr(last)
		if ap, perr := netip.ParseAddrPort(last); err != nil && perr == nil {
			a, err = ap.Addr(), nil // some proxies add the client's port
		}
		if len(last) > 64 || err != nil || a.Zone() != "" {
			next.ServeHTTP(w, r)
			return
		}
		r2 := r.Clone(r.Context())
		r2.RemoteAddr = netip.AddrPortFrom(a.Unmap(), 0).String()
		next.ServeHTTP(w, r2)
	})
}

// clientAddr is the host part of the request's remote address (the
// client's, behind a trusted load balancer: forwardedFor).
func clientAddr(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// requireAuth lets a request through only with a valid API key. Its
// attempt is counted by client address and by key id (attemptLimiter); a
// client or key id that failed too often recently is refused without
// checking.
func (s *Server) requireAuth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok {
			// A person signed in by SSO (sso.go).
			p, err := s.checkIDToken(r, strings.TrimSpace(token), "")
			if err != nil {
				if asAPIError(err).code == protocol.CodeUnauthenticated {
					w.Header().Set("WWW-Authenticate", `Bearer realm="fleet-manager"`)
				}
				s.writeError(w, r, err)
				return
			}
			next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), principalKey{}, p)))
			return
		}
		id, secret, ok := r.BasicAuth()
		if _, cookie := s.sessionCookieOf(r); !ok && r.Header.Get("Authorization") == "" && cookie {
			// The web console's session (consolesession.go). No
			// WWW-Authenticate: a browser would answer it with its own
			// sign-in dialog.
			if s.refuseCrossOrigin(w, r) {
				return
			}
			p, _, err := s.sessionFrom(r, true)
			if err != nil {
				s.writeError(w, r, err)
				return
			}
			next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), principalKey{}, p)))
			return
		}
		if !ok {
			w.Header().Set("WWW-Authenticate", `Basic realm="fleet-manager"`)
			s.writeError(w, r, newAPIError(protocol.CodeUnauthenticated, "Authentication required",
				"send an API key as HTTP Basic credentials (key id as user, secret as password)"))
			return
		}
		p, legacy, err := s.checkKey(r, id, secret)
		if err != nil {
			if asAPIError(err).code == protocol.CodeUnauthenticated {
				w.Header().Set("WWW-Authenticate", `Basic realm="fleet-manager"`)
			}
			s.writeError(w, r, err)
			return
		}
		if legacy != 0 {
			s.rehash(r.Context(), id, secret, legacy)
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), principalKey{}, p)))
	})
}

// checkKey authenticates a request's key within the limits of its address
// and key id, and records a failure.
func (s *Server) checkKey(r *http.Request, id, secret string) (*Principal, uint64, error) {
	addr := clientAddr(r)
	byAddr, err := s.apiByAddr.reserve(r.Context(), addr)
	if err != nil {
		return nil, 0, limited(err, "too many failed authentications from %s", addr)
	}
	byKey, lerr := s.apiByKey.reserve(r.Context(), keyIDSlot(id))
	p, legacy, err := s.auth.authenticate(id, secret)
	byAddr.settle(err != nil)
	if lerr != nil {
		// Past the key id's limit only guesses are refused: key ids are
		// no secret (a viewer sees them), and whoever knows one must not
		// lock its holder out. A check costs microseconds.
		if err == nil {
			return p, legacy, nil
		}
		return nil, 0, limited(lerr, "too many failed authentications with this key id")
	}
	byKey.settle(err != nil)
	if err == nil {
		return p, legacy, nil
	}
	// Only a known key id is recorded: what was typed as an id may be a
	// secret.
	who := "key:(unknown)"
	if _, _, known := s.st.keys.get(id); known {
		who = "key:" + id
	}
	s.log.Warn().Str("who", who).Str("remote", r.RemoteAddr).Msg("authentication failed")
	e := newAPIError(protocol.CodeUnauthenticated, "Authentication failed",
		"the API key id or secret is wrong, or the key was revoked")
	s.auditAs(r, who, "", "refused", http.StatusUnauthorized, e)
	return nil, 0, e
}

// randomToken returns n random characters from [A-Za-z0-9].
func randomToken(n int) string {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, n)
	// rand.Text would do for secrets, but ids must also be subject tokens of
	// a fixed length; rejection sampling keeps the characters uniform.
	buf := make([]byte, 1)
	for i := 0; i < n; {
		if _, err := rand.Read(buf); err != nil {
			panic(fmt.Sprintf("crypto/rand failed: %v", err))
		}
		if int(buf[0]) < 256-256%len(alphabet) {
			b[i] = alphabet[int(buf[0])%len(alphabet)]
			i++
		}
	}
	return string(b)
}

// createKey stores a new API key and returns its secret, which is never
// stored or shown again.
func (s *Server) createKey(ctx context.Context, label, role, createdBy string) (KeyFile, error) {
	kf := KeyFile{ID: randomToken(24), Secret: randomToken(40)}
	now := time.Now().UTC()
	k := apiKey{ID: kf.ID, Label: label, Role: role, Hash: s.auth.hash(kf.ID, kf.Secret), CreatedAt: now, CreatedBy: createdBy}
	if _, err := s.st.keys.create(ctx, k.ID, k); err != nil {
		return KeyFile{}, fmt.Errorf("store key: %w", err)
	}
	return kf, nil
}

// EnsureAdminKey creates an admin API key and writes it to path (mode 0600)
// if path does not exist yet. Deleting the file and restarting is how an
// operator who lost it gets a new admin key; the old one stays valid until
// revoked. It reports whether a key was created.
func (s *Server) EnsureAdminKey(ctx context.Context, path string) (bool, error) {
	if _, err := os.Stat(path); err == nil {
		return false, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return false, fmt.Errorf("admin key file: %w", err)
	}
	if err := s.st.keys.waitSynced(ctx); err != nil {
		return false, err
	}
	kf, err := s.createKey(ctx, "initial admin key", RoleAdmin, "fm")
	if err != nil {
		return false, err
	}
	b, _ := json.MarshalIndent(kf, "", "  ")
	if err := atomicfile.WriteFile(path, append(b, '\n'), 0o600); err != nil {
		return false, fmt.Errorf("write admin key file: %w", err)
	}
	s.log.Info().Str("key", kf.ID).Str("file", path).Msg("created the admin API key")
	return true, nil
}
