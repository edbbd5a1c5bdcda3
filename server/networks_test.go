package server_test

import (
	"net/http"
	"strings"
	"testing"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/server/servertest"
)

func TestNetworkCreateGetListSave(t *testing.T) {
	f := start(t)
	// What FMAWSVirtualNetworkCreator.create sends, with defaults.
	var vn api.VirtualNetwork
	f.ok(f.do("POST", "/virtual-networks?useDefaultValues=True",
		`{"label":"default net","mode":"EXISTING_MONOTENANT","awsVpcId":null,"awsSubnetId":null,"awsSecondSubnetId":null,"awsAutoCreateSecurityGroups":true}`), &vn)
	if !strings.HasPrefix(vn.ID, "vn-") || vn.Label != "default net" || vn.Revision == 0 {
		t.Fatalf("created %+v", vn)
	}
	if vn.AWSVpcID != "vpc-0fm" || vn.AWSSubnetID != "subnet-0fm" || vn.AWSRegion != "eu-west-1" {
		t.Fatalf("useDefaultValues=True did not use FM's network: %+v", vn)
	}
	if vn.DNSStrategy != "NONE" || vn.HTTPSStrategy != "NONE" || vn.HTTPStrategy != "DISABLE" ||
		vn.NodesDirectoryDeployerMode != "NO_MANAGED_DEPLOYER" || !*vn.AWSAssignPublicIP ||
		vn.InternetAccessMode != "YES" || vn.AWSSecurityGroups == nil {
		t.Fatalf("defaults not applied: %+v", vn)
	}

	var got api.VirtualNetwork
	f.ok(f.do("GET", "/virtual-networks/"+vn.ID, ""), &got)
	if mustJSON(t, got) != mustJSON(t, vn) {
		t.Fatalf("GET differs from create:\n%s\n%s", mustJSON(t, got), mustJSON(t, vn))
	}

	// A save as FMVirtualNetwork.save sends it: the whole object, with the
	// setters' changes and unknown keys echoed back.
	m := map[string]any{}
	f.ok(f.do("GET", "/virtual-networks/"+vn.ID, ""), &m)
	m["httpsStrategy"], m["httpStrategy"], m["contactMail"] = "LETSENCRYPT", "REDIRECT", "ops@example.com"
	m["dnsStrategy"], m["awsRoute53PublicIPZoneId"] = "VN_SPECIFIC_CLOUD_DNS_SERVICE", "Z0123456789ABC"
	m["managedNodesDirectory"], m["nodesDirectoryDeployerMode"] = true, "CENTRAL_DEPLOYER"
	m["someFieldFromTheFuture"] = map[string]any{"x": 1}
	f.ok(f.do("PUT", "/virtual-networks/"+vn.ID, mustJSON(t, m)), nil)
	f.ok(f.do("GET", "/virtual-networks/"+vn.ID, ""), &got)
	if got.HTTPSStrategy != "LETSENCRYPT" || got.ContactMail != "ops@example.com" || !got.ManagedNodesDirectory ||
		got.NodesDirectoryDeployerMode != "CENTRAL_DEPLOYER" || got.Revision <= vn.Revision || !got.CreatedAt.Equal(vn.CreatedAt) {
		t.Fatalf("after save: %+v", got)
	}

	var list []api.VirtualNetwork
	f.ok(f.do("GET", "/virtual-networks", ""), &list)
	if len(list) != 1 || list[0].ID != vn.ID || list[0].Label == "" {
		t.Fatalf("list %+v", list)
	}
}

func TestNetworkWithoutDefaultNetworkConfigured(t *testing.T) {
	f := &fm{t: t, env: servertest.Start(t)}
	e := f.failed(f.do("POST", "/virtual-networks?useDefaultValues=True", `{"label":"n"}`), 400, "InvalidArgument")
	if !strings.Contains(e.DetailedMessage, "no default network") {
		t.Fatal(e.DetailedMessage)
	}
	// Lower-case and capitalised booleans are both accepted.
	f.ok(f.do("POST", "/virtual-networks?useDefaultValues=false", `{"label":"n","awsVpcId":"vpc-1","awsSubnetId":"subnet-1"}`), nil)
}

func TestNetworkBadInputs(t *testing.T) {
	f := start(t)
	base := `"label":"n","mode":"EXISTING_MONOTENANT","awsVpcId":"vpc-1","awsSubnetId":"subnet-1"`
	f.createNetwork(`{"label":"taken",` + base[len(`"label":"n",`):] + `}`)
	tests := []struct {
		name, query, body, wantType, wantText string
	}{
		{"no body", "False", "", "InvalidArgument", "JSON body is required"},
		{"not json", "False", `{"label":`, "InvalidArgument", "not valid JSON"},
		{"array body", "False", `[]`, "InvalidArgument", "JSON struct"},
		{"wrong type", "False", `{"label":3}`, "InvalidArgument", "field label"},
		{"bad query bool", "maybe", `{` + base + `}`, "InvalidArgument", "useDefaultValues"},
		{"no label", "False", `{"mode":"EXISTING_MONOTENANT","awsVpcId":"vpc-1","awsSubnetId":"subnet-1"}`, "InvalidArgument", "label: is required"},
		{"duplicate label", "False", `{"label":"TAKEN","awsVpcId":"vpc-1","awsSubnetId":"subnet-1"}`, "AlreadyExists", "TAKEN"},
		{"bad mode", "False", `{` + base + `,"mode":"MULTI"}`, "InvalidArgument", "mode"},
		{"no vpc", "False", `{"label":"n","awsSubnetId":"subnet-1"}`, "InvalidArgument", "awsVpcId: is required"},
		{"bad vpc", "False", `{"label":"n","awsVpcId":"vpc_1","awsSubnetId":"subnet-1"}`, "InvalidArgument", "awsVpcId"},
		{"bad subnet", "False", `{"label":"n","awsVpcId":"vpc-1","awsSubnetId":"sub-1"}`, "InvalidArgument", "awsSubnetId"},
		{"same second subnet", "False", `{` + base + `,"awsSecondSubnetId":"subnet-1"}`, "InvalidArgument", "awsSecondSubnetId"},
		{"six security groups", "False", `{` + base + `,"awsAutoCreateSecurityGroups":false,"awsSecurityGroups":["sg-1","sg-2","sg-3","sg-4","sg-5","sg-6"]}`, "InvalidArgument", "at most 5"},
		{"no security group", "False", `{` + base + `,"awsAutoCreateSecurityGroups":false,"awsSecurityGroups":[]}`, "InvalidArgument", "at least one"},
		{"duplicate security group", "False", `{` + base + `,"awsAutoCreateSecurityGroups":false,"awsSecurityGroups":["sg-1","sg-1"]}`, "InvalidArgument", "twice"},
		{"bad security group", "False", `{` + base + `,"awsAutoCreateSecurityGroups":false,"awsSecurityGroups":["default"]}`, "InvalidArgument", "security group id"},
		{"groups with auto-create", "False", `{` + base + `,"awsAutoCreateSecurityGroups":true,"awsSecurityGroups":["sg-1"]}`, "InvalidArgument", "must be empty"},
		{"internet access", "False", `{` + base + `,"internetAccessMode":"SOMETIMES"}`, "InvalidArgument", "internetAccessMode"},
		{"cloud account", "False", `{` + base + `,"accountId":"acc-1"}`, "InvalidArgument", "does not exist"},
		{"peering with itself", "False", `{"label":"n","awsVpcId":"vpc-0fm","awsSubnetId":"subnet-1","autoCreatePeerings":true}`, "InvalidArgument", "nothing to peer"},
		{"dns without zone", "False", `{` + base + `,"dnsStrategy":"VN_SPECIFIC_CLOUD_DNS_SERVICE"}`, "InvalidArgument", "needs"},
		{"same zones", "False", `{` + base + `,"dnsStrategy":"VN_SPECIFIC_CLOUD_DNS_SERVICE","awsRoute53PrivateIPZoneId":"Z1","awsRoute53PublicIPZoneId":"Z1"}`, "InvalidArgument", "must differ"},
		{"letsencrypt without mail", "False", `{` + base + `,"httpsStrategy":"LETSENCRYPT","httpStrategy":"REDIRECT"}`, "InvalidArgument", "contactMail: is required"},
		{"bad mail", "False", `{` + base + `,"httpsStrategy":"LETSENCRYPT","contactMail":"nobody"}`, "InvalidArgument", "e-mail"},
		{"redirect without https", "False", `{` + base + `,"httpsStrategy":"NONE","httpStrategy":"REDIRECT"}`, "InvalidArgument", "cannot redirect"},
		{"https strategy", "False", `{` + base + `,"httpsStrategy":"SOMETIMES"}`, "InvalidArgument", "httpsStrategy"},
		{"deployer mode", "False", `{` + base + `,"nodesDirectoryDeployerMode":"ALL"}`, "InvalidArgument", "nodesDirectoryDeployerMode"},
		{"reserved tag", "False", `{` + base + `,"cloudTags":{"aws:owner":"x"}}`, "InvalidArgument", "reserved"},
		{"several problems at once", "False", `{"label":"","awsVpcId":"x","awsSubnetId":"y"}`, "InvalidArgument", "label: is required; awsVpcId"},
	}
	before := f.snapshotOf("/virtual-networks")
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			status := http.StatusBadRequest
			if tc.wantType == "AlreadyExists" {
				status = http.StatusConflict
			}
			e := f.failed(f.do("POST", "/virtual-networks?useDefaultValues="+tc.query, tc.body), status, tc.wantType)
			if !strings.Contains(e.DetailedMessage, tc.wantText) {
				t.Fatalf("message %q does not mention %q", e.DetailedMessage, tc.wantText)
			}
		})
	}
	if after := f.snapshotOf("/virtual-networks"); after != before {
		t.Fatalf("rejected requests changed the stored networks:\n%s\n%s", before, after)
	}
}

func TestNetworkImmutableFields(t *testing.T) {
	f := start(t)
	vn := f.createNetwork(`{"label":"n","awsVpcId":"vpc-1","awsSubnetId":"subnet-1","awsRegion":"eu-west-1"}`)
	set := func(key string, value any) response {
		m := map[string]any{}
		f.ok(f.do("GET", "/virtual-networks/"+vn.ID, ""), &m)
		m[key] = value
		return f.do("PUT", "/virtual-networks/"+vn.ID, mustJSON(t, m))
	}
	before := f.snapshotOf("/virtual-networks/" + vn.ID)
	for key, value := range map[string]any{"awsVpcId": "vpc-2", "awsSubnetId": "subnet-2", "awsRegion": "us-east-1"} {
		e := f.failed(set(key, value), 400, "InvalidArgument")
		if !strings.Contains(e.DetailedMessage, key+": cannot be changed") {
			t.Errorf("%s: %s", key, e.DetailedMessage)
		}
	}
	if after := f.snapshotOf("/virtual-networks/" + vn.ID); after != before {
		t.Fatal("a refused save changed the network")
	}
	// A second subnet can be added once, then not changed.
	f.ok(set("awsSecondSubnetId", "subnet-2"), nil)
	f.failed(set("awsSecondSubnetId", "subnet-3"), 400, "InvalidArgument")
	// A hand-written PUT that leaves immutable fields out keeps them.
	f.ok(f.do("PUT", "/virtual-networks/"+vn.ID, `{"label":"renamed"}`), nil)
	var got api.VirtualNetwork
	f.ok(f.do("GET", "/virtual-networks/"+vn.ID, ""), &got)
	if got.Label != "renamed" || got.AWSVpcID != "vpc-1" || got.AWSSecondSubnetID != "subnet-2" {
		t.Fatalf("%+v", got)
	}
	// The path wins over nothing: another object's id in the body is refused.
	f.failed(f.do("PUT", "/virtual-networks/"+vn.ID, `{"id":"vn-other","label":"x"}`), 400, "InvalidArgument")
	f.failed(f.do("PUT", "/virtual-networks/vn-missing", `{"label":"x"}`), 404, "NotFound")
}

func TestNetworkDeleteIsAResolvedFutureAndRefusedWhileUsed(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("i", vn.ID, tpl.ID, im.ID))

	e := f.failed(f.do("DELETE", "/virtual-networks/"+vn.ID, ""), http.StatusConflict, "FailedPrecondition")
	if !strings.Contains(e.DetailedMessage, in.ID) {
		t.Fatalf("refusal does not name the instance: %s", e.DetailedMessage)
	}
	var still api.VirtualNetwork
	f.ok(f.do("GET", "/virtual-networks/"+vn.ID, ""), &still)
	if still.Deleting {
		t.Fatal("a refused deletion left the network marked")
	}
	// With the instance gone, the deletion is a future that already has its
	// result, as wait_for_result() needs.
	var fut api.Future
	f.ok(f.do("GET", "/instances/"+in.ID+"/actions/delete", ""), &fut)
	f.ok(f.do("DELETE", "/virtual-networks/"+vn.ID, ""), &fut)
	if fut.JobID == "" || !fut.HasResult || fut.State != api.OpSucceeded {
		t.Fatalf("future %+v", fut)
	}
	f.failed(f.do("GET", "/virtual-networks/"+vn.ID, ""), 404, "NotFound")
	f.failed(f.do("DELETE", "/virtual-networks/"+vn.ID, ""), 404, "NotFound")
	// The label is free again.
	f.createNetwork(`{"label":"net","awsVpcId":"vpc-1","awsSubnetId":"subnet-1"}`)
}
