package agent

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/fleetmanager/fm/internal/atomicfile"
	"github.com/fleetmanager/fm/protocol"
	"github.com/rs/zerolog"
	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"
)

// selfSignedLife is how long a self-signed certificate is made for; one
// with less than selfSignedRenew left is made again.
const (
	selfSignedLife  = 365 * 24 * time.Hour
	selfSignedRenew = 30 * 24 * time.Hour
)

// selfSigned returns the machine's self-signed certificate, kept in dir,
// made again only when it lacks one of the names the machine is given
// (its DNS names, localhost, the loopback addresses) or expires soon: the
// same certificate across agent restarts and reprovisions, so that a
// browser's exception for it holds. The machine's host name and addresses
// are named too when it is made, but a change of them (a new machine's,
// an interface come up) does not make it again.
func selfSigned(dir string, names []string) (*tls.Certificate, error) {
	required, requiredIPs := wantedNames(names)
	path := filepath.Join(dir, "self-signed.pem")
	if b, err := os.ReadFile(path); err == nil {
		if c, err := tls.X509KeyPair(b, b); err == nil && covers(c.Leaf, required, requiredIPs) &&
			time.Until(c.Leaf.NotAfter) > selfSignedRenew {
			return &c, nil
		}
	}
	dnsNames, ips := required, requiredIPs
	if h, err := os.Hostname(); err == nil && validHostname(h) && !slices.Contains(dnsNames, strings.ToLower(h)) {
		dnsNames = append(dnsNames, strings.ToLower(h))
	}
	ips = append(ips, machineAddresses(ips)...)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return nil, err
	}
	cn := dnsNames[0]
	now := time.Now()
	tpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: cn, Organization: []string{"Fleet Manager (self-signed)"}},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(selfSignedLife),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: dnsNames, IPAddresses: ips, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, tpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	b := append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})...)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if err := atomicfile.WriteFile(path, b, 0o600); err != nil {
		return nil, fmt.Errorf("keep the self-signed certificate: %w", err)
	}
	c, err := tls.X509KeyPair(b, b)
	if err != nil {
		return nil, err
	}
	return &c, nil
}

// wantedNames is what a self-signed certificate must name: the machine's
// DNS names, localhost, and the loopback addresses.
func wantedNames(names []string) ([]string, []net.IP) {
	var dnsNames []string
	for _, n := range append(slices.Clone(names), "localhost") {
		n = strings.ToLower(strings.TrimSuffix(n, "."))
		if n != "" && net.ParseIP(n) == nil && !slices.Contains(dnsNames, n) {
			dnsNames = append(dnsNames, n)
		}
	}
	return dnsNames, []net.IP{net.IPv4(127, 0, 0, 1).To4(), net.IPv6loopback}
}

// machineAddresses are the machine's own addresses (not loopback or link
// local) that have is without.
func machineAddresses(have []net.IP) []net.IP {
	var out []net.IP
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil
	}
	for _, a := range addrs {
		ipn, ok := a.(*net.IPNet)
		if !ok || ipn.IP.IsLoopback() || ipn.IP.IsLinkLocalUnicast() {
			continue
		}
		ip := ipn.IP
		if v4 := ip.To4(); v4 != nil {
			ip = v4
		}
		if !slices.ContainsFunc(have, ip.Equal) && !slices.ContainsFunc(out, ip.Equal) {
			out = append(out, ip)
		}
	}
	return out
}

// covers reports whether leaf names every one of dnsNames and ips.
func covers(leaf *x509.Certificate, dnsNames []string, ips []net.IP) bool {
	if leaf == nil {
		return false
	}
	for _, n := range dnsNames {
		if !slices.Contains(leaf.DNSNames, n) {
			return false
		}
	}
	for _, ip := range ips {
		if !slices.ContainsFunc(leaf.IPAddresses, ip.Equal) {
			return false
		}
	}
	return true
}

// customCert is the instance's own certificate: its chain and private key
// in one PEM text (sslCertificatePEM).
func customCert(text string) (*tls.Certificate, error) {
	c, err := tls.X509KeyPair([]byte(text), []byte(text))
	if err != nil {
		return nil, fmt.Errorf("the instance's certificate (sslCertificatePEM) is not a certificate chain with its private key: %w", err)
	}
	return &c, nil
}

// acmeNames is the name ACME is asked to certify: the machine's first DNS
// name with a dot (its public zone's record when it has one: the one a CA
// can reach), none when it has none. Asking for the others too would have
// a CA that cannot reach a private name fail the order again and again.
func acmeNames(names []string) []string {
	for _, n := range names {
		n = strings.ToLower(strings.TrimSuffix(n, "."))
		if strings.Contains(n, ".") && net.ParseIP(n) == nil && validHostname(n) {
			return []string{n}
		}
	}
	return nil
}

// acmeSource serves certificates an ACME CA issued for the machine's name
// (autocert keeps them in the front's folder and renews them), and the
// temporary self-signed certificate until the CA has issued one: a
// handshake never waits for the CA.
type acmeSource struct {
	key     string // acmeKey: what makes another source
	manager *autocert.Manager
	names   []string
	log     zerolog.Logger
	state   string // the file of its attempts (acmeAttempts)
	ctx     context.Context
	cancel  context.CancelFunc

	mu    sync.Mutex
	temp  *tls.Certificate // served until the CA issued the name's
	ready map[string]bool  // per name, once the CA issued its certificate
	err   string           // why a name has none yet
}

func (s *acmeSource) tempExpiring() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return expiring(s.temp)
}

func (s *acmeSource) setTemp(c *tls.Certificate) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.temp = c
}

func (s *acmeSource) tempCert() *tls.Certificate {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.temp
}

// acmeBackoff is how long the front waits after its nth failed attempt in
// a row to obtain a certificate: 2, 5 and 15 minutes, then an hour
// doubling to a day. A CA counts failed validations per name and account
// (Let's Encrypt: 5 an hour, then a pause to be lifted by hand after many
// days of them): a name a CA cannot reach must not be asked for more often.
// (autocert answers a failed name from memory for a minute: sooner would
// be an attempt that never reaches the CA.)
func acmeBackoff(n int) time.Duration {
	switch {
	case n <= 1:
		return 2 * time.Minute
	case n == 2:
		return 5 * time.Minute
	case n == 3:
		return 15 * time.Minute
	}
	return min(time.Hour<<min(n-4, 5), 24*time.Hour)
}

// acmeAttempts is kept beside the CA's account (acme-attempts.json), so that
// an agent restarted does not ask again before its time.
type acmeAttempts struct {
	Failures int       `json:"failures"`
	Next     time.Time `json:"next"`
}

// acmeKey identifies an ACME source: its CA, account and names.
func acmeKey(t *protocol.ACMETarget, names []string) string {
	return t.DirectoryURL + "\x00" + t.Email + "\x00" + t.CACert + "\x00" + strings.Join(names, ",")
}

func newACMESource(dir string, t *protocol.ACMETarget, names []string, temp *tls.Certificate, log zerolog.Logger) (*acmeSource, error) {
	transport := &http.Transport{Proxy: http.ProxyFromEnvironment, TLSClientConfig: &tls.Config{MinVersion: tls.VersionTLS12}}
	if t.CACert != "" {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM([]byte(t.CACert)) {
			return nil, errors.New("the ACME server's CA certificate is not PEM")
		}
		transport.TLSClientConfig.RootCAs = pool
	}
	ctx, cancel := context.WithCancel(context.Background())
	// autocert cannot be stopped (a call runs on with a context of its
	// own, a manager renews what it loaded for good): a source stopped
	// talks to the CA no more, as its client refuses to.
	client := &acme.Client{DirectoryURL: t.DirectoryURL, UserAgent: "fm-agent",
		HTTPClient: &http.Client{Timeout: time.Minute, Transport: stoppable{ctx: ctx, next: transport}}}
	// The account and certificates of one CA are kept apart from another's:
	// a change of directory starts afresh.
	cache := filepath.Join(dir, "acme", cacheFolder(t.DirectoryURL))
	s := &acmeSource{key: acmeKey(t, names), names: names, temp: temp, log: log, ready: map[string]bool{},
		state: filepath.Join(cache, "acme-attempts.json"), ctx: ctx, cancel: cancel}
	s.manager = &autocert.Manager{
		Prompt: autocert.AcceptTOS, Email: t.Email, Client: client,
		Cache: autocert.DirCache(cache), HostPolicy: autocert.HostWhitelist(names...),
	}
	if len(names) == 0 {
		s.err = "no DNS name to obtain a certificate for: LETSENCRYPT needs the network's dnsStrategy " +
			"VN_SPECIFIC_CLOUD_DNS_SERVICE with a public zone; a temporary self-signed certificate is served"
	}
	return s, nil
}

// cacheFolder is a file-name-safe name for an ACME directory URL, unique
// to it.
func cacheFolder(directory string) string {
	var b strings.Builder
	for _, c := range strings.TrimPrefix(directory, "https://") {
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-' {
			b.WriteRune(c)
		} else {
			b.WriteByte('_')
		}
	}
	sum := sha256.Sum256([]byte(directory))
	return b.String() + "-" + hex.EncodeToString(sum[:4])
}

// start obtains the certificates in the background; changed is called
// when what describe says changes.
func (s *acmeSource) start(changed func()) { go s.obtain(changed) }

// stop ends start's work, and the source's talks with the CA: autocert
// cannot be stopped, and a manager no longer used would renew what it
// loaded for good (its timer stays, its client refuses).
func (s *acmeSource) stop() { s.cancel() }

// ecdsaHello is a handshake's hello naming name and taking ECDSA: what
// nearly every client sends. The front obtains and serves the ECDSA
// certificate only, so that no handshake has autocert order another.
func ecdsaHello(name string) *tls.ClientHelloInfo {
	return &tls.ClientHelloInfo{ServerName: name, SignatureSchemes: []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256},
		SupportedCurves: []tls.CurveID{tls.CurveP256}, CipherSuites: []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256}}
}

// obtain asks the CA for each name's certificate until it has them all (or
// stop), waiting after each failure as acmeBackoff says, from the end of
// the failed attempt, whatever the file of attempts says. An attempt is
// counted before it is made, in that file, which outlives the agent, so
// that neither a restart nor a crash during an order asks again before its
// time. A certificate still valid in the cache is looked for first,
// without waiting (autocert serves it without the CA, and renews it).
func (s *acmeSource) obtain(changed func()) {
	for _, name := range s.names {
		att := s.attempts()
		cached := s.cachedValid(name)
		for s.ctx.Err() == nil {
			if !cached && att.Failures > 0 && time.Now().Before(att.Next) {
				s.mu.Lock()
				s.err = fmt.Sprintf("%d attempts to obtain a certificate for %s failed (a temporary self-signed certificate is served; trying again at %s)",
					att.Failures, name, att.Next.UTC().Format(time.RFC3339))
				s.mu.Unlock()
				changed()
				select {
				case <-s.ctx.Done():
					return
				case <-time.After(time.Until(att.Next)):
				}
			}
			cached = false
			att.Failures++
			att.Next = time.Now().Add(acmeBackoff(att.Failures))
			s.keepAttempts(att)
			c, err := s.manager.GetCertificate(ecdsaHello(name))
			if s.ctx.Err() != nil {
				return
			}
			if err == nil && c.Leaf != nil {
				s.mu.Lock()
				s.ready[name], s.err = true, ""
				s.mu.Unlock()
				_ = os.Remove(s.state)
				s.log.Info().Str("name", name).Time("not_after", c.Leaf.NotAfter).Msg("ACME certificate served")
				changed()
				break
			}
			att.Next = time.Now().Add(acmeBackoff(att.Failures))
			s.keepAttempts(att)
			s.mu.Lock()
			s.err = fmt.Sprintf("obtaining a certificate for %s: %v (a temporary self-signed certificate is served; trying again at %s)",
				name, err, att.Next.UTC().Format(time.RFC3339))
			s.mu.Unlock()
			s.log.Warn().Err(err).Str("name", name).Time("retry_at", att.Next).Msg("ACME certificate not obtained")
			changed()
		}
	}
}

// attempts reads the attempts kept; a next attempt further than a day
// ahead (a clock stepped back, a file damaged) is a day ahead.
func (s *acmeSource) attempts() acmeAttempts {
	var att acmeAttempts
	if b, err := os.ReadFile(s.state); err == nil && json.Unmarshal(b, &att) != nil {
		att = acmeAttempts{}
	}
	if limit := time.Now().Add(24 * time.Hour); att.Next.After(limit) {
		att.Next = limit
	}
	return att
}

func (s *acmeSource) keepAttempts(att acmeAttempts) {
	b, err := json.Marshal(att)
	if err == nil {
		if err = os.MkdirAll(filepath.Dir(s.state), 0o700); err == nil {
			err = atomicfile.WriteFile(s.state, b, 0o600)
		}
	}
	if err != nil {
		s.log.Warn().Err(err).Msg("the ACME attempts could not be kept")
	}
}

// cachedValid reports whether autocert's cache holds name's certificate,
// valid for a day more at least.
func (s *acmeSource) cachedValid(name string) bool {
	b, err := s.manager.Cache.Get(s.ctx, name)
	if err != nil {
		return false
	}
	for rest := b; ; {
		var blk *pem.Block
		if blk, rest = pem.Decode(rest); blk == nil {
			return false
		}
		if blk.Type == "CERTIFICATE" {
			c, err := x509.ParseCertificate(blk.Bytes)
			return err == nil && time.Until(c.NotAfter) > 24*time.Hour
		}
	}
}

// stoppable is an http.RoundTripper that refuses once its context ended.
type stoppable struct {
	ctx  context.Context
	next http.RoundTripper
}

func (t stoppable) RoundTrip(r *http.Request) (*http.Response, error) {
	if err := t.ctx.Err(); err != nil {
		return nil, fmt.Errorf("this ACME source was stopped: %w", err)
	}
	return t.next.RoundTrip(r.WithContext(mergedContext(r.Context(), t.ctx)))
}

// mergedContext ends when either ends.
func mergedContext(a, b context.Context) context.Context {
	ctx, cancel := context.WithCancel(a)
	stop := context.AfterFunc(b, cancel)
	context.AfterFunc(ctx, func() { stop() })
	return ctx
}

func (s *acmeSource) get(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	if len(hello.SupportedProtos) == 1 && hello.SupportedProtos[0] == acme.ALPNProto {
		// A tls-alpn-01 challenge, as autocert tells one (only then does
		// it not look for, or order, a certificate).
		return s.manager.GetCertificate(hello)
	}
	name := strings.ToLower(strings.TrimSuffix(hello.ServerName, "."))
	if c := s.served(name); c != nil {
		return c, nil
	}
	return s.tempCert(), nil
}

// served is the certificate autocert holds for name (renewed there), nil
// before the CA issued it.
func (s *acmeSource) served(name string) *tls.Certificate {
	s.mu.Lock()
	ok := s.ready[name]
	s.mu.Unlock()
	if !ok {
		return nil
	}
	c, err := s.manager.GetCertificate(ecdsaHello(name))
	if err != nil {
		return nil
	}
	return c
}

func (s *acmeSource) describe() (*protocol.CertificateInfo, string) {
	s.mu.Lock()
	pending := s.err
	s.mu.Unlock()
	if len(s.names) > 0 {
		if c := s.served(s.names[0]); c != nil {
			return describeCert(c, protocol.CertificateACME), pending
		}
	}
	return describeCert(s.tempCert(), protocol.CertificateTemporary), pending
}
