package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	neturl "net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/certtest"
)

// TestHTTPSOnFMDev: a network's HTTPS strategy, saved as Dataiku's client
// saves it, reaches the machine at its next reprovision: the agent serves
// the stand-in DSS over HTTPS (self-signed, then the instance's own
// certificate chain, sealed on its way), plain HTTP redirects to it, the
// status's publicURL follows, and NONE serves plain HTTP again.
func TestHTTPSOnFMDev(t *testing.T) {
	data := filepath.Join(t.TempDir(), "fm")
	d := startDevFast(t, data)
	py := NewPython(t, d.url, d.keyFile)
	id := d.newInstance(t, "tls", "dss-14.0.0-standin")
	var in map[string]any
	py.Do(t, "GET", "/instances/"+id, "", &in)
	vnID := in["virtualNetworkId"].(string)
	setHTTPS := func(https, http string) {
		t.Helper()
		var vn map[string]any
		py.Do(t, "GET", "/virtual-networks/"+vnID, "", &vn)
		vn["httpsStrategy"], vn["httpStrategy"] = https, http
		if code := py.Do(t, "PUT", "/virtual-networks/"+vnID, mustMarshal(t, vn), nil); code != 200 {
			t.Fatalf("save the network: %d", code)
		}
	}
	reprovision := func(wantScheme string) (*neturl.URL, map[string]any) {
		t.Helper()
		var f map[string]any
		py.Do(t, "GET", "/instances/"+id+"/actions/reprovision", "", &f)
		if res, code := py.wait(t, f); code != 200 || res["state"] != "succeeded" {
			t.Fatalf("reprovision: %d %v", code, res)
		}
		st := d.waitStatus(t, py, id, "DSS up at an "+wantScheme+" URL", func(st map[string]any) bool {
			dss, _ := st["dss"].(map[string]any)
			u, _ := st["publicURL"].(string)
			return st["state"] == "running" && dss["state"] == "running" && strings.HasPrefix(u, wantScheme+"://")
		})
		u, err := neturl.Parse(st["publicURL"].(string))
		if err != nil {
			t.Fatal(err)
		}
		return u, st
	}
	// get fetches DSS's health over HTTPS, trusting roots only, and
	// returns the chain served.
	get := func(u *neturl.URL, roots *x509.CertPool) []*x509.Certificate {
		t.Helper()
		var chain []*x509.Certificate
		client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots,
			VerifyConnection: func(cs tls.ConnectionState) error { chain = cs.PeerCertificates; return nil }}}}
		defer client.CloseIdleConnections()
		resp, err := client.Get(u.String() + "/api/health")
		if err != nil {
			t.Fatalf("GET %s: %v", u, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 || !strings.Contains(string(b), `"version":"14.0.0"`) {
			t.Fatalf("GET %s: %d %s", u, resp.StatusCode, b)
		}
		return chain
	}

	setHTTPS("SELF_SIGNED", "REDIRECT")
	u, st := reprovision("https")
	https := st["dss"].(map[string]any)["https"].(map[string]any)
	if cert, _ := https["certificate"].(map[string]any); https["serving"] != true || cert["source"] != "self-signed" {
		t.Fatalf("status's https: %v", https)
	}
	// The self-signed certificate verifies as its own root, for the
	// address the URL names.
	var leaf *x509.Certificate
	probe := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error { leaf = cs.PeerCertificates[0]; return nil }}}}
	if resp, err := probe.Get(u.String()); err == nil {
		resp.Body.Close()
	}
	probe.CloseIdleConnections()
	if leaf == nil {
		t.Fatal("no certificate served")
	}
	self := x509.NewCertPool()
	self.AddCert(leaf)
	get(u, self)
	// Plain HTTP, on the port after HTTPS's, redirects to it.
	port := 0
	fmt.Sscan(u.Port(), &port)
	noFollow := &http.Client{Timeout: 5 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := noFollow.Get(fmt.Sprintf("http://%s/projects/", net.JoinHostPort(u.Hostname(), fmt.Sprint(port+1))))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if want := u.String() + "/projects/"; resp.StatusCode != 301 || resp.Header.Get("Location") != want {
		t.Fatalf("plain HTTP: %d to %q, want 301 to %s", resp.StatusCode, resp.Header.Get("Location"), want)
	}

	// The instance's own chain, signed by a CA of ours.
	chain := certtest.NewChain(t, u.Hostname())
	py.Do(t, "GET", "/instances/"+id, "", &in)
	in["sslCertificatePEM"] = chain.Instance()
	if code := py.Do(t, "PUT", "/instances/"+id, mustMarshal(t, in), nil); code != 200 {
		t.Fatalf("save the instance: %d", code)
	}
	setHTTPS("CUSTOM_CERTIFICATE", "DISABLE")
	u, _ = reprovision("https")
	ca := x509.NewCertPool()
	ca.AppendCertsFromPEM([]byte(chain.CAPEM))
	if served := get(u, ca); len(served) != 2 || served[1].Subject.CommonName != certtest.CAName {
		t.Fatalf("the chain served: %d certificates", len(served))
	}

	setHTTPS("NONE", "DISABLE")
	u, st = reprovision("http")
	if _, ok := st["dss"].(map[string]any)["https"]; ok {
		t.Fatalf("HTTPS still reported after NONE: %v", st["dss"])
	}
	resp, err = http.Get(u.String() + "/api/health")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("plain DSS: %d", resp.StatusCode)
	}
}
