package server_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/internal/certtest"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
	"github.com/fleetmanager/fm/server/servertest"
)

// desiredOf reads an instance's desired state and its encoding.
func (f *fm) desiredOf(id string) (protocol.DesiredState, string) {
	f.t.Helper()
	kv, err := f.env.Bus.JetStream(f.t).KeyValue(context.Background(), protocol.BucketDesired)
	if err != nil {
		f.t.Fatal(err)
	}
	e, err := kv.Get(context.Background(), id)
	if err != nil {
		f.t.Fatal(err)
	}
	var d protocol.DesiredState
	if err := protocol.Decode(e.Value(), &d); err != nil {
		f.t.Fatal(err)
	}
	return d, string(e.Value())
}

// setHTTPS saves the network's HTTPS strategy, as FMVirtualNetwork.save
// does after https_strategy.
func (f *fm) setHTTPS(vn api.VirtualNetwork, https, http, mail string) {
	f.t.Helper()
	m := map[string]any{}
	f.ok(f.do("GET", "/virtual-networks/"+vn.ID, ""), &m)
	m["httpsStrategy"], m["httpStrategy"], m["contactMail"] = https, http, mail
	f.ok(f.do("PUT", "/virtual-networks/"+vn.ID, mustJSON(f.t, m)), nil)
}

// TestTheNetworksHTTPSStrategyReachesTheMachine: a reprovision gives the
// agent the HTTPS front of the network's strategy: on the local backend
// within the instance's block of ports; the instance's certificate, with
// its key, sealed for the new machine; Let's Encrypt's (or the configured)
// ACME directory and the network's contact mail. NONE gives none.
func TestTheNetworksHTTPSStrategyReachesTheMachine(t *testing.T) {
	f := startWithAuthority(t, 0, servertest.WithConfig(func(c *server.Config) {
		c.LocalBackend = true
		c.ACME = server.ACMEConfig{DirectoryURL: "https://acme.example.com/dir", CAPEM: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"}
	}))
	vn, tpl, _ := f.fleet()
	kit := f.addImageWithKit("dss-14.0.0-k", "14.0.0")
	chain := certtest.NewChain(t, "dss.example.com")
	certOnly, withKey := chain.Certificates(), chain.Instance()
	in := f.createInstance(`{"label":"tls","virtualNetworkId":"` + vn.ID + `","instanceSettingsTemplateId":"` + tpl.ID +
		`","imageId":"` + kit.ID + `","sslCertificatePEM":` + mustJSON(t, certOnly) + `}`)
	reprovision := func() protocol.DesiredState {
		t.Helper()
		var op api.Future
		f.ok(f.do("GET", "/instances/"+in.ID+"/actions/reprovision", ""), &op)
		f.ok(f.do("DELETE", "/futures/"+op.JobID, ""), nil)
		waitState(t, f, in.ID, "failed")
		d, _ := f.desiredOf(in.ID)
		return d
	}

	d := reprovision()
	if d.DSS.HTTPS != nil {
		t.Fatalf("httpsStrategy NONE gave a front: %+v", d.DSS.HTTPS)
	}
	base := d.DSS.Port

	f.setHTTPS(vn, "SELF_SIGNED", "REDIRECT", "")
	d = reprovision()
	want := protocol.HTTPSTarget{Strategy: "SELF_SIGNED", Port: base + 8, HTTPPort: base + 9, Redirect: true}
	if d.DSS.HTTPS == nil || *d.DSS.HTTPS != want {
		t.Fatalf("SELF_SIGNED + REDIRECT: %+v, want %+v", d.DSS.HTTPS, want)
	}
	f.setHTTPS(vn, "SELF_SIGNED", "DISABLE", "")
	if d = reprovision(); d.DSS.HTTPS == nil || d.DSS.HTTPS.HTTPPort != 0 || d.DSS.HTTPS.Redirect {
		t.Fatalf("SELF_SIGNED + DISABLE: %+v", d.DSS.HTTPS)
	}

	// A custom certificate without its key is refused before anything starts.
	f.setHTTPS(vn, "CUSTOM_CERTIFICATE", "REDIRECT", "")
	before := f.snapshotOf("/instances/" + in.ID + "/status")
	e := f.failed(f.do("GET", "/instances/"+in.ID+"/actions/reprovision", ""), 409, "FailedPrecondition")
	if !strings.Contains(e.DetailedMessage, "sslCertificatePEM") || strings.Contains(e.DetailedMessage, "BEGIN") {
		t.Fatalf("refusal: %s", e.DetailedMessage)
	}
	if after := f.snapshotOf("/instances/" + in.ID + "/status"); after != before {
		t.Fatalf("a refused reprovision changed the instance:\n%s\n%s", before, after)
	}
	m := map[string]any{}
	f.ok(f.do("GET", "/instances/"+in.ID, ""), &m)
	m["sslCertificatePEM"] = withKey
	f.ok(f.do("PUT", "/instances/"+in.ID, mustJSON(t, m)), nil)
	d = reprovision()
	_, raw := f.desiredOf(in.ID)
	if h := d.DSS.HTTPS; h == nil || h.Strategy != "CUSTOM_CERTIFICATE" || h.Certificate != "" || !strings.HasPrefix(h.SealedCertificate, "fmsealed") {
		t.Fatalf("CUSTOM_CERTIFICATE: %+v", h)
	}
	if strings.Contains(raw, "PRIVATE KEY") || strings.Contains(raw, "BEGIN CERTIFICATE") {
		t.Fatal("the desired state carries the certificate in clear")
	}

	f.setHTTPS(vn, "LETSENCRYPT", "REDIRECT", "ops@example.com")
	d = reprovision()
	wantACME := protocol.ACMETarget{DirectoryURL: "https://acme.example.com/dir", Email: "ops@example.com", CACert: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"}
	if h := d.DSS.HTTPS; h == nil || h.Strategy != "LETSENCRYPT" || h.HTTPPort != base+9 || h.ACME == nil || *h.ACME != wantACME {
		t.Fatalf("LETSENCRYPT: %+v", h)
	}
}

// TestTheTemplatesAWSKeyPairReachesTheMachineSealed: a template's
// INLINE_ENCRYPTED key pair for DSS reaches the desired state with its
// secret sealed for the new machine; one kept in Secrets Manager is refused
// on the local backend, whose machines cannot read it.
func TestTheTemplatesAWSKeyPairReachesTheMachineSealed(t *testing.T) {
	f := startWithAuthority(t, 0, servertest.WithConfig(func(c *server.Config) { c.LocalBackend = true }))
	vn, _, _ := f.fleet()
	kit := f.addImageWithKit("dss-14.0.0-k", "14.0.0")
	const secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
	tpl := f.createTemplate(`{"label":"keys","setupActions":[],"dataikuAwsAPIAccessMode":"KEYPAIR","dataikuAwsKeypairStorageMode":"INLINE_ENCRYPTED",
		"dataikuAwsAccessKeyId":"AKIAIOSFODNN7EXAMPLE","dataikuAwsSecretAccessKey":"` + secret + `"}`)
	in := f.createInstance(instanceBody("keys", vn.ID, tpl.ID, kit.ID))
	var op api.Future
	f.ok(f.do("GET", "/instances/"+in.ID+"/actions/reprovision", ""), &op)
	d, raw := f.desiredOf(in.ID)
	if c := d.DSS.AWSCredentials; c == nil || c.AccessKeyID != "AKIAIOSFODNN7EXAMPLE" || c.SecretAccessKey != "" || !strings.HasPrefix(c.SealedSecretAccessKey, "fmsealed") {
		t.Fatalf("awsCredentials: %+v", d.DSS.AWSCredentials)
	}
	if strings.Contains(raw, secret) {
		t.Fatal("the desired state carries the secret in clear")
	}
	f.ok(f.do("DELETE", "/futures/"+op.JobID, ""), nil)
	waitState(t, f, in.ID, "failed")

	m := map[string]any{}
	f.ok(f.do("GET", "/instance-settings-templates/"+tpl.ID, ""), &m)
	m["dataikuAwsKeypairStorageMode"], m["dataikuAwsSecretAccessKeyAwsSecretName"], m["awsSecretsManagerRegion"] = "AWS_SECRETS_MANAGER", "dss/key", "eu-west-1"
	f.ok(f.do("PUT", "/instance-settings-templates/"+tpl.ID, mustJSON(t, m)), nil)
	e := f.failed(f.do("GET", "/instances/"+in.ID+"/actions/reprovision", ""), 409, "FailedPrecondition")
	if !strings.Contains(e.DetailedMessage, "Secrets Manager") {
		t.Fatalf("refusal: %+v", e)
	}
}

// TestAKeyPairInSecretsManagerTravelsByName: on a cloud, a key pair kept in
// AWS Secrets Manager reaches the desired state as the secret's name and
// region (and the template's key id), for the agent to read there; no
// secret travels.
func TestAKeyPairInSecretsManagerTravelsByName(t *testing.T) {
	f := startWithAuthority(t, 0)
	vn, _, _ := f.fleet()
	kit := f.addImageWithKit("dss-14.0.0-k", "14.0.0")
	tpl := f.createTemplate(`{"label":"keys","setupActions":[],"dataikuAwsAPIAccessMode":"KEYPAIR","dataikuAwsKeypairStorageMode":"AWS_SECRETS_MANAGER",
		"dataikuAwsAccessKeyId":"AKIAIOSFODNN7EXAMPLE","dataikuAwsSecretAccessKeyAwsSecretName":"dss/key","awsSecretsManagerRegion":"eu-west-1"}`)
	in := f.createInstance(instanceBody("keys", vn.ID, tpl.ID, kit.ID))
	f.ok(f.do("GET", "/instances/"+in.ID+"/actions/reprovision", ""), nil)
	d, raw := f.desiredOf(in.ID)
	want := protocol.AWSCredentials{AccessKeyID: "AKIAIOSFODNN7EXAMPLE", SecretName: "dss/key", SecretRegion: "eu-west-1"}
	if c := d.DSS.AWSCredentials; c == nil || *c != want || strings.Contains(raw, "ecretAccessKey\"") {
		t.Fatalf("a key pair in Secrets Manager: %+v\n%s", d.DSS.AWSCredentials, raw)
	}
}

// TestTheNetworksAccessReachesTheMachineSpec: the provisioner is told the
// network's internet access mode, and the ports DSS's users reach (DSS's
// own without an HTTPS front; the front's, with 80 when it redirects or
// answers ACME's challenges, and never DSS's own beside it); a network
// without internet access gives no public address, whatever
// awsAssignPublicIP says.
func TestTheNetworksAccessReachesTheMachineSpec(t *testing.T) {
	f := start(t)
	vn, tpl, _ := f.fleet()
	im := f.addImageWithKit("dss-14.0.0-access", "14.0.0")
	for i, tc := range []struct {
		access, https, http string
		public, peer        bool
		ports               []int
	}{
		{"YES", "NONE", "DISABLE", true, false, []int{10000}},
		{"YES", "SELF_SIGNED", "DISABLE", true, false, []int{443}},
		{"YES", "SELF_SIGNED", "REDIRECT", true, false, []int{443, 80}},
		{"EGRESS_ONLY", "LETSENCRYPT", "DISABLE", false, true, []int{443, 80}},
		{"NO", "NONE", "DISABLE", false, true, []int{10000}},
	} {
		t.Run(tc.access+"/"+tc.https+"/"+tc.http, func(t *testing.T) {
			m := map[string]any{}
			f.ok(f.do("GET", "/virtual-networks/"+vn.ID, ""), &m)
			m["internetAccessMode"], m["httpsStrategy"], m["httpStrategy"], m["contactMail"] = tc.access, tc.https, tc.http, "ops@example.com"
			m["autoCreatePeerings"] = tc.peer
			f.ok(f.do("PUT", "/virtual-networks/"+vn.ID, mustJSON(t, m)), nil)
			in := f.createInstance(instanceBody(fmt.Sprintf("access%d", i), vn.ID, tpl.ID, im.ID))
			spec := f.provisionRequest(in.ID).Spec
			n := spec.Network
			if n.InternetAccess != tc.access || n.AssignPublicIP != tc.public || !slices.Equal(n.WebPorts, tc.ports) {
				t.Fatalf("network spec: access %q public %v ports %v; want %q %v %v", n.InternetAccess, n.AssignPublicIP, n.WebPorts, tc.access, tc.public, tc.ports)
			}
			// FM's own network (servertest's defaults) is the peer.
			want := &protocol.PeeringSpec{VpcID: "vpc-0fm", SubnetID: "subnet-0fm", Region: "eu-west-1"}
			if tc.peer != (n.Peering != nil) || tc.peer && *n.Peering != *want {
				t.Fatalf("peering %+v, want %v", n.Peering, tc.peer)
			}
		})
	}
	// The network is NO now: an elastic IP is refused before anything is
	// recorded or sent.
	body := strings.TrimSuffix(instanceBody("eip", vn.ID, tpl.ID, im.ID), "}") + `,"awsAssignElasticIP":true}`
	eip := f.createInstance(body)
	e := f.failed(f.do("GET", "/instances/"+eip.ID+"/actions/reprovision", ""), 409, "FailedPrecondition")
	if !strings.Contains(e.DetailedMessage, "no public address") {
		t.Fatalf("refusal: %+v", e)
	}
	var ops []api.Future
	f.ok(f.do("GET", "/futures?targetId="+eip.ID, ""), &ops)
	if len(ops) != 0 {
		t.Fatalf("operations recorded for a refused reprovision: %+v", ops)
	}
}
