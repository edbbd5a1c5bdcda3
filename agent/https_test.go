package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/acmetest"
	"github.com/fleetmanager/fm/internal/certtest"
	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/protocol"
	"github.com/rs/zerolog"
	"golang.org/x/crypto/acme"
)

// standInDSS answers every request with what it was asked and how it came.
func standInDSS(t *testing.T) int {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "dss host=%s path=%s proto=%s for=%s", r.Host, r.URL.Path, r.Header.Get("X-Forwarded-Proto"), r.Header.Get("X-Forwarded-For"))
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
	req, _ := http.NewRequest(http.MethodGet, "https://"+net.JoinHostPort(serverName, strconv.Itoa(port))+path, nil)
	req.Header.Set("X-Forwarded-For", "203.0.113.66") // a client's claim, which DSS must not be told
	resp, err := client.Do(req)
	if err != nil {
		return "", chain, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b), chain, nil
}

// selfSignedPEM is the PEM of the self-signed certificate kept in dir.
func selfSignedPEM(t *testing.T, dir string) string {
	t.Helper()
	c, err := selfSigned(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Certificate[0]}))
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
	chain := certtest.NewChain(t, "dss.example.com")
	caPEM, instancePEM := chain.CAPEM, chain.Instance()
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
			f := newHTTPSFront(dir, func() []string { return []string{"dss.example.com"} }, "127.0.0.1", zerolog.Nop())
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
			if want := "path=/projects/ proto=https for=127.0.0.1"; !strings.Contains(body, want) {
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
	f := newHTTPSFront(dir, func() []string { return nil }, "127.0.0.1", zerolog.Nop())
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

	local := certtest.NewChain(t, "localhost")
	caPEM, instancePEM := local.CAPEM, local.Instance()
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
	f := newHTTPSFront(dir, func() []string { return []string{name, "in-acme.private.example.com"} }, "127.0.0.1", zerolog.Nop())
	t.Cleanup(f.stop)
	changed := make(chan struct{}, 16)
	f.setChanged(func() {
		select {
		case changed <- struct{}{}:
		default:
		}
	})
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
	// A name the machine does not have gets the temporary certificate;
	// nothing is asked of the CA for it.
	if _, _, err := getOver(t, port, "other.example.com", ca.RootPEM, "/"); err == nil {
		t.Fatal("a name not the machine's was served a certificate of the CA")
	}
	// The certificate is kept: a front started again serves it at once.
	f.stop()
	g := newHTTPSFront(dir, func() []string { return []string{name} }, "127.0.0.1", zerolog.Nop())
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
	f := newHTTPSFront(t.TempDir(), func() []string { return nil }, "127.0.0.1", zerolog.Nop())
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

// TestTheHTTPSFrontAndTheAWSKeyPairThroughTheAgent: a desired state's HTTPS
// front is served once DSS is up, served again by an agent restarted on the
// generation it reached, and stopped by a generation without one; its AWS
// key pair becomes the DSS account's default profile.
func TestTheHTTPSFrontAndTheAWSKeyPairThroughTheAgent(t *testing.T) {
	r := newRig(t)
	// The image's own credentials file is kept aside.
	awsDir := filepath.Join(r.root, "home", r.cfg.DSSUser, ".aws")
	if err := os.MkdirAll(awsDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(awsDir, "credentials"), []byte("[image]\naws_access_key_id = AKIAIMAGE0000000\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	r.startAgent()
	httpsPort := freePort(t)
	creds := &protocol.AWSCredentials{AccessKeyID: "AKIAIOSFODNN7EXAMPLE", SecretAccessKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}
	r.desireWith("14.0.0", func(d *protocol.DesiredState) {
		d.DSS.HTTPS = &protocol.HTTPSTarget{Strategy: protocol.HTTPSSelfSigned, Port: httpsPort}
		d.DSS.AWSCredentials = creds
	})
	st := r.waitReady(1)
	if h := st.DSS.HTTPS; h == nil || !h.Serving || h.Port != httpsPort || h.Certificate.Source != protocol.CertificateSelfSigned {
		t.Fatalf("status's https: %+v", st.DSS.HTTPS)
	}
	roots := selfSignedPEM(t, filepath.Join(r.data, "fm-agent", "https"))
	health := func() {
		t.Helper()
		body, _, err := getOver(t, httpsPort, "localhost", roots, "/api/health")
		if err != nil || !strings.Contains(body, `"version":"14.0.0"`) {
			t.Fatalf("DSS over HTTPS: %q, %v", body, err)
		}
	}
	health()
	path := filepath.Join(r.root, "home", r.cfg.DSSUser, ".aws", "credentials")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 ||
		!strings.Contains(string(b), "[default]\naws_access_key_id = AKIAIOSFODNN7EXAMPLE\naws_secret_access_key = "+creds.SecretAccessKey+"\n") {
		t.Fatalf("credentials file (%v):\n%s", fi.Mode(), b)
	}
	if b, err := os.ReadFile(path + ".before-fm"); err != nil || !strings.Contains(string(b), "[image]") {
		t.Fatalf("the image's credentials were not kept: %q %v", b, err)
	}
	for _, e := range r.events.all() {
		if strings.Contains(e.Message+e.Output, creds.SecretAccessKey) {
			t.Fatalf("an event carries the secret: %+v", e)
		}
	}

	r.stopAgent()
	if c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(httpsPort), time.Second); err == nil {
		c.Close()
		t.Fatal("the HTTPS port still answers after the agent stopped")
	}
	restarted := time.Now()
	r.startAgent()
	r.waitStatus("HTTPS served again after a restart", 30*time.Second, func(st protocol.AgentStatus) bool {
		return st.Time.After(restarted) && st.DSS.HTTPS != nil && st.DSS.HTTPS.Serving
	})
	health()

	// Restarted while its port is taken: the status says so, and the
	// front serves once the port is free.
	r.stopAgent()
	taken, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(httpsPort))
	if err != nil {
		t.Fatal(err)
	}
	restarted = time.Now()
	r.startAgent()
	r.waitStatus("the taken port reported", 30*time.Second, func(st protocol.AgentStatus) bool {
		return st.Time.After(restarted) && st.DSS.HTTPS != nil && !st.DSS.HTTPS.Serving && strings.Contains(st.DSS.HTTPS.Error, "address already in use")
	})
	taken.Close()
	r.waitStatus("HTTPS served once the port is free", 40*time.Second, func(st protocol.AgentStatus) bool {
		return st.DSS.HTTPS != nil && st.DSS.HTTPS.Serving
	})
	health()

	r.desireWith("14.0.0", func(d *protocol.DesiredState) { d.DSS.AWSCredentials = creds })
	if st := r.waitReady(2); st.DSS.HTTPS != nil {
		t.Fatalf("a generation without HTTPS still reports it: %+v", st.DSS.HTTPS)
	}
	if c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(httpsPort), time.Second); err == nil {
		c.Close()
		t.Fatal("the HTTPS port still answers")
	}
}

// TestACMEFailuresWaitAcrossRestarts: a CA that cannot be reached is asked
// again only after the backoff, counted in a file that outlives the agent.
func TestACMEFailuresWaitAcrossRestarts(t *testing.T) {
	dss := standInDSS(t)
	dir := t.TempDir()
	port, httpPort := freePort(t), freePort(t)
	target := &protocol.HTTPSTarget{Strategy: protocol.HTTPSLetsEncrypt, Port: port, HTTPPort: httpPort, Redirect: true,
		ACME: &protocol.ACMETarget{DirectoryURL: "https://127.0.0.1:1/dir"}}
	serve := func() *httpsFront {
		f := newHTTPSFront(dir, func() []string { return []string{"in-x.dss.example.com"} }, "127.0.0.1", zerolog.Nop())
		t.Cleanup(f.stop)
		if _, err := f.apply(target, dss); err != nil {
			t.Fatal(err)
		}
		return f
	}
	f := serve()
	waitFor(t, 30*time.Second, "a failed attempt", func() bool { return strings.Contains(f.status().Error, "trying again at") })
	if st := f.status(); !st.Serving || st.Certificate.Source != protocol.CertificateTemporary {
		t.Fatalf("status = %+v", st)
	}
	f.stop()
	var att acmeAttempts
	b, err := os.ReadFile(filepath.Join(dir, "acme", cacheFolder(target.ACME.DirectoryURL), "acme-attempts.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &att); err != nil || att.Failures != 1 || time.Until(att.Next) < 110*time.Second {
		t.Fatalf("attempts kept: %+v %v", att, err)
	}
	g := serve()
	waitFor(t, 10*time.Second, "the restarted front to say it waits", func() bool {
		return strings.Contains(g.status().Error, "1 attempts to obtain a certificate")
	})
	b2, _ := os.ReadFile(filepath.Join(dir, "acme", cacheFolder(target.ACME.DirectoryURL), "acme-attempts.json"))
	if string(b2) != string(b) {
		t.Fatalf("a restarted front asked the CA before its time: %s, then %s", b, b2)
	}
}

func TestACMEBackoff(t *testing.T) {
	want := []time.Duration{2 * time.Minute, 5 * time.Minute, 15 * time.Minute, time.Hour, 2 * time.Hour, 4 * time.Hour,
		8 * time.Hour, 16 * time.Hour, 24 * time.Hour, 24 * time.Hour, 24 * time.Hour}
	for i, w := range want {
		if got := acmeBackoff(i + 1); got != w {
			t.Errorf("after %d failures: %s, want %s", i+1, got, w)
		}
	}
}

func TestRedirectToHTTPS(t *testing.T) {
	tests := []struct {
		host, path string
		port       int
		status     int
		location   string
	}{
		{"dss.example.com", "/projects/?a=b", 443, 301, "https://dss.example.com/projects/?a=b"},
		{"dss.example.com:80", "/", 10008, 301, "https://dss.example.com:10008/"},
		{"[2001:db8::1]:80", "/x", 443, 301, "https://[2001:db8::1]/x"},
		{"evil.example.com/@x", "/", 443, 400, ""},
		{"a b", "/", 443, 400, ""},
		{"", "/", 443, 400, ""},
	}
	for _, tc := range tests {
		t.Run(tc.host, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodGet, "http://placeholder"+tc.path, nil)
			r.Host = tc.host
			w := httptest.NewRecorder()
			redirectToHTTPS(tc.port).ServeHTTP(w, r)
			if w.Code != tc.status || w.Header().Get("Location") != tc.location {
				t.Fatalf("%d %q, want %d %q", w.Code, w.Header().Get("Location"), tc.status, tc.location)
			}
		})
	}
}

// TestOpenDesiredOpensWhatIsSealedForIt: the license, DSS's AWS secret and
// the HTTPS certificate open with the instance key in their own places
// only; a desired state for another machine is left sealed.
func TestOpenDesiredOpensWhatIsSealedForIt(t *testing.T) {
	box, err := seal.New(seal.NewKey())
	if err != nil {
		t.Fatal(err)
	}
	a := &Agent{cfg: Config{Instance: "in-mine", MachineRequest: "rq-1"}, box: box}
	const secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
	sealed := func() *protocol.DesiredState {
		return &protocol.DesiredState{Instance: "in-mine", MachineRequest: "rq-1", DSS: protocol.DSSTarget{
			SealedLicense:  box.Seal("{license}", protocol.SealedLicensePlace("in-mine")),
			AWSCredentials: &protocol.AWSCredentials{AccessKeyID: "AKIAIOSFODNN7EXAMPLE", SealedSecretAccessKey: box.Seal(secret, protocol.SealedAWSSecretPlace("in-mine"))},
			HTTPS: &protocol.HTTPSTarget{Strategy: protocol.HTTPSCustomCertificate, Port: 443,
				SealedCertificate: box.Seal("PEM", protocol.SealedCertificatePlace("in-mine"))}}}
	}
	d := sealed()
	if err := a.openDesired(d); err != nil {
		t.Fatal(err)
	}
	if d.DSS.License != "{license}" || d.DSS.AWSCredentials.SecretAccessKey != secret || d.DSS.AWSCredentials.SealedSecretAccessKey != "" ||
		d.DSS.HTTPS.Certificate != "PEM" || d.DSS.HTTPS.SealedCertificate != "" {
		t.Fatalf("opened: %+v %+v %+v", d.DSS, d.DSS.AWSCredentials, d.DSS.HTTPS)
	}

	other := sealed()
	other.MachineRequest = "rq-2"
	if err := a.openDesired(other); err != nil || other.DSS.AWSCredentials.SecretAccessKey != "" || other.DSS.HTTPS.Certificate != "" {
		t.Fatalf("another machine's state: %v %+v", err, other.DSS)
	}

	moved := sealed()
	moved.DSS.AWSCredentials.SealedSecretAccessKey = moved.DSS.HTTPS.SealedCertificate
	if err := a.openDesired(moved); err == nil {
		t.Fatal("a sealed value moved to another place opened")
	}
	injected := sealed()
	injected.DSS.AWSCredentials.SealedSecretAccessKey = box.Seal(secret+"\n[evil]\ncredential_process = sh", protocol.SealedAWSSecretPlace("in-mine"))
	if err := a.openDesired(injected); err == nil {
		t.Fatal("a sealed secret that would change the credentials file opened")
	}
	keyless := &Agent{cfg: a.cfg}
	if err := keyless.openDesired(sealed()); err == nil {
		t.Fatal("an agent without an instance key opened sealed values")
	}
}

// TestTheFrontServedIsServedAgainFromItsFile: restore serves what
// front.json keeps, without the desired state; a damaged or hostile file
// serves nothing; a front that restore could not serve (its port taken)
// and that the desired state no longer wants is not served once the port
// is free.
func TestTheFrontServedIsServedAgainFromItsFile(t *testing.T) {
	dss := standInDSS(t)
	dir := t.TempDir()
	port := freePort(t)
	f := newHTTPSFront(dir, func() []string { return nil }, "127.0.0.1", zerolog.Nop())
	if _, err := f.apply(&protocol.HTTPSTarget{Strategy: protocol.HTTPSSelfSigned, Port: port}, dss); err != nil {
		t.Fatal(err)
	}
	f.stop()
	roots := selfSignedPEM(t, dir)

	g := newHTTPSFront(dir, func() []string { return nil }, "127.0.0.1", zerolog.Nop())
	t.Cleanup(g.stop)
	g.restore()
	// The port was free a moment ago; under load another process may take
	// it meanwhile (as a connection's source port), and the front is then
	// served once it is free again, as run would try.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		_, _, err := getOver(t, port, "localhost", roots, "/")
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not served again from front.json: %v", err)
		}
		g.retry()
	}
	g.stop()

	for name, content := range map[string]string{
		"not JSON":             "{",
		"DSS's port the front": fmt.Sprintf(`{"target":{"strategy":"SELF_SIGNED","port":%d},"dssPort":%d}`, port, port),
		"no port":              `{"target":{"strategy":"SELF_SIGNED","port":0},"dssPort":10000}`,
	} {
		t.Run(name, func(t *testing.T) {
			if err := os.WriteFile(filepath.Join(dir, "front.json"), []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
			h := newHTTPSFront(dir, func() []string { return nil }, "127.0.0.1", zerolog.Nop())
			defer h.stop()
			h.restore()
			if h.status() != nil {
				t.Fatalf("served from a bad front.json: %+v", h.status())
			}
		})
	}

	// Restored with its port taken, then not wanted any more.
	if err := os.WriteFile(filepath.Join(dir, "front.json"), []byte(fmt.Sprintf(`{"target":{"strategy":"SELF_SIGNED","port":%d},"dssPort":%d}`, port, dss)), 0o600); err != nil {
		t.Fatal(err)
	}
	taken, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	k := newHTTPSFront(dir, func() []string { return nil }, "127.0.0.1", zerolog.Nop())
	t.Cleanup(k.stop)
	k.restore()
	if st := k.status(); st == nil || st.Serving || !strings.Contains(st.Error, "address already in use") {
		t.Fatalf("status with the port taken: %+v", st)
	}
	if k.current(nil, dss) {
		t.Fatal("no front is current while one is wanted and tried again")
	}
	if _, err := k.apply(nil, dss); err != nil {
		t.Fatal(err)
	}
	taken.Close()
	if k.retry() {
		t.Fatal("a front no longer wanted was served")
	}
	if c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), time.Second); err == nil {
		c.Close()
		t.Fatal("the port of a front no longer wanted answers")
	}
}

// TestAHandshakeNeverOrdersACertificate: hellos a client chooses (several
// protocols beside ACME's, RSA only) get the temporary certificate, and
// the CA is not asked.
func TestAHandshakeNeverOrdersACertificate(t *testing.T) {
	dir := t.TempDir()
	temp, err := selfSigned(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	asked := make(chan struct{}, 16)
	ca := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		asked <- struct{}{}
		http.Error(w, "no", http.StatusInternalServerError)
	}))
	t.Cleanup(ca.Close)
	caPEM := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Certificate().Raw}))
	const name = "in-x.dss.example.com"
	src, err := newACMESource(dir, &protocol.ACMETarget{DirectoryURL: ca.URL + "/dir", CACert: caPEM}, []string{name}, temp, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer src.stop()
	for _, hello := range []*tls.ClientHelloInfo{
		{ServerName: name, SupportedProtos: []string{"h2", acme.ALPNProto}},
		{ServerName: name, CipherSuites: []uint16{tls.TLS_RSA_WITH_AES_128_GCM_SHA256}, SignatureSchemes: []tls.SignatureScheme{tls.PKCS1WithSHA256}},
		ecdsaHello(name),
	} {
		c, err := src.get(hello)
		if err != nil || c != temp {
			t.Fatalf("hello %+v: got %v, %v; want the temporary certificate", hello.SupportedProtos, c, err)
		}
	}
	select {
	case <-asked:
		t.Fatal("a handshake asked the CA")
	case <-time.After(200 * time.Millisecond):
	}
}
