package agent

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/fleetmanager/fm/internal/atomicfile"
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
// port opens the new listener before closing the old. What it serves is
// kept in its folder on the data volume (front.json) with its certificates
// (the self-signed one, ACME's account and certificates): an agent that
// starts serves it again at once, before it converges, and a reprovision
// serves the same certificates. A front that cannot be served for now (a
// port taken) is tried again every frontRetry until it is.
type httpsFront struct {
	log   zerolog.Logger
	dir   string // where its certificates and front.json are kept
	names func() []string
	host  string // the address it listens on ("": every interface)

	mu      sync.Mutex
	closed  bool       // stopped for good: the agent is stopping
	wanted  *frontWant // what it was last asked to serve
	failure error      // why wanted is not served (nil when it is)
	applied string     // key of what is served
	target  *protocol.HTTPSTarget
	tls     *frontListener
	http    *frontListener
	certs   certSource
	handler http.Handler // the TLS side's
	plain   http.Handler // the plain HTTP side's
	// changed is told when the status changes outside a convergence (ACME
	// obtaining its certificate, a retry serving), so that the agent
	// reports it (setChanged, notify).
	changed func()
}

// frontWant is what the front is asked to serve: the target in front of
// DSS's port (a nil target: nothing). It is what front.json keeps.
type frontWant struct {
	Target  *protocol.HTTPSTarget `json:"target"`
	DSSPort int                   `json:"dssPort"`
}

// frontRetry is how often a front not served (a port taken) is tried again,
// and a self-signed certificate's expiry looked at.
const frontRetry = 10 * time.Second

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

func newHTTPSFront(dir string, names func() []string, host string, log zerolog.Logger) *httpsFront {
	return &httpsFront{dir: dir, names: names, host: host, log: log.With().Str("part", "https").Logger(), changed: func() {}}
}

// setChanged sets what notify calls.
func (f *httpsFront) setChanged(fn func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.changed = fn
}

// notify tells that the status changed (not under f.mu).
func (f *httpsFront) notify() {
	f.mu.Lock()
	fn := f.changed
	f.mu.Unlock()
	fn()
}

func (f *httpsFront) wantPath() string { return filepath.Join(f.dir, "front.json") }

// restore serves what the front served when the agent stopped (kept in
// front.json), so that an agent restarted, or a new machine on the same
// data volume, serves DSS over HTTPS while it converges. What fails is
// tried again by run.
func (f *httpsFront) restore() {
	var w frontWant
	b, err := os.ReadFile(f.wantPath())
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	if err == nil {
		err = json.Unmarshal(b, &w)
	}
	if err == nil && w.Target != nil {
		err = w.Target.Validate()
		if err == nil && (w.DSSPort < 1 || w.DSSPort > 65535 || w.DSSPort == w.Target.Port || w.DSSPort == w.Target.HTTPPort) {
			err = fmt.Errorf("DSS's port %d is not one, or the front's", w.DSSPort)
		}
	}
	if err != nil {
		f.log.Warn().Err(err).Msg("the HTTPS front kept is unreadable; it is served again once the desired state says so")
		return
	}
	if _, err := f.apply(w.Target, w.DSSPort); err != nil {
		f.log.Warn().Err(err).Msg("the HTTPS front kept could not be served; trying again")
	}
}

// run tries again, every frontRetry, a front that could not be served for
// now, and makes a self-signed certificate near its expiry again.
func (f *httpsFront) run(ctx context.Context) {
	tick := time.NewTicker(frontRetry)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if f.retry() {
			f.notify()
		}
	}
}

// retry applies again what the front was last asked to serve, if a port
// was not free (Unavailable), or its self-signed certificate (LETSENCRYPT's
// temporary one too) nears its expiry; it reports whether it served.
func (f *httpsFront) retry() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	w := f.wanted
	if w == nil || f.closed {
		return false
	}
	var se *stepError
	again := f.failure != nil && errors.As(f.failure, &se) && se.code == protocol.CodeUnavailable
	switch c := f.certs.(type) {
	case fixedCert:
		if c.source == protocol.CertificateSelfSigned && expiring(c.cert) {
			f.applied, again = "", true // made again by applyLocked
		}
	case *acmeSource:
		if c.tempExpiring() {
			f.applied, again = "", true // made again by certSourceFor
		}
	}
	if !again {
		return false
	}
	_, err := f.applyLocked(w.Target, w.DSSPort)
	f.failure = err
	if err == nil {
		f.keepWanted()
	}
	return err == nil
}

// apply makes the front serve t in front of DSS's port (nothing when t is
// nil). It is idempotent: the same target again changes nothing. Its
// errors are stepErrors: a certificate that is not one fails for good, a
// port not free for now (Unavailable, tried again by run). What it serves
// is kept in front.json.
func (f *httpsFront) apply(t *protocol.HTTPSTarget, dssPort int) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return "", &stepError{step: "https", code: protocol.CodeUnavailable, err: errors.New("the agent is stopping")}
	}
	f.wanted = &frontWant{Target: t, DSSPort: dssPort}
	msg, err := f.applyLocked(t, dssPort)
	f.failure = err
	if err == nil {
		f.keepWanted()
	}
	return msg, err
}

// keepWanted writes what is served to front.json (f.mu held).
func (f *httpsFront) keepWanted() {
	b, err := json.Marshal(f.wanted)
	if err == nil {
		if err = os.MkdirAll(f.dir, 0o700); err == nil {
			err = atomicfile.WriteFile(f.wantPath(), b, 0o600)
		}
	}
	if err != nil {
		f.log.Warn().Err(err).Msg("the HTTPS front served could not be kept; an agent restart serves it once converged")
	}
}

func (f *httpsFront) applyLocked(t *protocol.HTTPSTarget, dssPort int) (string, error) {
	key := frontKey(t, dssPort)
	if key == f.applied {
		return "HTTPS front unchanged", nil
	}
	if t == nil {
		f.stopLocked()
		f.applied = key
		return "no HTTPS front (the network's httpsStrategy is NONE)", nil
	}
	certs, err := f.certSourceFor(t)
	if err != nil {
		return "", err
	}
	abandon := func() {
		if a, ok := certs.(*acmeSource); ok && certs != f.certs {
			a.stop()
		}
	}
	// Listeners first: a port not free leaves what was served as it was.
	tlsL, err := f.listen(f.tls, t.Port, true)
	if err != nil {
		abandon()
		return "", err
	}
	var httpL *frontListener
	if t.HTTPPort != 0 {
		if httpL, err = f.listen(f.http, t.HTTPPort, false); err != nil {
			abandon()
			if tlsL != f.tls {
				_ = tlsL.srv.Close()
			}
			return "", err
		}
	}
	if old, ok := f.certs.(*acmeSource); ok && f.certs != certs {
		old.stop()
	}
	for _, old := range []*frontListener{f.tls, f.http} {
		if old != nil && old != tlsL && old != httpL {
			_ = old.srv.Close()
		}
	}
	started := f.certs == certs
	f.tls, f.http, f.certs, f.target = tlsL, httpL, certs, t
	f.handler = proxyTo(dssPort, f.log)
	f.plain = f.plainHandler(t, certs)
	f.applied = key
	if a, ok := certs.(*acmeSource); ok && !started {
		a.start(f.notify)
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

// current reports whether t (in front of dssPort) is what the front was
// last asked to serve, and serves: then apply has nothing to do.
func (f *httpsFront) current(t *protocol.HTTPSTarget, dssPort int) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	key := frontKey(t, dssPort)
	return f.wanted != nil && frontKey(f.wanted.Target, f.wanted.DSSPort) == key && f.failure == nil &&
		(key == f.applied || t == nil && f.target == nil)
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

// certSourceFor builds the certificates of t's strategy. For LETSENCRYPT
// it keeps the ACME source in place when the CA, the account and the name
// are the same: one autocert manager per certificate, which renews it.
func (f *httpsFront) certSourceFor(t *protocol.HTTPSTarget) (certSource, error) {
	switch t.Strategy {
	case protocol.HTTPSSelfSigned:
		c, err := selfSigned(f.dir, f.names())
		if err != nil {
			return nil, &stepError{step: "https", code: protocol.CodeInternal, err: err}
		}
		return fixedCert{cert: c, source: protocol.CertificateSelfSigned}, nil
	case protocol.HTTPSCustomCertificate:
		c, err := customCert(t.Certificate)
		if err != nil {
			return nil, &stepError{step: "https", code: protocol.CodeInvalidArgument, err: err}
		}
		return fixedCert{cert: c, source: protocol.CertificateCustom}, nil
	case protocol.HTTPSLetsEncrypt:
		names := acmeNames(f.names())
		if cur, ok := f.certs.(*acmeSource); ok && cur.key == acmeKey(t.ACME, names) {
			if cur.tempExpiring() {
				temp, err := selfSigned(f.dir, f.names())
				if err != nil {
					return nil, &stepError{step: "https", code: protocol.CodeInternal, err: err}
				}
				cur.setTemp(temp)
			}
			return cur, nil
		}
		temp, err := selfSigned(f.dir, f.names())
		if err != nil {
			return nil, &stepError{step: "https", code: protocol.CodeInternal, err: err}
		}
		src, err := newACMESource(f.dir, t.ACME, names, temp, f.log)
		if err != nil {
			return nil, &stepError{step: "https", code: protocol.CodeInvalidArgument, err: err}
		}
		return src, nil
	}
	return nil, &stepError{step: "https", code: protocol.CodeInvalidArgument, err: fmt.Errorf("unknown HTTPS strategy %q", t.Strategy)}
}

// listen returns cur if it serves port already, or a new listener on port.
func (f *httpsFront) listen(cur *frontListener, port int, withTLS bool) (*frontListener, error) {
	if cur != nil && cur.port == port {
		return cur, nil
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(f.host, strconv.Itoa(port)))
	if err != nil {
		return nil, &stepError{step: "https", code: protocol.CodeUnavailable, err: fmt.Errorf("port %d: %w", port, err)}
	}
	// A browser refusing a self-signed certificate ends every handshake
	// in an error: worth a debug line, not the log.
	fl := &frontListener{port: port, srv: &http.Server{ReadHeaderTimeout: 30 * time.Second, IdleTimeout: 5 * time.Minute,
		ErrorLog: log.New(debugWriter{f.log}, "", 0)}}
	if withTLS {
		fl.srv.Handler = http.HandlerFunc(f.serveTLS)
		fl.srv.TLSConfig = &tls.Config{GetCertificate: f.getCertificate, MinVersion: tls.VersionTLS12,
			NextProtos: []string{"h2", "http/1.1", acme.ALPNProto}}
		go f.serve(port, func() error { return fl.srv.ServeTLS(ln, "", "") })
	} else {
		fl.srv.Handler = http.HandlerFunc(f.servePlain)
		go f.serve(port, func() error { return fl.srv.Serve(ln) })
	}
	return fl, nil
}

// serve runs a listener's server; one that ends for another reason than
// being closed is logged (the front is tried again by run only when
// apply failed, so this would be a bug).
func (f *httpsFront) serve(port int, fn func() error) {
	if err := fn(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		f.log.Error().Err(err).Int("port", port).Msg("the HTTPS front stopped serving a port")
	}
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
// address, saying they came over HTTPS. Rewrite starts from a request
// without the client's X-Forwarded headers, and Forwarded and X-Real-IP go
// too: DSS is told the address the front saw, not one a client claims.
func proxyTo(dssPort int, log zerolog.Logger) http.Handler {
	target := &url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(dssPort))}
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Header.Del("Forwarded")
			pr.Out.Header.Del("X-Real-Ip")
			pr.SetXForwarded()
			pr.Out.Host = pr.In.Host
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			log.Debug().Err(err).Str("path", r.URL.Path).Msg("DSS did not answer the HTTPS front")
			http.Error(w, "DSS does not answer", http.StatusBadGateway)
		},
	}
}

// status is what the agent reports of the front (nil when none is wanted).
func (f *httpsFront) status() *protocol.HTTPSStatus {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.wanted == nil || f.wanted.Target == nil {
		return nil
	}
	w := f.wanted.Target
	st := &protocol.HTTPSStatus{Strategy: w.Strategy, Port: w.Port}
	if f.failure != nil {
		st.Error = f.failure.Error()
	}
	if f.target != nil && f.certs != nil && f.applied == frontKey(w, f.wanted.DSSPort) {
		st.Serving = true
		var pending string
		st.Certificate, pending = f.certs.describe()
		if st.Error == "" {
			st.Error = pending
		}
	}
	return st
}

// stop closes the front's listeners for good: the agent is stopping.
func (f *httpsFront) stop() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	f.stopLocked()
	f.applied = ""
}

func (f *httpsFront) stopLocked() {
	if a, ok := f.certs.(*acmeSource); ok {
		a.stop()
	}
	for _, l := range []*frontListener{f.tls, f.http} {
		if l != nil {
			_ = l.srv.Close()
		}
	}
	f.tls, f.http, f.certs, f.target, f.handler, f.plain = nil, nil, nil, nil, nil, nil
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

// expiring reports whether a self-signed certificate has less than
// selfSignedRenew left.
func expiring(c *tls.Certificate) bool {
	return c != nil && c.Leaf != nil && time.Until(c.Leaf.NotAfter) < selfSignedRenew
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
