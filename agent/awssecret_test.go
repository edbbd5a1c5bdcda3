package agent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/imdstest"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner/ec2/mototest"
)

// TestTheAWSKeyPairFromSecretsManager: a key pair kept in AWS Secrets
// Manager is read there as the machine's instance profile (IMDSv2) and
// written for DSS, the key id from the secret's JSON when the template
// gives none. A secret that does not exist fails the step, saying so,
// without retrying for ever; once a key is written, a secret the machine
// can no longer read (the runtime profile swapped in, allowed less) keeps
// it, with a warning, and the convergence succeeds.
func TestTheAWSKeyPairFromSecretsManager(t *testing.T) {
	moto := mototest.Run(t)
	const secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
	moto.PutSecret(t, "dss/aws", `{"accessKeyId":"AKIAIOSFODNN7EXAMPLE","secretAccessKey":"`+secret+`"}`)
	imds := imdstest.Serve(t, &protocol.EC2Identity{}, 0)
	imds.SetProfile("dss-startup", `{"AccessKeyId":"ASIAEXAMPLE","SecretAccessKey":"profile-secret","Token":"tok"}`)
	r := newRig(t)
	r.cfg.IMDSURL, r.cfg.SecretsManagerEndpoint = imds.URL, moto.URL
	r.startAgent()
	path := filepath.Join(r.root, "home", r.cfg.DSSUser, ".aws", "credentials")

	r.desireWith("14.0.0", func(d *protocol.DesiredState) {
		d.RetryUntil = time.Now().Add(time.Minute)
		d.DSS.AWSCredentials = &protocol.AWSCredentials{AccessKeyID: "AKIAIOSFODNN7EXAMPLE", SecretName: "dss/nothing", SecretRegion: mototest.Region}
	})
	st := r.waitStatus("the missing secret reported", 30*time.Second, func(st protocol.AgentStatus) bool {
		return st.Target == 1 && st.Phase == protocol.PhaseFailed
	})
	if st.Error == nil || st.Error.Code != protocol.CodeFailedPrecondition || !strings.Contains(st.Error.Message, "dss/nothing") ||
		!strings.Contains(st.Error.Message, "ResourceNotFoundException") {
		t.Fatalf("status error: %+v", st.Error)
	}
	if _, err := os.Stat(path); err == nil {
		t.Fatal("a credentials file was written without a key")
	}

	r.desireWith("14.0.0", func(d *protocol.DesiredState) {
		d.DSS.AWSCredentials = &protocol.AWSCredentials{SecretName: "dss/aws", SecretRegion: mototest.Region}
	})
	r.waitReady(2)
	b, err := os.ReadFile(path)
	want := "[default]\naws_access_key_id = AKIAIOSFODNN7EXAMPLE\naws_secret_access_key = " + secret + "\n"
	if err != nil || !strings.Contains(string(b), want) {
		t.Fatalf("credentials file: %q, %v", b, err)
	}

	imds.SetProfile("", "") // the machine's profile can no longer be read (404)
	r.desireWith("14.0.0", func(d *protocol.DesiredState) {
		d.DSS.AWSCredentials = &protocol.AWSCredentials{SecretName: "dss/aws", SecretRegion: mototest.Region}
	})
	r.waitReady(3)
	if b, err := os.ReadFile(path); err != nil || !strings.Contains(string(b), want) {
		t.Fatalf("the key written before was not kept: %q, %v", b, err)
	}
	kept := false
	for _, e := range r.events.all() {
		if strings.Contains(e.Message+e.Output, secret) {
			t.Fatalf("an event carries the secret: %+v", e)
		}
		kept = kept || e.Step == "aws-credentials" && e.Generation == 3 && strings.Contains(e.Message, "the key written before is kept")
	}
	if !kept {
		t.Fatal("no event says the key written before is kept")
	}
}
