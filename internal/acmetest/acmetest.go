// Package acmetest starts a real ACME certificate authority for tests:
// Let's Encrypt's Pebble, in the test's process, with a DNS server of its
// own that resolves every name to the loopback address, so that the CA's
// challenges reach the server under test.
//
// Tests import it; nothing else may.
package acmetest

import (
	"encoding/pem"
	"io"
	"log"
	"net"
	"net/http/httptest"
	"testing"

	"github.com/letsencrypt/pebble/v2/ca"
	"github.com/letsencrypt/pebble/v2/db"
	"github.com/letsencrypt/pebble/v2/va"
	"github.com/letsencrypt/pebble/v2/wfe"
	"github.com/miekg/dns"
)

// CA is a running ACME CA.
type CA struct {
	// DirectoryURL is its ACME directory (https).
	DirectoryURL string
	// ServerCAPEM is the certificate its own HTTPS is verified with.
	ServerCAPEM string
	// RootPEM is the root the certificates it issues chain to.
	RootPEM string
}

// Run starts a CA whose validation authority reaches the server under test
// on httpPort (http-01) and tlsPort (tls-alpn-01) of 127.0.0.1, whatever the
// name; it is stopped when the test ends. It sets Pebble's environment
// (no sleep before validating, no bad nonces), so tests using it do not
// run in parallel.
func Run(t testing.TB, httpPort, tlsPort int) *CA {
	t.Helper()
	if s, ok := t.(interface{ Setenv(k, v string) }); ok {
		s.Setenv("PEBBLE_VA_NOSLEEP", "1")
		s.Setenv("PEBBLE_WFE_NONCEREJECT", "0")
	}
	resolver := startDNS(t)
	logger := log.New(io.Discard, "", 0)
	if testing.Verbose() {
		logger = log.New(testWriter{t}, "pebble ", 0)
	}
	store := db.NewMemoryStore()
	authority := ca.New(logger, store, "", "ecdsa", 0, 1, map[string]ca.Profile{"default": {Description: "the default profile"}})
	validator := va.New(logger, httpPort, tlsPort, false, resolver, store)
	front := wfe.New(logger, store, validator, authority, []string{"pebble.letsencrypt.org"}, false, false, 0, 0)
	srv := httptest.NewTLSServer(front.Handler())
	t.Cleanup(srv.Close)
	return &CA{
		DirectoryURL: srv.URL + wfe.DirectoryPath,
		ServerCAPEM:  string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})),
		RootPEM:      string(authority.GetRootCert(0).PEM()),
	}
}

// startDNS serves A records of 127.0.0.1 (and no AAAA) for every name, on
// a loopback port (TCP, which Pebble's validation authority asks over),
// and returns its address.
func startDNS(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{Listener: ln, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(q)
		for _, question := range q.Question {
			if question.Qtype == dns.TypeA {
				m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: question.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60},
					A: net.IPv4(127, 0, 0, 1)})
			}
		}
		_ = w.WriteMsg(m)
	})}
	started := make(chan struct{})
	srv.NotifyStartedFunc = func() { close(started) }
	go func() { _ = srv.ActivateAndServe() }()
	<-started
	t.Cleanup(func() { _ = srv.Shutdown() })
	return ln.Addr().String()
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}
