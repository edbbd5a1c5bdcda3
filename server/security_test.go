package server_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/bus/bustest"
)

type key struct{ ID, Secret, Role string }

func (f *fm) newKey(role string) key {
	f.t.Helper()
	var k key
	f.ok(f.do("POST", "/api-keys", `{"label":"`+role+` `+time.Now().Format("150405.000000")+`","role":"`+role+`"}`), &k)
	if k.ID == "" || k.Secret == "" || k.Role != role {
		f.t.Fatalf("created key %+v", k)
	}
	return k
}

func TestEveryEndpointUnderEveryRole(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("i", vn.ID, tpl.ID, im.ID))
	keys := map[string]key{"viewer": f.newKey("viewer"), "operator": f.newKey("operator"), "admin": {ID: f.env.Key.ID, Secret: f.env.Key.Secret}}
	rank := map[string]int{"viewer": 1, "operator": 2, "admin": 3}
	i := "/instances/" + in.ID
	endpoints := []struct{ method, path, body, needs string }{
		{"GET", "/virtual-networks", "", "viewer"},
		{"GET", "/virtual-networks/" + vn.ID, "", "viewer"},
		{"POST", "/virtual-networks?useDefaultValues=False", `{"label":"x"}`, "admin"},
		{"PUT", "/virtual-networks/" + vn.ID, `{"label":"net"}`, "admin"},
		{"DELETE", "/virtual-networks/vn-none", "", "admin"},
		{"GET", "/instance-settings-templates", "", "viewer"},
		{"POST", "/instance-settings-templates", `{"label":""}`, "admin"},
		{"PUT", "/instance-settings-templates/" + tpl.ID, `{"label":"tpl"}`, "admin"},
		{"DELETE", "/instance-settings-templates/ist-none", "", "admin"},
		{"GET", "/instances", "", "viewer"},
		{"GET", i, "", "viewer"},
		{"GET", i + "/status", "", "viewer"},
		{"POST", "/instances", `{"label":""}`, "operator"},
		{"PUT", i, `{"label":"i"}`, "operator"},
		{"GET", i + "/admin-api-key", "", "operator"},
		{"GET", i + "/actions/get-initial-password", "", "operator"},
		{"GET", i + "/actions/start", "", "operator"},
		{"GET", i + "/actions/stop", "", "operator"},
		{"GET", i + "/actions/reprovision", "", "operator"},
		{"GET", i + "/actions/deprovision", "", "operator"},
		{"GET", i + "/actions/restart-dss", "", "operator"},
		{"GET", i + "/actions/replay-setup-actions", "", "operator"},
		{"POST", i + "/actions/reset-user-password", `{"userName":"a","password":"b"}`, "operator"},
		{"GET", i + "/actions/delete?force=False", "", "operator"},
		{"GET", i + "/snapshots", "", "viewer"},
		{"POST", i + "/snapshots?reasonForSnapshot=x", "", "operator"},
		{"GET", i + "/snapshots/snap-none", "", "viewer"},
		{"DELETE", i + "/snapshots/snap-none", "", "operator"},
		{"POST", i + "/snapshots/snap-none/reprovision", "", "operator"},
		{"GET", "/images", "", "viewer"},
		{"POST", "/images", `{"id":""}`, "admin"},
		{"DELETE", "/images/none", "", "admin"},
		{"GET", "/futures", "", "viewer"},
		{"GET", "/futures/op-none?peek=True", "", "viewer"},
		{"DELETE", "/futures/op-none", "", "operator"},
		{"GET", "/cloud-tags", "", "viewer"},
		{"PUT", "/cloud-tags", `{}`, "admin"},
		{"GET", "/cloud-credentials", "", "viewer"},
		{"PUT", "/cloud-credentials", `{"awsAuthenticationMode":"NOPE"}`, "admin"},
		{"GET", "/api-keys", "", "admin"},
		{"POST", "/api-keys", `{"label":"","role":"viewer"}`, "admin"},
		{"DELETE", "/api-keys/none", "", "admin"},
		{"GET", "/audit?limit=1", "", "admin"},
	}
	for _, ep := range endpoints {
		for role, k := range keys {
			t.Run(role+" "+ep.method+" "+ep.path, func(t *testing.T) {
				r := f.doAs(ep.method, ep.path, ep.body, k.ID, k.Secret)
				if rank[role] < rank[ep.needs] {
					e := f.failed(r, 403, "PermissionDenied")
					if !strings.Contains(e.DetailedMessage, ep.needs) {
						t.Fatalf("the refusal does not say the role needed: %s", e.DetailedMessage)
					}
				} else if r.status == 403 || r.status == 401 {
					t.Fatalf("%s may %s %s but got %d %s", role, ep.method, ep.path, r.status, r.body)
				}
			})
		}
	}
}

func TestViewerSeesNoSecret(t *testing.T) {
	f := start(t)
	v := f.newKey("viewer")
	license := `{\n  \"content\": {\"licensee\": \"ACME-SECRET-LICENSE\"}\n}`
	f.createTemplate(`{"label":"lic","license":"` + license + `"}`)
	f.ok(f.do("PUT", "/cloud-credentials", `{"licenseMode":"STATIC","license":"`+license+`","awsAuthenticationMode":"KEYPAIR","awsAccessKeyId":"AKIAIOSFODNN7EXAMPLE","awsSecretAccessKey":"SECRET-KEY-VALUE"}`), nil)
	for _, p := range []string{"/instance-settings-templates", "/cloud-credentials"} {
		r := f.doAs("GET", p, "", v.ID, v.Secret)
		f.ok(r, nil)
		if strings.Contains(string(r.body), "ACME-SECRET-LICENSE") || strings.Contains(string(r.body), "SECRET-KEY-VALUE") {
			t.Errorf("a viewer sees a secret in %s: %s", p, r.body)
		}
		// An admin sees the license, never the secret key.
		r = f.do("GET", p, "")
		if !strings.Contains(string(r.body), "ACME-SECRET-LICENSE") || strings.Contains(string(r.body), "SECRET-KEY-VALUE") {
			t.Errorf("admin view of %s: %s", p, r.body)
		}
	}
}

func TestKeysRevocationAndRateLimit(t *testing.T) {
	f := start(t)
	op := f.newKey("operator")
	f.ok(f.doAs("GET", "/instances", "", op.ID, op.Secret), nil)
	var listed []map[string]any
	f.ok(f.do("GET", "/api-keys", ""), &listed)
	if len(listed) != 2 || strings.Contains(mustJSON(t, listed), op.Secret) || strings.Contains(mustJSON(t, listed), "pbkdf2") {
		t.Fatalf("key list %v", listed)
	}
	f.ok(f.do("DELETE", "/api-keys/"+op.ID, ""), nil)
	f.failed(f.doAs("GET", "/instances", "", op.ID, op.Secret), 401, "Unauthenticated")
	f.failed(f.do("DELETE", "/api-keys/"+f.env.Key.ID, ""), 409, "FailedPrecondition")
	f.failed(f.do("POST", "/api-keys", `{"label":"x","role":"root"}`), 400, "InvalidArgument")

	// Ten failures from an address in a minute block it, right key or not
	// (the revoked key's attempt above was the first).
	for n := 1; n < 10; n++ {
		f.failed(f.doAs("GET", "/instances", "", f.env.Key.ID, "wrong"), 401, "Unauthenticated")
	}
	f.failed(f.do("GET", "/instances", ""), 429, "ResourceExhausted")
}

func TestAuditTrail(t *testing.T) {
	f := start(t)
	v := f.newKey("viewer")
	vn := f.createNetwork(`{"label":"audited","awsVpcId":"vpc-1","awsSubnetId":"subnet-1"}`)
	f.failed(f.doAs("DELETE", "/virtual-networks/"+vn.ID, "", v.ID, v.Secret), 403, "PermissionDenied")
	f.failed(f.doAs("GET", "/instances", "", v.ID, "wrong-secret"), 401, "Unauthenticated")
	f.ok(f.do("GET", "/virtual-networks", ""), nil) // reads are not audited
	var entries []struct {
		Seq uint64
		api.Future
		Who, Role, From, Action, Object, ObjectID, Outcome string
		Status                                             int
	}
	f.ok(f.do("GET", "/audit?limit=1000", ""), &entries)
	type seen struct{ who, action, outcome string }
	var got []seen
	for _, e := range entries {
		got = append(got, seen{e.Who, e.Action, e.Outcome})
		if e.From == "" || e.Object == "" {
			t.Errorf("incomplete record %+v", e)
		}
	}
	raw := mustJSON(t, got)
	for _, want := range []seen{
		{"key:" + f.env.Key.ID, "POST /api/public/tenants/main/virtual-networks", "ok"},
		{"key:" + v.ID, "DELETE /api/public/tenants/main/virtual-networks/" + vn.ID, "refused"},
		{"key:" + v.ID, "GET /api/public/tenants/main/instances", "refused"},
	} {
		if !strings.Contains(raw, mustJSON(t, want)[1:len(mustJSON(t, want))-1]) {
			t.Errorf("audit lacks %+v in %s", want, raw)
		}
	}
	if strings.Contains(raw, "GET /api/public/tenants/main/virtual-networks\"") {
		t.Error("a read was audited")
	}
	if strings.Contains(raw, "wrong-secret") || strings.Contains(raw, v.Secret) {
		t.Error("a secret reached the audit trail")
	}
	// Paging: after the last sequence there is nothing.
	var rest []json.RawMessage
	f.ok(f.do("GET", "/audit?after="+mustJSON(t, entries[len(entries)-1].Seq+100), ""), &rest)
	if len(rest) != 0 {
		t.Fatalf("after the end: %s", rest)
	}
}

func TestSecretsAreSealedInTheBuckets(t *testing.T) {
	f := start(t)
	license := `{\n  \"content\": {\"licensee\": \"ACME-SECRET-LICENSE\"}\n}`
	f.createTemplate(`{"label":"lic","license":"` + license + `","dataikuAwsAPIAccessMode":"KEYPAIR","dataikuAwsKeypairStorageMode":"INLINE_ENCRYPTED","dataikuAwsAccessKeyId":"AKIAIOSFODNN7EXAMPLE","dataikuAwsSecretAccessKey":"TEMPLATE-SECRET-KEY"}`)
	f.ok(f.do("PUT", "/cloud-credentials", `{"licenseMode":"AUTO_UPDATE","licenseToken":"TENANT-LICENSE-TOKEN","awsAuthenticationMode":"KEYPAIR","awsAccessKeyId":"AKIAIOSFODNN7EXAMPLE","awsSecretAccessKey":"TENANT-SECRET-KEY"}`), nil)
	raw := bustest.Dump(t, f.env.Bus.JetStream(t))
	for _, secret := range []string{"ACME-SECRET-LICENSE", "TEMPLATE-SECRET-KEY", "TENANT-LICENSE-TOKEN", "TENANT-SECRET-KEY", f.env.Key.Secret} {
		if strings.Contains(raw, secret) {
			t.Errorf("%s is in a bucket in clear", secret)
		}
	}
	if !strings.Contains(raw, "fmsealed1:") {
		t.Fatal("nothing sealed found: the scan read nothing")
	}
	// And the server still reads them: a save relying on the stored secret
	// passes, and the license comes back to an admin.
	if r := f.do("GET", "/instance-settings-templates", ""); !strings.Contains(string(r.body), "ACME-SECRET-LICENSE") {
		t.Fatal("the sealed license does not open")
	}
	f.env.Restart(t)
	if r := f.do("GET", "/cloud-credentials", ""); r.status != 200 {
		t.Fatalf("after a restart: %d %s", r.status, r.body)
	}
}
