package server

import (
	"context"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
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

// apiKey is an API key as stored in fm_apikeys. The secret is kept only as a
// slow salted hash.
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
	KeyID string
	Role  string
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

// PBKDF2 with SHA-256 at OWASP's recommended work factor, so that a stolen
// fm_apikeys bucket does not give the secrets away. The factor is stored in
// each hash; Config.KeyHashIterations only sets it for new keys.
const (
	DefaultKeyHashIterations = 600_000
	hashPrefix               = "pbkdf2-sha256"
)

func hashSecret(secret string, iterations int) (string, error) {
	salt := make([]byte, 16)
	if _, err := rand.Read(salt); err != nil {
		return "", err
	}
	dk, err := pbkdf2.Key(sha256.New, secret, salt, iterations, 32)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%s$%d$%s$%s", hashPrefix, iterations,
		base64.RawStdEncoding.EncodeToString(salt), base64.RawStdEncoding.EncodeToString(dk)), nil
}

func checkSecret(encoded, secret string) bool {
	parts := strings.Split(encoded, "$")
	if len(parts) != 4 || parts[0] != hashPrefix {
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
	return err == nil && subtle.ConstantTimeCompare(got, want) == 1
}

// authenticator checks HTTP Basic credentials against fm_apikeys. A slow hash
// on every request would make polling clients pay ~100 ms per call, so a
// secret that verified once is remembered, as its SHA-256, for a few minutes.
type authenticator struct {
	keys *table[apiKey]
	ttl  time.Duration

	mu       sync.Mutex
	verified map[string]verifiedSecret
}

type verifiedSecret struct {
	digest  [32]byte
	hash    string // the stored hash it was checked against
	expires time.Time
}

var errBadCredentials = errors.New("bad credentials")

// forget drops a remembered secret (the key was revoked).
func (a *authenticator) forget(id string) {
	a.mu.Lock()
	delete(a.verified, id)
	a.mu.Unlock()
}

func (a *authenticator) authenticate(id, secret string) (*Principal, error) {
	k, _, ok := a.keys.get(id)
	if !ok || k.RevokedAt != nil {
		return nil, errBadCredentials
	}
	digest := sha256.Sum256([]byte(secret))
	now := time.Now()
	a.mu.Lock()
	v, hit := a.verified[id]
	a.mu.Unlock()
	if hit && v.hash == k.Hash && now.Before(v.expires) && subtle.ConstantTimeCompare(v.digest[:], digest[:]) == 1 {
		return &Principal{KeyID: id, Role: k.Role}, nil
	}
	if !checkSecret(k.Hash, secret) {
		return nil, errBadCredentials
	}
	a.mu.Lock()
	a.verified[id] = verifiedSecret{digest: digest, hash: k.Hash, expires: now.Add(a.ttl)}
	a.mu.Unlock()
	return &Principal{KeyID: id, Role: k.Role}, nil
}

// Failed authentications allowed per client address in a window, before
// its requests are refused outright until the window has passed.
const (
	maxAuthFailures   = 10
	authFailureWindow = time.Minute
)

// failureLimiter counts failed authentications per client address.
type failureLimiter struct {
	mu       sync.Mutex
	failures map[string][]time.Time
}

func (l *failureLimiter) blocked(addr string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.recent(addr)) >= maxAuthFailures
}

func (l *failureLimiter) fail(addr string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.failures[addr] = append(l.recent(addr), time.Now())
	if len(l.failures) > 10000 {
		// Bound the memory: forget addresses whose failures are old.
		for a := range l.failures {
			if len(l.recent(a)) == 0 {
				delete(l.failures, a)
			}
		}
	}
}

func (l *failureLimiter) recent(addr string) []time.Time {
	if l.failures == nil {
		l.failures = map[string][]time.Time{}
	}
	cutoff := time.Now().Add(-authFailureWindow)
	kept := l.failures[addr][:0]
	for _, t := range l.failures[addr] {
		if t.After(cutoff) {
			kept = append(kept, t)
		}
	}
	l.failures[addr] = kept
	return kept
}

// clientAddr is the host part of the request's remote address.
func clientAddr(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// requireAuth lets a request through only with a valid API key. A client
// that failed too often recently is refused without checking.
func (s *Server) requireAuth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		addr := clientAddr(r)
		if s.limiter.blocked(addr) {
			w.Header().Set("Retry-After", strconv.Itoa(int(authFailureWindow.Seconds())))
			s.writeError(w, r, newAPIError(protocol.CodeResourceExhausted, "Too many failed attempts",
				"too many failed authentications from %s; wait a minute", addr))
			return
		}
		id, secret, ok := r.BasicAuth()
		if !ok {
			w.Header().Set("WWW-Authenticate", `Basic realm="fleet-manager"`)
			s.writeError(w, r, newAPIError(protocol.CodeUnauthenticated, "Authentication required",
				"send an API key as HTTP Basic credentials (key id as user, secret as password)"))
			return
		}
		p, err := s.auth.authenticate(id, secret)
		if err != nil {
			s.limiter.fail(addr)
			w.Header().Set("WWW-Authenticate", `Basic realm="fleet-manager"`)
			// Only a known key id is recorded: what was typed as an id may
			// be a secret.
			who := "key:(unknown)"
			if _, _, known := s.st.keys.get(id); known {
				who = "key:" + id
			}
			s.log.Warn().Str("who", who).Str("remote", r.RemoteAddr).Msg("authentication failed")
			e := newAPIError(protocol.CodeUnauthenticated, "Authentication failed",
				"the API key id or secret is wrong, or the key was revoked")
			s.auditAs(r, who, "", "refused", http.StatusUnauthorized, e)
			s.writeError(w, r, e)
			return
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), principalKey{}, p)))
	})
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
	h, err := hashSecret(kf.Secret, s.cfg.KeyHashIterations)
	if err != nil {
		return KeyFile{}, fmt.Errorf("hash key secret: %w", err)
	}
	now := time.Now().UTC()
	k := apiKey{ID: kf.ID, Label: label, Role: role, Hash: h, CreatedAt: now, CreatedBy: createdBy}
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
