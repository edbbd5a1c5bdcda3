package agent

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/rs/zerolog"
	"golang.org/x/crypto/acme"
)

// httpsFront serves DSS over HTTPS, as nginx does in front of DSS on
// Dataiku's own images: it terminates TLS on the target's port and passes
// each request to DSS's base port on the loopback address, with the
// X-Forwarded headers DSS reads; on the plain HTTP port it answers with a
// redirect to HTTPS and serves ACME's HTTP challenges.
//
// Its listeners stay open across changes of certificate or DSS port (the
// certificate source and the handler are swapped under them); a change of
// port opens the new listener before closing the old. It keeps nothing but
// its certificates (the self-signed one, ACME's account and certificates),
// on the data volume, so that a reprovision serves the same ones.
type httpsFront struct {
	log   zerolog.Logger
	dir   string // where its certificates are kept
	names func() []string

	mu       sync.Mutex
	applied  string // digest of the target (and DSS port) in place
	target   *protocol.HTTPSTarget
	tls      *frontListener
	http     *frontListener
	certs    certSource
	handler  http.Handler // the TLS side's
	plain    http.Handler // the plain HTTP side's
	stopACME context.CancelFunc
	// changed is told when the status changes (ACME obtaining its
	// certificate), so that the agent reports it.
	changed func()
}

// frontListener is one of the front's servers and the port it serves.
type frontListener struct {
	port int
	srv  *http.Server
}

// certSource gives the certificate for a handshake and describes what a
// client asking for the machine's first name gets.
type certSource interface {
	get(hello *tls.ClientHelloInfo) (*tls.Certificate, error)
	describe() (*protocol.CertificateInfo, string)
}

func newHTTPSFront(dir string, names func() []string, log zerolog.Logger) *httpsFront {
	return &httpsFront{dir: dir, names: names, log: log.With().Str("part", "https").Logger(), changed: func() {}}
}

// apply makes the front serve t in front of DSS's port (nothing when t is
// nil). It is idempotent: the same target again changes nothing. Its
// errors are stepErrors: a certificate that is not one fails for good, a
// port not free for now (Unavailable).
func (f *httpsFront) apply(t *protocol.HTTPSTarget, dssPort int) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	key := frontKey(t, dssPort)
	if key == f.applied {
		return "HTTPS front unchanged", nil
	}
	if t == nil {
		f.stopLocked()
		f.applied = key
		return "no HTTPS front (the network's httpsStrategy is NONE)", nil
	}
	certs, stopACME, err := f.certSourceFor(t)
	if err != nil {
		return "", err
	}
	// Listeners first: a port not free leaves what was served as it was.
	tlsL, err := f.listen(f.tls, t.Port, true)
	if err != nil {
		stopACME()
		return "", err
	}
	var httpL *frontListener
	if t.HTTPPort != 0 {
		if httpL, err = f.listen(f.http, t.HTTPPort, false); err != nil {
			stopACME()
			if tlsL != f.tls {
				_ = tlsL.srv.Close()
			}
			return "", err
		}
	}
	if f.stopACME != nil {
		f.stopACME()
	}
	for _, old := range []*frontListener{f.tls, f.http} {
		if old != nil && old != tlsL && old != httpL {
			_ = old.srv.Close()
		}
	}
	f.tls, f.http, f.certs, f.stopACME, f.target = tlsL, httpL, certs, stopACME, t
	f.handler = proxyTo(dssPort)
	f.plain = f.plainHandler(t, certs)
	f.applied = key
	if a, ok := certs.(*acmeSource); ok {
		a.start()
	}
	info, _ := certs.describe()
	msg := fmt.Sprintf("DSS served over HTTPS on port %d (%s certificate", t.Port, info.Source)
	if len(info.DNSNames) > 0 {
		msg += " for " + strings.Join(info.DNSNames, ", ")
	}
	msg += ")"
	if t.HTTPPort != 0 {
		if t.Redirect {
			msg += fmt.Sprintf("; HTTP on port %d redirects to it", t.HTTPPort)
		} else {
			msg += fmt.Sprintf("; HTTP on port %d answers ACME's challenges only", t.HTTPPort)
		}
	}
	f.log.Info().Str("strategy", t.Strategy).Int("port", t.Port).Int("http_port", t.HTTPPort).Msg("HTTPS front serving")
	return msg, nil
}

// current reports whether t (in front of dssPort) is what the front
// serves already; no front at all is current for a nil t.
func (f *httpsFront) current(t *protocol.HTTPSTarget, dssPort int) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	key := frontKey(t, dssPort)
	return key == f.applied || t == nil && f.target == nil
}

// frontKey identifies what apply was asked to serve.
func frontKey(t *protocol.HTTPSTarget, dssPort int) string {
	if t == nil {
		return "none"
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%d\x00%d\x00%t\x00%s\x00%d", t.Strategy, t.Port, t.HTTPPort, t.Redirect, t.Certificate, dssPort)
	if a := t.ACME; a != nil {
		fmt.Fprintf(h, "\x00%s\x00%s\x00%s", a.DirectoryURL, a.Email, a.CACert)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// certSourceFor builds the certificates of t's strategy; for LETSENCRYPT it
// starts obtaining them (stopped by the returned function).
func (f *httpsFront) certSourceFor(t *protocol.HTTPSTarget) (certSource, context.CancelFunc, error) {
	noop := func() {}
	switch t.Strategy {
	case protocol.HTTPSSelfSigned:
		c, err := selfSigned(f.dir, f.names())
		if err != nil {
			return nil, nil, &stepError{step: "https", code: protocol.CodeInternal, err: err}
		}
		return fixedCert{cert: c, source: protocol.CertificateSelfSigned}, noop, nil
	case protocol.HTTPSCustomCertificate:
		c, err := customCert(t.Certificate)
		if err != nil {
			return nil, nil, &stepError{step: "https", code: protocol.CodeInvalidArgument, err: err}
		}
		return fixedCert{cert: c, source: protocol.CertificateCustom}, noop, nil
	case protocol.HTTPSLetsEncrypt:
		temp, err := selfSigned(f.dir, f.names())
		if err != nil {
			return nil, nil, &stepError{step: "https", code: protocol.CodeInternal, err: err}
		}
		src, err := newACMESource(f.dir, t.ACME, acmeNames(f.names()), temp, f.log)
		if err != nil {
			return nil, nil, &stepError{step: "https", code: protocol.CodeInvalidArgument, err: err}
		}
		// Obtaining starts once the front serves the source (apply): the
		// CA's challenges come to its ports.
		ctx, cancel := context.WithCancel(context.Background())
		src.start = func() { go src.obtain(ctx, func() { f.changed() }) }
		return src, cancel, nil
	}
	return nil, nil, &stepError{step: "https", code: protocol.CodeInvalidArgument, err: fmt.Errorf("unknown HTTPS strategy %q", t.Strategy)}
}

// listen returns cur if it serves port already, or a new listener on port.
func (f *httpsFront) listen(cur *frontListener, port int, withTLS bool) (*frontListener, error) {
	if cur != nil && cur.port == port {
		return cur, nil
	}
	ln, err := net.Listen("tcp", ":"+strconv.Itoa(port))
	if err != nil {
		return nil, &stepError{step: "https", code: protocol.CodeUnavailable, err: fmt.Errorf("port %d: %w", port, err)}
	}
	fl := &frontListener{port: port}
	if withTLS {
		fl.srv = &http.Server{Handler: http.HandlerFunc(f.serveTLS), ReadHeaderTimeout: 30 * time.Second,
			TLSConfig: &tls.Config{GetCertificate: f.getCertificate, MinVersion: tls.VersionTLS12,
				NextProtos: []string{"h2", "http/1.1", acme.ALPNProto}},
			// A browser refusing a self-signed certificate ends every
			// handshake in an error: worth a debug line, not the log.
			ErrorLog: log.New(debugWriter{f.log}, "", 0)}
		go func() { _ = fl.srv.ServeTLS(ln, "", "") }()
	} else {
		fl.srv = &http.Server{Handler: http.HandlerFunc(f.servePlain), ReadHeaderTimeout: 30 * time.Second, ErrorLog: log.New(debugWriter{f.log}, "", 0)}
		go func() { _ = fl.srv.Serve(ln) }()
	}
	return fl, nil
}

func (f *httpsFront) getCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	f.mu.Lock()
	certs := f.certs
	f.mu.Unlock()
	if certs == nil {
		return nil, errors.New("no certificate")
	}
	return certs.get(hello)
}

func (f *httpsFront) serveTLS(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	h := f.handler
	f.mu.Unlock()
	if h == nil {
		http.Error(w, "DSS is not served here", http.StatusServiceUnavailable)
		return
	}
	h.ServeHTTP(w, r)
}

func (f *httpsFront) servePlain(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	h := f.plain
	f.mu.Unlock()
	if h == nil {
		http.NotFound(w, r)
		return
	}
	h.ServeHTTP(w, r)
}

// plainHandler is the HTTP port's: ACME's challenges when certs obtains
// them, then a redirect to HTTPS (REDIRECT) or a refusal.
func (f *httpsFront) plainHandler(t *protocol.HTTPSTarget, certs certSource) http.Handler {
	var h http.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "DSS is served over HTTPS only", http.StatusForbidden)
	})
	if t.Redirect {
		h = redirectToHTTPS(t.Port)
	}
	if a, ok := certs.(*acmeSource); ok {
		challenges := a.manager.HTTPHandler(h)
		// autocert checks the Host header, port included, against its
		// names: a CA validating on a port other than 80 (the local
		// backend's) names it.
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if host, _, err := net.SplitHostPort(r.Host); err == nil {
				r.Host = host
			}
			challenges.ServeHTTP(w, r)
		})
	}
	return h
}

// redirectToHTTPS sends a client to the same host and path over HTTPS.
func redirectToHTTPS(port int) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host := r.Host
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
		host = strings.Trim(host, "[]")
		if host == "" || strings.ContainsAny(host, "/\\@?#% ") {
			http.Error(w, "a Host header is required", http.StatusBadRequest)
			return
		}
		if strings.Contains(host, ":") {
			host = "[" + host + "]"
		}
		if port != 443 {
			host += ":" + strconv.Itoa(port)
		}
		u := url.URL{Scheme: "https", Host: host, Path: r.URL.Path, RawPath: r.URL.RawPath, RawQuery: r.URL.RawQuery}
		http.Redirect(w, r, u.String(), http.StatusMovedPermanently)
	})
}

// proxyTo passes requests (websockets included) to DSS on the loopback
// address, saying they came over HTTPS.
func proxyTo(dssPort int) http.Handler {
	target := &url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(dssPort))}
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.SetXForwarded()
			pr.Out.Host = pr.In.Host
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			http.Error(w, "DSS does not answer", http.StatusBadGateway)
		},
	}
}

// status is what the agent reports of the front (nil when none).
func (f *httpsFront) status() *protocol.HTTPSStatus {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.target == nil {
		return nil
	}
	st := &protocol.HTTPSStatus{Strategy: f.target.Strategy, Port: f.target.Port, Serving: f.tls != nil}
	st.Certificate, st.Error = f.certs.describe()
	return st
}

// stop closes the front's listeners (the agent is stopping, or HTTPS was
// turned off).
func (f *httpsFront) stop() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.stopLocked()
	f.applied = ""
}

func (f *httpsFront) stopLocked() {
	if f.stopACME != nil {
		f.stopACME()
	}
	for _, l := range []*frontListener{f.tls, f.http} {
		if l != nil {
			_ = l.srv.Close()
		}
	}
	f.tls, f.http, f.certs, f.stopACME, f.target, f.handler, f.plain = nil, nil, nil, nil, nil, nil, nil
}

// fixedCert is one certificate for every handshake.
type fixedCert struct {
	cert   *tls.Certificate
	source string
}

func (c fixedCert) get(*tls.ClientHelloInfo) (*tls.Certificate, error) { return c.cert, nil }

func (c fixedCert) describe() (*protocol.CertificateInfo, string) {
	return describeCert(c.cert, c.source), ""
}

func describeCert(c *tls.Certificate, source string) *protocol.CertificateInfo {
	if c == nil || c.Leaf == nil {
		return &protocol.CertificateInfo{Source: source}
	}
	return &protocol.CertificateInfo{Source: source, Subject: c.Leaf.Subject.String(), Issuer: c.Leaf.Issuer.String(),
		DNSNames: c.Leaf.DNSNames, NotAfter: c.Leaf.NotAfter.UTC().Format(time.RFC3339)}
}

// debugWriter writes what a standard logger is given as debug lines.
type debugWriter struct{ log zerolog.Logger }

func (w debugWriter) Write(p []byte) (int, error) {
	w.log.Debug().Msg(strings.TrimSpace(string(p)))
	return len(p), nil
}
