// Package imdstest stands in for AWS in tests of EC2 machines' identity:
// a Signer plays AWS's key of a region (it signs instance identity
// documents as the instance metadata service serves them, and gives the
// certificate fm server --ec2-identity-certs takes), and Serve runs an
// instance metadata service (IMDSv2) on loopback for one machine. moto has
// no metadata service. Tests of server, agent and e2e import it; nothing
// else may.
package imdstest

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/protocol"
)

// Signer signs instance identity documents with an RSA key of its own,
// as AWS does with a region's.
type Signer struct {
	key  *rsa.PrivateKey
	Cert *x509.Certificate
}

// NewSigner makes a signer with a new key and a self-signed certificate.
func NewSigner(t testing.TB) *Signer {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{Organization: []string{"Amazon Web Services LLC (test)"}},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &Signer{key: key, Cert: cert}
}

// CertPEM is the signer's certificate, as AWS's documentation gives it.
func (s *Signer) CertPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.Cert.Raw})
}

// Proof is the identity of EC2 machine instanceID as its metadata service
// gives it: the document (indented JSON, as AWS's), and its signature in
// base64 cut in lines of 64.
func (s *Signer) Proof(t testing.TB, instanceID string) *protocol.EC2Identity {
	t.Helper()
	doc, _ := json.MarshalIndent(map[string]any{"instanceId": instanceID, "region": "us-east-1", "accountId": "123456789012",
		"pendingTime": time.Now().UTC().Format(time.RFC3339), "instanceType": "m5.2xlarge"}, "", "  ")
	sum := sha256.Sum256(doc)
	sig, err := rsa.SignPKCS1v15(rand.Reader, s.key, crypto.SHA256, sum[:])
	if err != nil {
		t.Fatal(err)
	}
	b64 := base64.StdEncoding.EncodeToString(sig)
	var lines []string
	for len(b64) > 64 {
		lines, b64 = append(lines, b64[:64]), b64[64:]
	}
	return &protocol.EC2Identity{Document: string(doc), Signature: strings.Join(append(lines, b64), "\n")}
}

// IMDS is a metadata service for one machine, serving what IMDSv2 serves
// of its identity: a session token first (PUT /latest/api/token), then the
// document and its signature, each asked with the token; and the
// credentials of its instance profile's role, when Role is set.
type IMDS struct {
	URL string
	// Proof is what it serves.
	Proof *protocol.EC2Identity
	// role and credentials (the JSON document IMDS serves: AccessKeyId,
	// SecretAccessKey, Token, Expiration) are the instance profile's
	// (SetProfile).
	role, credentials string

	mu        sync.Mutex
	failFirst int
	asked     int
}

// Serve starts a metadata service serving proof, until the test ends.
// The first failFirst token requests are answered 503, as a service not
// up yet.
func Serve(t testing.TB, proof *protocol.EC2Identity, failFirst int) *IMDS {
	t.Helper()
	m := &IMDS{Proof: proof, failFirst: failFirst}
	ts := httptest.NewServer(m)
	t.Cleanup(ts.Close)
	m.URL = ts.URL
	return m
}

const token = "imdstest-session-token"

// SetProfile gives the machine an instance profile: its role's name and
// credentials (the JSON document IMDS serves); an empty role takes it away.
func (m *IMDS) SetProfile(role, credentials string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.role, m.credentials = role, credentials
}

func (m *IMDS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.Method == http.MethodPut && r.URL.Path == "/latest/api/token":
		m.mu.Lock()
		m.asked++
		fail := m.asked <= m.failFirst
		m.mu.Unlock()
		if fail {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		if r.Header.Get("X-Aws-Ec2-Metadata-Token-Ttl-Seconds") == "" {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		_, _ = w.Write([]byte(token))
	case r.Header.Get("X-Aws-Ec2-Metadata-Token") != token:
		w.WriteHeader(http.StatusUnauthorized)
	case r.Method == http.MethodGet && r.URL.Path == "/latest/dynamic/instance-identity/document":
		_, _ = w.Write([]byte(m.Proof.Document))
	case r.Method == http.MethodGet && r.URL.Path == "/latest/dynamic/instance-identity/signature":
		_, _ = w.Write([]byte(m.Proof.Signature + "\n"))
	case r.Method == http.MethodGet && strings.HasPrefix(r.URL.Path, "/latest/meta-data/iam/security-credentials/"):
		m.mu.Lock()
		role, creds := m.role, m.credentials
		m.mu.Unlock()
		switch r.URL.Path {
		case "/latest/meta-data/iam/security-credentials/" + role:
			if role == "" {
				w.WriteHeader(http.StatusNotFound) // no instance profile, as EC2 answers
				return
			}
			_, _ = w.Write([]byte(creds))
		case "/latest/meta-data/iam/security-credentials/":
			_, _ = w.Write([]byte(role))
		default:
			w.WriteHeader(http.StatusNotFound)
		}
	default:
		w.WriteHeader(http.StatusNotFound)
	}
}
