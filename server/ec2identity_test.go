package server_test

import (
	"crypto/x509"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/certtest"
	"github.com/fleetmanager/fm/internal/imdstest"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
	"github.com/fleetmanager/fm/server/servertest"
	"github.com/nats-io/nkeys"
)

// TestAnEC2MachineJoinsOnlyWithItsIdentity: given AWS's certificates, FM
// joins a machine the EC2 backend launched only with the identity document
// of the machine launched for the token, signed by AWS: the token alone
// (the EC2 API shows a machine's user data) is of no use elsewhere, and a
// refused join does not bind the token, so the machine still joins after.
// A machine of another backend needs no document.
func TestAnEC2MachineJoinsOnlyWithItsIdentity(t *testing.T) {
	aws, notAWS := imdstest.NewSigner(t), imdstest.NewSigner(t)
	f := startWithAuthority(t, time.Hour, servertest.WithConfig(func(c *server.Config) {
		// Another region's certificate first: FM tries each it was given.
		c.EC2IdentityCerts = []*x509.Certificate{imdstest.NewSigner(t).Cert, aws.Cert}
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
	f.failed(f.joinRaw(join(machine, aws.Proof(t, "i-0aaa"))), 503, string(protocol.CodeUnavailable))
	putMachine(t, js, protocol.MachineState{Instance: onEC2, Backend: "ec2", Status: protocol.MachineProvisioning, Before: protocol.MachineRunning,
		MachineID: "i-0old", VolumeID: "vol-1", VolumeSizeGB: 50, RequestID: req.ID})
	f.failed(f.joinRaw(join(machine, aws.Proof(t, "i-0aaa"))), 503, string(protocol.CodeUnavailable))
	putMachine(t, js, protocol.MachineState{Instance: onEC2, Backend: "ec2", Status: protocol.MachineRunning, MachineID: "i-0aaa",
		VolumeID: "vol-1", VolumeSizeGB: 50, RequestID: req.ID})

	thief := machineKey(t)
	forged := aws.Proof(t, "i-0aaa")
	forged.Document = strings.Replace(forged.Document, "m5.2xlarge", "m5.4xlarge", 1)
	// No document: the agent could not read it (yet); asked again, and
	// counted as a refused attempt.
	f.failed(f.joinRaw(join(thief, nil)), 503, string(protocol.CodeUnavailable))
	for name, proof := range map[string]*protocol.EC2Identity{
		"not signed by AWS":     notAWS.Proof(t, "i-0aaa"),
		"another machine's":     aws.Proof(t, "i-0bbb"),
		"changed after signing": forged,
		"not base64":            {Document: aws.Proof(t, "i-0aaa").Document, Signature: "%%%"},
	} {
		t.Run(name, func(t *testing.T) {
			f.failed(f.joinRaw(join(thief, proof)), 401, string(protocol.CodeUnauthenticated))
		})
	}
	var resp protocol.JoinResponse
	f.ok(f.joinRaw(join(machine, aws.Proof(t, "i-0aaa"))), &resp)
	if resp.JWT == "" {
		t.Fatal("the machine launched for the token got no credentials")
	}
	f.failed(f.joinRaw(join(thief, aws.Proof(t, "i-0aaa"))), 401, string(protocol.CodeUnauthenticated))

	// A local machine joins with its token alone.
	lreq := f.provisionRequest(local)
	putMachine(t, js, protocol.MachineState{Instance: local, Backend: "local", Status: protocol.MachineRunning, MachineID: "pid-1",
		VolumeID: "vol-2", VolumeSizeGB: 50, RequestID: lreq.ID})
	f.ok(f.join(local, lreq.Spec.Join.Token), nil)
}

func TestLoadEC2IdentityCerts(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	a, b := imdstest.NewSigner(t), imdstest.NewSigner(t)
	certs, err := server.LoadEC2IdentityCerts(write("two.pem", "eu-west-1:\n"+string(a.CertPEM())+"us-east-1:\n"+string(b.CertPEM())))
	if err != nil || len(certs) != 2 {
		t.Fatalf("two certificates: %d, %v", len(certs), err)
	}
	for name, content := range map[string]string{"empty.pem": "", "text.pem": "not a certificate",
		"broken.pem": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
		// No RSA key, as AWS's DSA certificates (for the PKCS7 signature).
		"ecdsa.pem": string(a.CertPEM()) + certtest.NewChain(t, "example.com").CAPEM} {
		if _, err := server.LoadEC2IdentityCerts(write(name, content)); err == nil {
			t.Errorf("%s was taken", name)
		}
	}
	if _, err := server.LoadEC2IdentityCerts(filepath.Join(dir, "missing.pem")); err == nil {
		t.Error("a missing file was taken")
	}
}
