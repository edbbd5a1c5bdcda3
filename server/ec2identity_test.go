package server_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
	"github.com/fleetmanager/fm/server/servertest"
	"github.com/nats-io/nkeys"
)

// identitySigner stands for AWS's key of a region: it signs instance
// identity documents as the instance metadata service serves them.
type identitySigner struct {
	key  *rsa.PrivateKey
	cert *x509.Certificate
}

func newIdentitySigner(t *testing.T) identitySigner {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{Organization: []string{"Amazon Web Services LLC (test)"}},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return identitySigner{key, cert}
}

// proof is the identity of EC2 machine id as its metadata service gives it:
// the document, and its signature in base64 cut in lines.
func (s identitySigner) proof(t *testing.T, id string) *protocol.EC2Identity {
	t.Helper()
	doc, _ := json.MarshalIndent(map[string]any{"instanceId": id, "region": "eu-west-1", "accountId": "123456789012",
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

// TestAnEC2MachineJoinsOnlyWithItsIdentity: given AWS's certificates, FM
// joins a machine the EC2 backend launched only with the identity document
// of the machine launched for the token, signed by AWS: the token alone
// (the EC2 API shows a machine's user data) is of no use elsewhere, and a
// refused join does not bind the token, so the machine still joins after.
// A machine of another backend needs no document.
func TestAnEC2MachineJoinsOnlyWithItsIdentity(t *testing.T) {
	aws, notAWS := newIdentitySigner(t), newIdentitySigner(t)
	f := startWithAuthority(t, time.Hour, servertest.WithConfig(func(c *server.Config) {
		c.EC2IdentityCerts = []*x509.Certificate{notAWSCertOtherRegion(t), aws.cert}
	}))
	vn, tpl, _ := f.fleet()
	im := f.addImageWithKit("dss-ec2-join", "14.0.0")
	onEC2 := f.createInstance(instanceBody("on-ec2", vn.ID, tpl.ID, im.ID)).ID
	local := f.createInstance(instanceBody("local", vn.ID, tpl.ID, im.ID)).ID
	js := f.env.Bus.JetStream(t)

	req := f.provisionRequest(onEC2)
	machine := machineKey(t)
	join := func(kp nkeys.KeyPair, proof *protocol.EC2Identity) protocol.JoinRequest {
		var jr protocol.JoinRequest
		if err := json.Unmarshal([]byte(joinBody(t, onEC2, req.Spec.Join.Token, kp)), &jr); err != nil {
			t.Fatal(err)
		}
		jr.EC2Identity = proof
		return jr
	}
	// The agent asks before the provisioner recorded what it launched, or
	// while the state under way still names the machine it replaces:
	// asked again.
	f.failed(f.joinRaw(join(machine, aws.proof(t, "i-0aaa"))), 503, string(protocol.CodeUnavailable))
	putMachine(t, js, protocol.MachineState{Instance: onEC2, Backend: "ec2", Status: protocol.MachineProvisioning, Before: protocol.MachineRunning,
		MachineID: "i-0old", VolumeID: "vol-1", VolumeSizeGB: 50, RequestID: req.ID})
	f.failed(f.joinRaw(join(machine, aws.proof(t, "i-0aaa"))), 503, string(protocol.CodeUnavailable))
	putMachine(t, js, protocol.MachineState{Instance: onEC2, Backend: "ec2", Status: protocol.MachineRunning, MachineID: "i-0aaa",
		VolumeID: "vol-1", VolumeSizeGB: 50, RequestID: req.ID})

	thief := machineKey(t)
	forged := aws.proof(t, "i-0aaa")
	forged.Document = strings.Replace(forged.Document, "m5.2xlarge", "m5.4xlarge", 1)
	for name, proof := range map[string]*protocol.EC2Identity{
		"none":                  nil,
		"not signed by AWS":     notAWS.proof(t, "i-0aaa"),
		"another machine's":     aws.proof(t, "i-0bbb"),
		"changed after signing": forged,
		"not base64":            {Document: aws.proof(t, "i-0aaa").Document, Signature: "%%%"},
	} {
		t.Run(name, func(t *testing.T) {
			f.failed(f.joinRaw(join(thief, proof)), 401, string(protocol.CodeUnauthenticated))
		})
	}
	var resp protocol.JoinResponse
	f.ok(f.joinRaw(join(machine, aws.proof(t, "i-0aaa"))), &resp)
	if resp.JWT == "" {
		t.Fatal("the machine launched for the token got no credentials")
	}
	f.failed(f.joinRaw(join(thief, aws.proof(t, "i-0aaa"))), 401, string(protocol.CodeUnauthenticated))

	// A local machine joins with its token alone.
	lreq := f.provisionRequest(local)
	putMachine(t, js, protocol.MachineState{Instance: local, Backend: "local", Status: protocol.MachineRunning, MachineID: "pid-1",
		VolumeID: "vol-2", VolumeSizeGB: 50, RequestID: lreq.ID})
	f.ok(f.join(local, lreq.Spec.Join.Token), nil)
}

// notAWSCertOtherRegion is a certificate of another region's: FM tries
// each it was given.
func notAWSCertOtherRegion(t *testing.T) *x509.Certificate { return newIdentitySigner(t).cert }

func TestLoadEC2IdentityCerts(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	a, b := newIdentitySigner(t), newIdentitySigner(t)
	pemOf := func(c *x509.Certificate) string {
		return "-----BEGIN CERTIFICATE-----\n" + base64.StdEncoding.EncodeToString(c.Raw) + "\n-----END CERTIFICATE-----\n"
	}
	certs, err := server.LoadEC2IdentityCerts(write("two.pem", "eu-west-1:\n"+pemOf(a.cert)+"us-east-1:\n"+pemOf(b.cert)))
	if err != nil || len(certs) != 2 {
		t.Fatalf("two certificates: %d, %v", len(certs), err)
	}
	for name, content := range map[string]string{"empty.pem": "", "text.pem": "not a certificate",
		"broken.pem": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
		"ecdsa.pem":  pemOf(a.cert) + pemOf(ecdsaCert(t))} {
		if _, err := server.LoadEC2IdentityCerts(write(name, content)); err == nil {
			t.Errorf("%s was taken", name)
		}
	}
	if _, err := server.LoadEC2IdentityCerts(filepath.Join(dir, "missing.pem")); err == nil {
		t.Error("a missing file was taken")
	}
}

// ecdsaCert is a certificate of no RSA key, as AWS's DSA certificates are
// for the PKCS7 signature: it verifies no base64-encoded signature.
func ecdsaCert(t *testing.T) *x509.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
