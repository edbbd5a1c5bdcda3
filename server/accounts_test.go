package server_test

import (
	"context"
	"net/http"
	"strings"
	"testing"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

// TestCloudAccounts: accounts of the three AWS modes are made, shown with
// nbNetworks and without their secret (sealed at rest); another cloud's is
// refused naming it; bad input changes nothing; a network names an
// account that exists, which cannot go while the network does; a save
// keeps the secret, FM's external id and the keys FM does not know; only
// admins change them.
func TestCloudAccounts(t *testing.T) {
	f := start(t)
	var role, pair, own api.CloudAccount
	f.ok(f.do("POST", "/cloud-accounts", `{"label":"prod","awsAuthenticationMode":"IAM_ROLE","awsIAMRoleARN":"arn:aws:iam::123456789012:role/fm-prod"}`), &role)
	f.ok(f.do("POST", "/cloud-accounts", `{"label":"keys","awsAuthenticationMode":"KEYPAIR","awsAccessKeyId":"AKIAIOSFODNN7EXAMPLE","awsSecretAccessKey":"wJalrXUtnFEMI"}`), &pair)
	f.ok(f.do("POST", "/cloud-accounts", `{"label":"own"}`), &own)
	if role.ID == "" || !strings.HasPrefix(role.AWSExternalID, "fm-") || role.NbNetworks != 0 {
		t.Fatalf("role account: %+v", role)
	}
	if pair.AWSSecretAccessKey != "" || pair.AWSAccessKeyID != "AKIAIOSFODNN7EXAMPLE" || own.AWSAuthenticationMode != api.AWSAuthDefaultInstance {
		t.Fatalf("key pair %+v, own %+v", pair, own)
	}
	raw, err := f.env.Bus.JetStream(t).KeyValue(context.Background(), protocol.BucketAccounts)
	if err != nil {
		t.Fatal(err)
	}
	if e, err := raw.Get(context.Background(), pair.ID); err != nil || strings.Contains(string(e.Value()), "wJalrXUtnFEMI") {
		t.Fatalf("the key pair's secret at rest: %v %s", err, e.Value())
	}

	for _, bad := range []struct{ body, errorType, says string }{
		{`{"label":"az","azureAuthenticationMode":"MANAGED_IDENTITY","azureTenantId":"t"}`, "Unimplemented", "Azure"},
		{`{"label":"g","gcpAuthenticationMode":"JSON_KEY","gcpProjectId":"p"}`, "Unimplemented", "GCP"},
		{`{"label":"r","awsAuthenticationMode":"IAM_ROLE"}`, "InvalidArgument", "awsIAMRoleARN"},
		{`{"label":"k","awsAuthenticationMode":"KEYPAIR","awsAccessKeyId":"AKIAIOSFODNN7EXAMPLE"}`, "InvalidArgument", "awsSecretAccessKey"},
		{`{"label":"m","awsAuthenticationMode":"SAME_AS_FM"}`, "InvalidArgument", "awsAuthenticationMode"},
		{`{"label":"prod"}`, "", "prod"}, // the label is taken
		{`{"label":3}`, "InvalidArgument", ""},
	} {
		r := f.do("POST", "/cloud-accounts", bad.body)
		if r.status < 400 || !strings.Contains(string(r.body), bad.errorType) || !strings.Contains(string(r.body), bad.says) {
			t.Errorf("POST %s: %d %s", bad.body, r.status, r.body)
		}
	}
	var all []api.CloudAccount
	f.ok(f.do("GET", "/cloud-accounts", ""), &all)
	if len(all) != 3 {
		t.Fatalf("%d accounts after the refused ones, want 3", len(all))
	}

	// A network names an account that exists.
	base := `"mode":"EXISTING_MONOTENANT","awsVpcId":"vpc-1","awsSubnetId":"subnet-1"`
	f.failed(f.do("POST", "/virtual-networks", `{"label":"nowhere",`+base+`,"accountId":"ca-missing"}`), http.StatusBadRequest, "InvalidArgument")
	vn := f.createNetwork(`{"label":"on-prod",` + base + `,"accountId":"` + role.ID + `"}`)
	var got api.CloudAccount
	f.ok(f.do("GET", "/cloud-accounts/"+role.ID, ""), &got)
	if got.NbNetworks != 1 {
		t.Fatalf("nbNetworks %d, want 1", got.NbNetworks)
	}
	f.failed(f.do("DELETE", "/cloud-accounts/"+role.ID, ""), http.StatusConflict, "FailedPrecondition")
	f.ok(f.do("GET", "/cloud-accounts/"+role.ID, ""), &got)
	if got.Deleting {
		t.Fatalf("a refused deletion left the account marked: %+v", got)
	}

	// A save echoes what GET gave, with changes and keys FM does not know.
	var echo map[string]any
	f.ok(f.do("GET", "/cloud-accounts/"+pair.ID, ""), &echo)
	echo["description"], echo["someFutureField"], echo["nbNetworks"] = "rotated", "kept", 7
	f.ok(f.do("PUT", "/cloud-accounts/"+pair.ID, mustJSON(t, echo)), nil)
	f.ok(f.do("GET", "/cloud-accounts/"+pair.ID, ""), &echo)
	if echo["description"] != "rotated" || echo["someFutureField"] != "kept" || echo["nbNetworks"] != float64(0) || echo["awsSecretAccessKey"] != nil {
		t.Fatalf("after a save: %v", echo)
	}
	f.ok(f.do("GET", "/cloud-accounts/"+role.ID, ""), &echo)
	echo["awsExternalId"], echo["awsexternalid"], echo["AWSExternalID"] = "forged", "forged", "forged"
	f.ok(f.do("PUT", "/cloud-accounts/"+role.ID, mustJSON(t, echo)), nil)
	// Saved again from the same read, as Dataiku's client does (it does
	// not read an account after a save): not a conflict.
	echo["description"] = "saved twice"
	f.ok(f.do("PUT", "/cloud-accounts/"+role.ID, mustJSON(t, echo)), nil)
	r := f.do("GET", "/cloud-accounts/"+role.ID, "")
	f.ok(r, &got)
	if got.AWSExternalID != role.AWSExternalID || got.Description != "saved twice" || strings.Contains(string(r.body), "forged") {
		t.Fatalf("after two saves from one read: %s", r.body)
	}
	// A hand-written save that leaves the identity out keeps it.
	f.ok(f.do("PUT", "/cloud-accounts/"+pair.ID, `{"label":"keys","description":"by hand"}`), nil)
	f.ok(f.do("GET", "/cloud-accounts/"+pair.ID, ""), &got)
	if got.AWSAuthenticationMode != api.AWSAuthKeypair || got.AWSAccessKeyID != "AKIAIOSFODNN7EXAMPLE" {
		t.Fatalf("a save without the identity changed it: %+v", got)
	}

	// The instances of the network are provisioned as the account.
	tpl := f.createTemplate(`{"label":"tpl","setupActions":[]}`)
	im := f.addImageWithKit("dss-14.0.0-test", "14.0.0")
	in := f.createInstance(instanceBody("as-prod", vn.ID, tpl.ID, im.ID))
	var op api.Future
	f.ok(f.do("GET", "/instances/"+in.ID+"/actions/reprovision", ""), &op)
	req, _ := opRequest(t, f.env.Bus.JetStream(t), op.JobID)
	if c := req.Cloud; c == nil || c.Mode != protocol.CloudAuthIAMRole || c.RoleARN != "arn:aws:iam::123456789012:role/fm-prod" ||
		c.ExternalID != role.AWSExternalID {
		t.Fatalf("the provision request's identity: %+v", req.Cloud)
	}
	// Once the account is the identity of a volume, it stays the same
	// identity: another would find nothing, and take it for gone.
	runningWithVolume(t, f.env.Bus, in.ID)
	f.ok(f.do("GET", "/cloud-accounts/"+role.ID, ""), &echo)
	echo["awsIAMRoleARN"] = "arn:aws:iam::210987654321:role/elsewhere"
	e := f.failed(f.do("PUT", "/cloud-accounts/"+role.ID, mustJSON(t, echo)), http.StatusConflict, "FailedPrecondition")
	if !strings.Contains(e.DetailedMessage, in.ID) {
		t.Fatalf("the refusal does not name the instance: %+v", e)
	}
	echo["awsIAMRoleARN"], echo["description"] = "arn:aws:iam::123456789012:role/fm-prod", "same identity"
	f.ok(f.do("PUT", "/cloud-accounts/"+role.ID, mustJSON(t, echo)), nil)

	v := f.newKey("viewer")
	if r := f.doAs("POST", "/cloud-accounts", `{"label":"v"}`, v.ID, v.Secret); r.status != http.StatusForbidden {
		t.Errorf("a viewer's POST: %d", r.status)
	}
	if r := f.doAs("GET", "/cloud-accounts/"+pair.ID, "", v.ID, v.Secret); r.status != http.StatusOK || strings.Contains(string(r.body), "wJalrXUtnFEMI") {
		t.Errorf("a viewer's GET: %d %s", r.status, r.body)
	}

	// Gone once nothing names it.
	f.ok(f.do("DELETE", "/cloud-accounts/"+own.ID, ""), nil)
	if r := f.do("GET", "/cloud-accounts/"+own.ID, ""); r.status != http.StatusNotFound {
		t.Fatalf("a deleted account: %d", r.status)
	}
}
