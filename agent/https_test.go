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
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/acmetest"
	"github.com/fleetmanager/fm/protocol"
	"github.com/rs/zerolog"
)

// standInDSS answers every request with what it was asked and how it came.
func standInDSS(t *testing.T) int {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "dss host=%s path=%s proto=%s", r.Host, r.URL.Path, r.Header.Get("X-Forwarded-Proto"))
	}))
	t.Cleanup(srv.Close)
	u, _ := url.Parse(srv.URL)
	port, _ := strconv.Atoi(u.Port())
	return port
}

// getOver fetches path from 127.0.0.1:port over HTTPS as serverName,
// trusting roots (PEM) only, and returns the body and the chain served.
func getOver(t *testing.T, port int, serverName, roots, path string) (string, []*x509.Certificate, error) {
	t.Helper()
	pool := x509.NewCertPool()
	if roots != "" && !pool.AppendCertsFromPEM([]byte(roots)) {
		t.Fatal("roots are not PEM")
	}
	var chain []*x509.Certificate
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, "127.0.0.1:"+strconv.Itoa(port))
		},
		TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: serverName, VerifyConnection: func(cs tls.ConnectionState) error {
			chain = cs.PeerCertificates
			return nil
		}},
	}}
	defer client.CloseIdleConnections()
	resp, err := client.Get("https://" + net.JoinHostPort(serverName, strconv.Itoa(port)) + path)
	if err != nil {
		return "", chain, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b), chain, nil
}

// certPEM reads the PEM of a self-signed front's certificate.
func selfSignedPEM(t *testing.T, dir string) string {
	t.Helper()
	c, err := selfSigned(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Certificate[0]}))
}

// customChain makes a CA and a certificate for names signed by it, and
// returns the CA's PEM and the instance's PEM (leaf, CA, key).
func customChain(t *testing.T, names ...string) (caPEM, instancePEM string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "Example CA"}, IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	caDER, err := x509.CreateCertificate(rand.Reader, caTpl, caTpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: names[0]}, DNSNames: names,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(key)
	caPEM = string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}))
	instancePEM = string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})) + caPEM +
		string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}))
	return caPEM, instancePEM
}

func noRedirects(t *testing.T, port int, host string) *http.Response {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	req, _ := http.NewRequest(http.MethodGet, "http://127.0.0.1:"+strconv.Itoa(port)+"/projects/?a=b", nil)
	req.Host = host
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp
}

func TestHTTPSFrontStrategies(t *testing.T) {
	dss := standInDSS(t)
	caPEM, instancePEM := customChain(t, "dss.example.com")
	tests := []struct {
		name       string
		target     func(port, httpPort int) *protocol.HTTPSTarget
		serverName string
		roots      func(dir string) string
		source     string
		redirect   bool
	}{
		{"self-signed, HTTP redirected", func(port, httpPort int) *protocol.HTTPSTarget {
			return &protocol.HTTPSTarget{Strategy: protocol.HTTPSSelfSigned, Port: port, HTTPPort: httpPort, Redirect: true}
		}, "dss.example.com", func(dir string) string { return selfSignedPEM(t, dir) }, protocol.CertificateSelfSigned, true},
		{"self-signed, reached by address", func(port, _ int) *protocol.HTTPSTarget {
			return &protocol.HTTPSTarget{Strategy: protocol.HTTPSSelfSigned, Port: port}
		}, "127.0.0.1", func(dir string) string { return selfSignedPEM(t, dir) }, protocol.CertificateSelfSigned, false},
		{"custom certificate, HTTP refused", func(port, httpPort int) *protocol.HTTPSTarget {
			return &protocol.HTTPSTarget{Strategy: protocol.HTTPSCustomCertificate, Port: port, HTTPPort: httpPort, Certificate: instancePEM}
		}, "dss.example.com", func(string) string { return caPEM }, protocol.CertificateCustom, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			f := newHTTPSFront(dir, func() []string { return []string{"dss.example.com"} }, zerolog.Nop())
			t.Cleanup(f.stop)
			port, httpPort := freePort(t), freePort(t)
			target := tc.target(port, httpPort)
			if _, err := f.apply(target, dss); err != nil {
				t.Fatal(err)
			}
			body, chain, err := getOver(t, port, tc.serverName, tc.roots(dir), "/projects/")
			if err != nil {
				t.Fatalf("HTTPS: %v", err)
			}
			if want := "path=/projects/ proto=https"; !strings.Contains(body, want) {
				t.Fatalf("DSS got %q, want it to contain %q", body, want)
			}
			if tc.source == protocol.CertificateCustom && len(chain) != 2 {
				t.Fatalf("served a chain of %d certificates, want the leaf and its CA", len(chain))
			}
			st := f.status()
			if st == nil || !st.Serving || st.Port != port || st.Certificate == nil || st.Certificate.Source != tc.source || st.Error != "" {
				t.Fatalf("status = %+v", st)
			}
			if msg, err := f.apply(target, dss); err != nil || !strings.Contains(msg, "unchanged") {
				t.Fatalf("the same target again: %q, %v", msg, err)
			}
			if target.HTTPPort == 0 {
				return
			}
			resp := noRedirects(t, httpPort, "dss.example.com:"+strconv.Itoa(httpPort))
			if tc.redirect {
				want := "https://dss.example.com:" + strconv.Itoa(port) + "/projects/?a=b"
				if resp.StatusCode != http.StatusMovedPermanently || resp.Header.Get("Location") != want {
					t.Fatalf("HTTP answered %d, Location %q; want 301 to %s", resp.StatusCode, resp.Header.Get("Location"), want)
				}
			} else if resp.StatusCode != http.StatusForbidden {
				t.Fatalf("HTTP answered %d; want 403 (httpStrategy DISABLE)", resp.StatusCode)
			}
		})
	}
}

// TestHTTPSFrontChanges: what cannot be served leaves what is served as it
// was; a new certificate is served on the same listener; no target stops
// the front.
func TestHTTPSFrontChanges(t *testing.T) {
	dss := standInDSS(t)
	dir := t.TempDir()
	f := newHTTPSFront(dir, func() []string { return nil }, zerolog.Nop())
	t.Cleanup(f.stop)
	port := freePort(t)
	selfTarget := &protocol.HTTPSTarget{Strategy: protocol.HTTPSSelfSigned, Port: port}
	if _, err := f.apply(selfTarget, dss); err != nil {
		t.Fatal(err)
	}
	roots := selfSignedPEM(t, dir)
	serving := func(roots string) {
		t.Helper()
		if _, _, err := getOver(t, port, "localhost", roots, "/"); err != nil {
			t.Fatalf("not serving with the expected certificate: %v", err)
		}
	}
	serving(roots)

	var se *stepError
	_, err := f.apply(&protocol.HTTPSTarget{Strategy: protocol.HTTPSCustomCertificate, Port: port, Certificate: "not a certificate"}, dss)
	if !errors.As(err, &se) || se.code != protocol.CodeInvalidArgument {
		t.Fatalf("a bad custom certificate: %v, want InvalidArgument", err)
	}
	serving(roots)

	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	busyPort := busy.Addr().(*net.TCPAddr).Port
	_, err = f.apply(&protocol.HTTPSTarget{Strategy: protocol.HTTPSSelfSigned, Port: busyPort}, dss)
	if !errors.As(err, &se) || se.code != protocol.CodeUnavailable {
		t.Fatalf("a port in use: %v, want Unavailable (tried again)", err)
	}
	serving(roots)

	caPEM, instancePEM := customChain(t, "localhost")
	if _, err := f.apply(&protocol.HTTPSTarget{Strategy: protocol.HTTPSCustomCertificate, Port: port, Certificate: instancePEM}, dss); err != nil {
		t.Fatal(err)
	}
	serving(caPEM)
	if _, _, err := getOver(t, port, "localhost", roots, "/"); err == nil {
		t.Fatal("the self-signed certificate is still served after the custom one replaced it")
	}

	// The self-signed certificate is kept: the same one comes back.
	if _, err := f.apply(selfTarget, dss); err != nil {
		t.Fatal(err)
	}
	serving(roots)

	if _, err := f.apply(nil, dss); err != nil {
		t.Fatal(err)
	}
	if f.status() != nil {
		t.Fatal("a front without target still reports a status")
	}
	if c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), time.Second); err == nil {
		c.Close()
		t.Fatal("the HTTPS port still accepts connections after HTTPS was turned off")
	}
}

// TestHTTPSFrontObtainsFromACME: LETSENCRYPT serves a temporary
// self-signed certificate, then the one a real ACME CA (Pebble) issued
// after validating the machine's name through the front's own ports.
func TestHTTPSFrontObtainsFromACME(t *testing.T) {
	dss := standInDSS(t)
	port, httpPort := freePort(t), freePort(t)
	ca := acmetest.Run(t, httpPort, port)
	dir := t.TempDir()
	const name = "in-acme.dss.example.com"
	f := newHTTPSFront(dir, func() []string { return []string{name, "in-acme.private.example.com"} }, zerolog.Nop())
	t.Cleanup(f.stop)
	changed := make(chan struct{}, 16)
	f.changed = func() {
		select {
		case changed <- struct{}{}:
		default:
		}
	}
	target := &protocol.HTTPSTarget{Strategy: protocol.HTTPSLetsEncrypt, Port: port, HTTPPort: httpPort, Redirect: true,
		ACME: &protocol.ACMETarget{DirectoryURL: ca.DirectoryURL, Email: "ops@example.com", CACert: ca.ServerCAPEM}}
	if _, err := f.apply(target, dss); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(90 * time.Second)
	for {
		st := f.status()
		if st.Certificate.Source == protocol.CertificateACME {
			if len(st.Certificate.DNSNames) != 1 || st.Certificate.DNSNames[0] != name || st.Error != "" {
				t.Fatalf("status = %+v %+v", st, st.Certificate)
			}
			break
		}
		if st.Certificate.Source != protocol.CertificateTemporary {
			t.Fatalf("while pending, the certificate is %q; want temporary", st.Certificate.Source)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no ACME certificate after 90 s: %s", st.Error)
		}
		select {
		case <-changed:
		case <-time.After(time.Second):
		}
	}
	body, chain, err := getOver(t, port, name, ca.RootPEM, "/")
	if err != nil {
		t.Fatalf("HTTPS with the CA's root: %v", err)
	}
	if !strings.Contains(body, "proto=https") || chain[0].Subject.CommonName != name && chain[0].DNSNames[0] != name {
		t.Fatalf("got %q from %v", body, chain[0].DNSNames)
	}
	// The certificate is kept: a front started again serves it at once.
	f.stop()
	g := newHTTPSFront(dir, func() []string { return []string{name} }, zerolog.Nop())
	t.Cleanup(g.stop)
	if _, err := g.apply(target, dss); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the kept ACME certificate", func() bool {
		return g.status().Certificate.Source == protocol.CertificateACME
	})
	if _, _, err := getOver(t, port, name, ca.RootPEM, "/"); err != nil {
		t.Fatalf("HTTPS after a restart: %v", err)
	}
}

func TestACMEWithoutAName(t *testing.T) {
	dss := standInDSS(t)
	port, httpPort := freePort(t), freePort(t)
	f := newHTTPSFront(t.TempDir(), func() []string { return nil }, zerolog.Nop())
	t.Cleanup(f.stop)
	target := &protocol.HTTPSTarget{Strategy: protocol.HTTPSLetsEncrypt, Port: port, HTTPPort: httpPort, Redirect: true,
		ACME: &protocol.ACMETarget{DirectoryURL: "https://127.0.0.1:1/dir"}}
	if _, err := f.apply(target, dss); err != nil {
		t.Fatal(err)
	}
	st := f.status()
	if st.Certificate.Source != protocol.CertificateTemporary || !strings.Contains(st.Error, "no DNS name") {
		t.Fatalf("status = %+v", st)
	}
	if _, _, err := getOver(t, port, "localhost", "", "/"); err == nil {
		t.Fatal("a client trusting no root accepted the temporary certificate")
	}
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
