package awsapi_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/fleetmanager/fm/internal/awsapi"
	"github.com/fleetmanager/fm/internal/imdstest"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner/ec2/mototest"
)

// TestSignAsTheSDKDoes: the signature is the AWS SDK's own, for requests
// with and without a session token, a query, a path to escape.
func TestSignAsTheSDKDoes(t *testing.T) {
	at := time.Date(2026, 12, 6, 12, 36, 0, 0, time.UTC)
	for _, tc := range []struct {
		name, method, url, body string
		creds                   awsapi.Credentials
	}{
		{"secrets manager", "POST", "https://secretsmanager.eu-west-1.amazonaws.com/", `{"SecretId":"dss/aws"}`,
			awsapi.Credentials{AccessKeyID: "AKIDEXAMPLE", SecretAccessKey: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"}},
		{"session token", "POST", "https://secretsmanager.eu-west-1.amazonaws.com/", `{"SecretId":"x"}`,
			awsapi.Credentials{AccessKeyID: "ASIAEXAMPLE", SecretAccessKey: "secret", Token: "the-session-token"}},
		{"query and path", "GET", "https://example.amazonaws.com/a%20b/c?b=2&a=1&a=0&x=y%20z", "",
			awsapi.Credentials{AccessKeyID: "AKIDEXAMPLE", SecretAccessKey: "secret"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mine, err := http.NewRequest(tc.method, tc.url, strings.NewReader(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			mine.Header.Set("Content-Type", "application/x-amz-json-1.1")
			mine.Header.Set("User-Agent", "fm-agent") // not signed, by either
			sdk := mine.Clone(context.Background())
			awsapi.Sign(mine, []byte(tc.body), tc.creds, "eu-west-1", "secretsmanager", at)

			sum := sha256.Sum256([]byte(tc.body))
			payload := hex.EncodeToString(sum[:])
			sdk.Header.Set("X-Amz-Content-Sha256", payload)
			err = v4.NewSigner().SignHTTP(context.Background(), aws.Credentials{AccessKeyID: tc.creds.AccessKeyID,
				SecretAccessKey: tc.creds.SecretAccessKey, SessionToken: tc.creds.Token}, sdk, payload, "secretsmanager", "eu-west-1", at)
			if err != nil {
				t.Fatal(err)
			}
			if got, want := mine.Header.Get("Authorization"), sdk.Header.Get("Authorization"); got != want {
				t.Fatalf("signature\n got %s\nwant %s", got, want)
			}
		})
	}
}

// TestSecretStringFromMoto: a secret kept in (moto's) Secrets Manager is
// read back; one that does not exist is the service's refusal, not
// transient.
func TestSecretStringFromMoto(t *testing.T) {
	m := mototest.Run(t)
	c := awsapi.Credentials{AccessKeyID: "AKIDEXAMPLE", SecretAccessKey: "secret"}
	m.PutSecret(t, "dss/aws", "wJalrXUtnFEMI/K7MDENG")
	sm := awsapi.SecretsManager{Endpoint: m.URL}
	got, err := sm.SecretString(context.Background(), c, mototest.Region, "dss/aws")
	if err != nil || got != "wJalrXUtnFEMI/K7MDENG" {
		t.Fatalf("secret = %q, %v", got, err)
	}
	_, err = sm.SecretString(context.Background(), c, mototest.Region, "dss/nothing")
	var e *awsapi.Error
	if !errors.As(err, &e) || e.Code != "ResourceNotFoundException" || e.Transient() {
		t.Fatalf("a missing secret: %v", err)
	}
}

// TestRoleCredentials: the instance profile's credentials, read in an
// IMDSv2 session; a machine without a profile says so.
func TestRoleCredentials(t *testing.T) {
	m := imdstest.Serve(t, &protocol.EC2Identity{}, 1)
	m.SetProfile("dss-runtime", `{"Code":"Success","AccessKeyId":"ASIAEXAMPLE","SecretAccessKey":"s3cr3t","Token":"tok","Expiration":"2026-12-06T18:00:00Z"}`)
	imds := awsapi.IMDS{Base: m.URL}
	if _, err := imds.RoleCredentials(context.Background()); err == nil {
		t.Fatal("the first token request, refused, gave credentials")
	}
	c, err := imds.RoleCredentials(context.Background())
	if err != nil || c != (awsapi.Credentials{AccessKeyID: "ASIAEXAMPLE", SecretAccessKey: "s3cr3t", Token: "tok"}) {
		t.Fatalf("credentials %+v, %v", c, err)
	}
	m.SetProfile("", "") // the service then answers 404, as EC2's does
	if _, err := imds.RoleCredentials(context.Background()); !errors.Is(err, awsapi.ErrNoInstanceProfile) {
		t.Fatalf("credentials without an instance profile: %v", err)
	}
}
