package agent

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
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
// made again when it lacks one of the machine's names or addresses or
// expires soon: the same certificate across agent restarts and
// reprovisions, so that a browser's exception for it holds.
func selfSigned(dir string, names []string) (*tls.Certificate, error) {
	dnsNames, ips := sansOf(names)
	path := filepath.Join(dir, "self-signed.pem")
	if b, err := os.ReadFile(path); err == nil {
		if c, err := tls.X509KeyPair(b, b); err == nil && covers(c.Leaf, dnsNames, ips) &&
			time.Until(c.Leaf.NotAfter) > selfSignedRenew {
			return &c, nil
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return nil, err
	}
	cn := "DSS"
	if len(dnsNames) > 0 {
		cn = dnsNames[0]
	}
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

// sansOf is what a self-signed certificate names: the machine's names,
// its host name, localhost, and its addresses.
func sansOf(names []string) ([]string, []net.IP) {
	var dnsNames []string
	add := func(n string) {
		n = strings.ToLower(strings.TrimSuffix(n, "."))
		if n != "" && net.ParseIP(n) == nil && !slices.Contains(dnsNames, n) {
			dnsNames = append(dnsNames, n)
		}
	}
	for _, n := range names {
		add(n)
	}
	if h, err := os.Hostname(); err == nil && validHostname(h) {
		add(h)
	}
	add("localhost")
	ips := []net.IP{net.IPv4(127, 0, 0, 1).To4(), net.IPv6loopback}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			ipn, ok := a.(*net.IPNet)
			if !ok || ipn.IP.IsLoopback() || ipn.IP.IsLinkLocalUnicast() {
				continue
			}
			ip := ipn.IP
			if v4 := ip.To4(); v4 != nil {
				ip = v4
			}
			if !slices.ContainsFunc(ips, ip.Equal) {
				ips = append(ips, ip)
			}
		}
	}
	return dnsNames, ips
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

// acmeSource serves certificates an ACME CA issued for the machine's names
// (autocert keeps them in the front's folder and renews them), and the
// temporary self-signed certificate until the CA has issued one: a
// handshake never waits for the CA.
type acmeSource struct {
	manager *autocert.Manager
	names   []string
	temp    *tls.Certificate
	log     zerolog.Logger
	start   func() // starts obtain

	mu    sync.Mutex
	ready map[string]*tls.Certificate // per name, once the CA issued it
	err   string                      // why a name has none yet
}

// acmeRetryMax bounds the wait between two attempts to obtain a certificate.
var acmeRetryMax = 10 * time.Minute

func newACMESource(dir string, t *protocol.ACMETarget, names []string, temp *tls.Certificate, log zerolog.Logger) (*acmeSource, error) {
	client := &acme.Client{DirectoryURL: t.DirectoryURL, UserAgent: "fm-agent"}
	if t.CACert != "" {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM([]byte(t.CACert)) {
			return nil, errors.New("the ACME server's CA certificate is not PEM")
		}
		client.HTTPClient = &http.Client{Timeout: time.Minute, Transport: &http.Transport{
			Proxy: http.ProxyFromEnvironment, TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}}
	}
	s := &acmeSource{names: names, temp: temp, log: log, ready: map[string]*tls.Certificate{}}
	s.manager = &autocert.Manager{
		Prompt: autocert.AcceptTOS, Email: t.Email, Client: client,
		// The account and certificates of one CA are kept apart from
		// another's: a change of directory starts afresh.
		Cache:      autocert.DirCache(filepath.Join(dir, "acme", cacheFolder(t.DirectoryURL))),
		HostPolicy: autocert.HostWhitelist(names...),
	}
	if len(names) == 0 {
		s.err = "no DNS name to obtain a certificate for: LETSENCRYPT needs the network's dnsStrategy " +
			"VN_SPECIFIC_CLOUD_DNS_SERVICE with a public zone; a temporary self-signed certificate is served"
	}
	return s, nil
}

// cacheFolder is a file-name-safe name for an ACME directory URL.
func cacheFolder(directory string) string {
	var b strings.Builder
	for _, c := range strings.TrimPrefix(directory, "https://") {
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-' {
			b.WriteRune(c)
		} else {
			b.WriteByte('_')
		}
	}
	return b.String()
}

// obtain asks the CA for each name's certificate until it has them all (or
// ctx ends), waiting longer after each failure; autocert renews them from
// then on. changed is called when what describe says changes.
func (s *acmeSource) obtain(ctx context.Context, changed func()) {
	wait := 5 * time.Second
	for _, name := range s.names {
		for ctx.Err() == nil {
			// A hello that takes ECDSA: what nearly every client sends,
			// so that handshakes find the certificate autocert keeps.
			hello := &tls.ClientHelloInfo{ServerName: name, SignatureSchemes: []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256},
				SupportedCurves: []tls.CurveID{tls.CurveP256}, CipherSuites: []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256}}
			c, err := s.manager.GetCertificate(hello)
			if err == nil {
				s.mu.Lock()
				s.ready[name], s.err = c, ""
				s.mu.Unlock()
				s.log.Info().Str("name", name).Msg("ACME certificate obtained")
				changed()
				break
			}
			if ctx.Err() != nil {
				return
			}
			s.mu.Lock()
			s.err = fmt.Sprintf("obtaining a certificate for %s: %v (a temporary self-signed certificate is served; trying again in %s)", name, err, wait)
			s.mu.Unlock()
			s.log.Warn().Err(err).Str("name", name).Dur("retry_in", wait).Msg("ACME certificate not obtained; retrying")
			changed()
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
			wait = min(2*wait, acmeRetryMax)
		}
	}
}

func (s *acmeSource) get(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	if slices.Contains(hello.SupportedProtos, acme.ALPNProto) {
		return s.manager.GetCertificate(hello) // a tls-alpn-01 challenge
	}
	name := strings.ToLower(strings.TrimSuffix(hello.ServerName, "."))
	s.mu.Lock()
	_, ok := s.ready[name]
	s.mu.Unlock()
	if ok {
		// From autocert's memory (renewed there), not the copy kept above.
		if c, err := s.manager.GetCertificate(hello); err == nil {
			return c, nil
		}
	}
	return s.temp, nil
}

func (s *acmeSource) describe() (*protocol.CertificateInfo, string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.names) > 0 {
		if c, ok := s.ready[s.names[0]]; ok {
			if c.Leaf == nil && len(c.Certificate) > 0 {
				c.Leaf, _ = x509.ParseCertificate(c.Certificate[0])
			}
			return describeCert(c, protocol.CertificateACME), s.err
		}
	}
	return describeCert(s.temp, protocol.CertificateTemporary), s.err
}
