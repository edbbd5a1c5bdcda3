package server_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/internal/certtest"
)

func TestInstanceCreateWithEveryFieldThenSave(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	// Every field FMAWSInstanceCreator can send.
	body := `{"label":"analytics","instanceSettingsTemplateId":"` + tpl.ID + `","virtualNetworkId":"` + vn.ID +
		`","imageId":"` + im.ID + `","dssNodeType":"AUTOMATION","cloudInstanceType":"m5.4xlarge",
		"dataVolumeType":"io2","dataVolumeSizeGB":200,"dataVolumeSizeMaxGB":800,"dataVolumeIOPS":5000,
		"volumesEncryption":"CUSTOM","volumesEncryptionKey":"arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
		"cloudTags":{"team":"data"},"fmTags":["prod","no-auto-deprovision"],
		"awsRootVolumeSizeGB":100,"awsRootVolumeType":"gp3","awsRootVolumeIOPS":4000}`
	in := f.createInstance(body)
	if !strings.HasPrefix(in.ID, "in-") || in.DSSNodeType != "automation" || *in.DataVolumeSizeMaxGB != 800 ||
		in.VirtualNetworkLabel != "net" || in.InstanceSettingsTemplateLabel != "tpl" || len(in.FMTags) != 2 {
		t.Fatalf("created %+v", in)
	}
	// The keys other consumers index directly are always there.
	var raw []map[string]any
	f.ok(f.do("GET", "/instances", ""), &raw)
	for _, k := range []string{"id", "label", "dssNodeType", "fmTags", "imageId", "virtualNetworkId", "virtualNetworkLabel",
		"instanceSettingsTemplateId", "instanceSettingsTemplateLabel"} {
		if _, ok := raw[0][k]; !ok {
			t.Errorf("instance list lacks %q", k)
		}
	}

	// save() after set_automated_snapshots and set_elastic_ip.
	m := map[string]any{}
	f.ok(f.do("GET", "/instances/"+in.ID, ""), &m)
	m["enableAutomatedSnapshot"], m["automatedSnapshotPeriod"], m["automatedSnapshotRetention"] = true, 12, 0
	m["awsAssignElasticIP"], m["awsElasticIPAllocationId"] = true, "eipalloc-0abc"
	f.ok(f.do("PUT", "/instances/"+in.ID, mustJSON(t, m)), nil)
	var got api.Instance
	f.ok(f.do("GET", "/instances/"+in.ID, ""), &got)
	if !got.EnableAutomatedSnapshot || *got.AutomatedSnapshotPeriod != 12 || *got.AutomatedSnapshotRetention != 0 ||
		got.AWSElasticIPAllocationID != "eipalloc-0abc" {
		t.Fatalf("after save %+v", got)
	}
	// Node type, network and template are fixed for life.
	for key, value := range map[string]any{"dssNodeType": "design", "virtualNetworkId": "vn-other", "instanceSettingsTemplateId": "ist-other"} {
		m := map[string]any{}
		f.ok(f.do("GET", "/instances/"+in.ID, ""), &m)
		m[key] = value
		f.failed(f.do("PUT", "/instances/"+in.ID, mustJSON(t, m)), 400, "InvalidArgument")
	}
}

func TestInstanceDefaults(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	in := f.createInstance(`{"label":"min","virtualNetworkId":"` + vn.ID + `","instanceSettingsTemplateId":"` + tpl.ID + `","imageId":"` + im.ID + `"}`)
	if in.DSSNodeType != "design" || in.DataVolumeType != "gp3" || *in.DataVolumeSizeGB != 50 || *in.DataVolumeSizeMaxGB != 100 ||
		in.VolumesEncryption != "DEFAULT_KEY" || in.CloudInstanceType != "m5.2xlarge" || in.FMTags == nil || in.CloudTags == nil {
		t.Fatalf("defaults: %+v", in)
	}
}

func TestInstanceBadInputs(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	f.createInstance(instanceBody("taken", vn.ID, tpl.ID, im.ID))
	refs := `"virtualNetworkId":"` + vn.ID + `","instanceSettingsTemplateId":"` + tpl.ID + `","imageId":"` + im.ID + `"`
	tests := []struct{ name, body, wantText string }{
		{"no label", `{` + refs + `}`, "label: is required"},
		{"missing network", `{"label":"x","virtualNetworkId":"vn-nope","instanceSettingsTemplateId":"` + tpl.ID + `","imageId":"` + im.ID + `"}`, "virtual network \"vn-nope\" does not exist"},
		{"missing template", `{"label":"x","virtualNetworkId":"` + vn.ID + `","instanceSettingsTemplateId":"ist-nope","imageId":"` + im.ID + `"}`, "template \"ist-nope\" does not exist"},
		{"missing image", `{"label":"x","virtualNetworkId":"` + vn.ID + `","instanceSettingsTemplateId":"` + tpl.ID + `","imageId":"dss-0.0.1"}`, "image \"dss-0.0.1\" does not exist"},
		{"node type", `{"label":"x",` + refs + `,"dssNodeType":"api"}`, "dssNodeType"},
		{"instance type", `{"label":"x",` + refs + `,"cloudInstanceType":"big"}`, "cloudInstanceType"},
		{"volume type", `{"label":"x",` + refs + `,"dataVolumeType":"ssd"}`, "dataVolumeType"},
		{"size zero", `{"label":"x",` + refs + `,"dataVolumeSizeGB":0}`, "dataVolumeSizeGB"},
		{"max below size", `{"label":"x",` + refs + `,"dataVolumeSizeGB":100,"dataVolumeSizeMaxGB":50}`, "smaller than"},
		{"iops on gp2", `{"label":"x",` + refs + `,"dataVolumeType":"gp2","dataVolumeIOPS":3000}`, "only be set for gp3"},
		{"io1 without iops", `{"label":"x",` + refs + `,"dataVolumeType":"io1"}`, "required for io1"},
		{"gp3 iops range", `{"label":"x",` + refs + `,"dataVolumeIOPS":100}`, "out of range"},
		{"throughput on gp2", `{"label":"x",` + refs + `,"dataVolumeType":"gp2","dataVolumeThroughput":250}`, "only be set for gp3"},
		{"throughput range", `{"label":"x",` + refs + `,"dataVolumeThroughput":2000}`, "out of range"},
		{"throughput beyond the IOPS", `{"label":"x",` + refs + `,"dataVolumeThroughput":800}`, "more than a gp3 volume of 3000 IOPS allows"},
		{"custom key missing", `{"label":"x",` + refs + `,"volumesEncryption":"CUSTOM"}`, "volumesEncryptionKey: is required"},
		{"key without custom", `{"label":"x",` + refs + `,"volumesEncryption":"NONE","volumesEncryptionKey":"alias/x"}`, "only used when"},
		{"encryption mode", `{"label":"x",` + refs + `,"volumesEncryption":"ROT13"}`, "volumesEncryption"},
		{"root size", `{"label":"x",` + refs + `,"awsRootVolumeSizeGB":2}`, "awsRootVolumeSizeGB"},
		{"fm tag twice", `{"label":"x",` + refs + `,"fmTags":["a","a"]}`, "listed twice"},
		{"tag not string", `{"label":"x",` + refs + `,"cloudTags":{"a":1}}`, "field cloudTags"},
		{"snapshot period", `{"label":"x",` + refs + `,"automatedSnapshotPeriod":0}`, "automatedSnapshotPeriod"},
		{"bad certificate", `{"label":"x",` + refs + `,"sslCertificatePEM":"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}`, "sslCertificatePEM"},
		{"eip without assign", `{"label":"x",` + refs + `,"awsElasticIPAllocationId":"eipalloc-1"}`, "awsAssignElasticIP is false"},
		{"duplicate label", `{"label":"TAKEN",` + refs + `}`, "already labelled"},
	}
	before := f.snapshotOf("/instances")
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := f.do("POST", "/instances", tc.body)
			want, typ := 400, "InvalidArgument"
			if tc.name == "duplicate label" {
				want, typ = 409, "AlreadyExists"
			}
			e := f.failed(r, want, typ)
			if !strings.Contains(e.DetailedMessage, tc.wantText) {
				t.Fatalf("message %q does not mention %q", e.DetailedMessage, tc.wantText)
			}
		})
	}
	if after := f.snapshotOf("/instances"); after != before {
		t.Fatal("rejected requests changed the stored instances")
	}
	f.failed(f.do("GET", "/instances/in-nope", ""), 404, "NotFound")
	f.failed(f.do("GET", "/instances/in-nope/actions/delete", ""), 404, "NotFound")
	f.failed(f.do("GET", "/instances/in-nope/snapshots", ""), 404, "NotFound")
}

func TestInstanceSnapshotsListIsEmpty(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("i", vn.ID, tpl.ID, im.ID))
	r := f.do("GET", "/instances/"+in.ID+"/snapshots", "")
	f.ok(r, nil)
	if strings.TrimSpace(string(r.body)) != "[]" {
		t.Fatalf("snapshots %s", r.body)
	}
}

func TestImages(t *testing.T) {
	f := start(t)
	f.addImage("dss-13.4.0-test", "13.4.0")
	f.addImage("dss-14.0.0-test", "14.0.0")
	var list []map[string]any
	f.ok(f.do("GET", "/images", ""), &list)
	if len(list) != 2 || list[0]["id"] != "dss-14.0.0-test" || list[0]["label"] != "DSS 14.0.0" {
		t.Fatalf("images newest first with id and label: %v", list)
	}
	for _, tc := range []struct{ name, body, want string }{
		{"no version", `{"id":"x","amis":{"eu-west-1":"ami-1"}}`, "dssVersion: is required"},
		{"bad id", `{"id":"Bad Id","dssVersion":"1.0.0","amis":{"eu-west-1":"ami-1"}}`, "id:"},
		{"nothing to boot", `{"id":"x","dssVersion":"1.0.0"}`, "needs a kit"},
		{"two kit sources", `{"id":"x","dssVersion":"1.0.0","kit":{"path":"/a","object":"b"}}`, "exactly one"},
		{"url without digest", `{"id":"x","dssVersion":"1.0.0","kit":{"url":"https://x/kit.tgz"}}`, "sha256"},
		{"missing object", `{"id":"x","dssVersion":"1.0.0","kit":{"object":"nope"}}`, "no kit named"},
		{"bad ami", `{"id":"x","dssVersion":"1.0.0","amis":{"eu-west-1":"image-1"}}`, "amis.eu-west-1"},
		{"duplicate", `{"id":"dss-14.0.0-test","dssVersion":"14.0.0","label":"other","amis":{"eu-west-1":"ami-1"}}`, "already exists"},
		{"duplicate label", `{"id":"dss-14.0.0-other","dssVersion":"14.0.0","amis":{"eu-west-1":"ami-1"}}`, "already labelled"},
		{"a tool without digest", `{"id":"x","dssVersion":"1.0.0","amis":{"eu-west-1":"ami-1"},"tools":{"kubectl":{"url":"https://x/k"}}}`, "tools.kubectl.sha256"},
		{"a tool of a bad name", `{"id":"x","dssVersion":"1.0.0","amis":{"eu-west-1":"ami-1"},"tools":{"../sh":{"url":"https://x/k","sha256":"` + strings.Repeat("a", 64) + `"}}}`, "not a program name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := f.do("POST", "/images", tc.body)
			if r.status != 400 && r.status != 409 {
				t.Fatalf("status %d: %s", r.status, r.body)
			}
			if !strings.Contains(string(r.body), tc.want) {
				t.Fatalf("%s does not mention %q", r.body, tc.want)
			}
		})
	}
	vn, tpl, _ := func() (api.VirtualNetwork, api.InstanceSettingsTemplate, api.Image) {
		return f.createNetwork(`{"label":"n","awsVpcId":"vpc-1","awsSubnetId":"subnet-1"}`), f.createTemplate(`{"label":"t"}`), api.Image{}
	}()
	f.createInstance(instanceBody("i", vn.ID, tpl.ID, "dss-14.0.0-test"))
	f.failed(f.do("DELETE", "/images/dss-14.0.0-test", ""), 409, "FailedPrecondition")
	f.ok(f.do("DELETE", "/images/dss-13.4.0-test", ""), nil)
	f.failed(f.do("GET", "/images/dss-13.4.0-test", ""), 404, "NotFound")
}

// TestAViewerSeesNoPrivateKey: an instance's certificate PEM may carry the
// private key; a viewer reads the certificates only, an operator (who may
// save the instance back) the whole.
func TestAViewerSeesNoPrivateKey(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	chain := certtest.NewChain(t, "dss.example.com")
	cert, both := chain.Certificates(), chain.Instance()
	in := f.createInstance(`{"label":"tls","virtualNetworkId":"` + vn.ID + `","instanceSettingsTemplateId":"` + tpl.ID +
		`","imageId":"` + im.ID + `","sslCertificatePEM":` + mustJSON(t, both) + `}`)
	v, op := f.newKey("viewer"), f.newKey("operator")
	for _, path := range []string{"/instances", "/instances/" + in.ID} {
		// What an operator read first (a list keeps its encoding) is not
		// what a viewer reads after.
		if r := f.doAs("GET", path, "", op.ID, op.Secret); !strings.Contains(string(r.body), "PRIVATE KEY") {
			t.Errorf("an operator reads %s without the key: %s", path, r.body)
		}
		r := f.doAs("GET", path, "", v.ID, v.Secret)
		f.ok(r, nil)
		if strings.Contains(string(r.body), "PRIVATE KEY") || !strings.Contains(string(r.body), mustJSON(t, cert)[1:40]) {
			t.Errorf("a viewer reads %s: %s", path, r.body)
		}
		var got api.Instance
		f.ok(f.doAs("GET", "/instances/"+in.ID, "", op.ID, op.Secret), &got)
		if got.SSLCertificatePEM != both {
			t.Errorf("an operator reads %q", got.SSLCertificatePEM)
		}
		// And again, from what each list keeps.
		if r := f.doAs("GET", path, "", op.ID, op.Secret); !strings.Contains(string(r.body), "PRIVATE KEY") {
			t.Errorf("an operator reads %s again without the key: %s", path, r.body)
		}
		if r := f.doAs("GET", path, "", v.ID, v.Secret); strings.Contains(string(r.body), "PRIVATE KEY") {
			t.Errorf("a viewer reads %s again with the key", path)
		}
	}
}

// TestTheWholeListFollowsEveryChange: the list of every instance, kept
// while nothing it was made from changed, shows each change as soon as it
// is made: an instance created, changed or deleted, a network or template
// renamed.
func TestTheWholeListFollowsEveryChange(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	list := func() string {
		t.Helper()
		r := f.do("GET", "/instances", "")
		f.ok(r, nil)
		return string(r.body)
	}
	a := f.createInstance(instanceBody("first", vn.ID, tpl.ID, im.ID))
	if l := list(); !strings.Contains(l, `"first"`) || list() != l {
		t.Fatalf("the list: %s", l)
	}
	b := f.createInstance(instanceBody("second", vn.ID, tpl.ID, im.ID))
	for _, c := range []struct {
		name   string
		change func()
		want   string
		gone   string
	}{
		{"created", func() {}, `"second"`, ""},
		{"network renamed", func() {
			m := map[string]any{}
			f.ok(f.do("GET", "/virtual-networks/"+vn.ID, ""), &m)
			m["label"] = "renamed-net"
			f.ok(f.do("PUT", "/virtual-networks/"+vn.ID, mustJSON(t, m)), nil)
		}, `"renamed-net"`, ""},
		{"template renamed", func() {
			m := map[string]any{}
			f.ok(f.do("GET", "/instance-settings-templates/"+tpl.ID, ""), &m)
			m["label"] = "renamed-tpl"
			f.ok(f.do("PUT", "/instance-settings-templates/"+tpl.ID, mustJSON(t, m)), nil)
		}, `"renamed-tpl"`, ""},
		{"instance changed", func() {
			m := map[string]any{}
			f.ok(f.do("GET", "/instances/"+a.ID, ""), &m)
			m["label"] = "first-renamed"
			f.ok(f.do("PUT", "/instances/"+a.ID, mustJSON(t, m)), nil)
		}, `"first-renamed"`, ""},
		{"instance deleted", func() {
			var op api.Future
			f.ok(f.do("GET", "/instances/"+b.ID+"/actions/delete", ""), &op)
			f.waitFuture(op.JobID, api.OpSucceeded, 20*time.Second)
		}, `"first-renamed"`, b.ID},
	} {
		t.Run(c.name, func(t *testing.T) {
			c.change()
			l := list()
			if !strings.Contains(l, c.want) || c.gone != "" && strings.Contains(l, c.gone) {
				t.Fatalf("after the change: %s", l)
			}
		})
	}
}

// TestListsPageAndFilter: without paging parameters a list is every row
// (Dataiku's shape); with them, FM's pages follow one another by id with no
// row twice or missed, and filters keep only what they name. Bad paging
// or filters get a clear error.
func TestListsPageAndFilter(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	var want []string
	for i := range 7 {
		in := f.createInstance(instanceBody(fmt.Sprintf("Paged-%d", i), vn.ID, tpl.ID, im.ID))
		want = append(want, in.ID)
	}
	f.createInstance(instanceBody("other", vn.ID, tpl.ID, im.ID))
	slices.Sort(want)
	list := func(query string) []string {
		t.Helper()
		var page []api.Instance
		f.ok(f.do("GET", "/instances"+query, ""), &page)
		ids := []string{}
		for _, in := range page {
			ids = append(ids, in.ID)
		}
		return ids
	}
	if all := list(""); len(all) != 8 {
		t.Fatalf("every instance: %d, want 8", len(all))
	}
	var paged []string
	for after, pages := "", 0; ; pages++ {
		if pages > 10 {
			t.Fatal("paging does not end")
		}
		page := list("?label=paged&limit=3&after=" + after)
		paged = append(paged, page...)
		if len(page) < 3 {
			break
		}
		after = page[len(page)-1]
	}
	if !slices.Equal(paged, want) {
		t.Fatalf("pages of label=paged: %v; want %v", paged, want)
	}
	if got := list("?state=created,running&label=OTHER"); len(got) != 1 {
		t.Fatalf("state=created&label=OTHER: %v", got)
	}
	if got := list("?state=running"); len(got) != 0 {
		t.Fatalf("state=running: %v; none runs", got)
	}
	for _, id := range list("?after=" + want[3]) {
		if id <= want[3] {
			t.Fatalf("after %s: %s", want[3], id)
		}
	}
	for _, q := range []string{"?limit=0", "?limit=x", "?limit=10001", "?state=asleep"} {
		f.failed(f.do("GET", "/instances"+q, ""), 400, "InvalidArgument")
	}
	var vns []api.VirtualNetwork
	f.ok(f.do("GET", "/virtual-networks?limit=1&after="+vn.ID, ""), &vns)
	if len(vns) != 0 {
		t.Fatalf("networks after the only one: %v", vns)
	}
	f.failed(f.do("GET", "/instance-settings-templates?limit=-1", ""), 400, "InvalidArgument")
}

// TestFuturesPage: the operations list pages in its own order, newest
// first, whole or of one state; the page after an operation that is not
// (any more) on record is empty.
func TestFuturesPage(t *testing.T) {
	f := start(t)
	vn, tpl, _ := f.fleet()
	im := f.addImageWithKit("dss-ops", "14.0.0")
	for i := range 7 {
		in := f.createInstance(instanceBody(fmt.Sprintf("ops-%d", i), vn.ID, tpl.ID, im.ID))
		var op api.Future
		f.ok(f.do("GET", "/instances/"+in.ID+"/actions/reprovision", ""), &op)
		if i%3 == 0 {
			f.abortOperation(in.ID)
		}
	}
	list := func(query string) []string {
		t.Helper()
		var page []api.Future
		f.ok(f.do("GET", "/futures"+query, ""), &page)
		ids := []string{}
		for _, op := range page {
			ids = append(ids, op.JobID)
		}
		return ids
	}
	for _, c := range []struct{ name, filter string }{{"every one", ""}, {"running", "state=running&"}, {"aborted", "state=aborted&"}} {
		t.Run(c.name, func(t *testing.T) {
			whole := list("?" + c.filter)
			if len(whole) < 2 {
				t.Fatalf("%d operations: too few to page", len(whole))
			}
			var paged []string
			for after, pages := "", 0; ; pages++ {
				if pages > 10 {
					t.Fatal("paging does not end")
				}
				page := list("?" + c.filter + "limit=2&after=" + after)
				paged = append(paged, page...)
				if len(page) < 2 {
					break
				}
				after = page[len(page)-1]
			}
			if !slices.Equal(paged, whole) {
				t.Fatalf("pages %v; the whole list %v", paged, whole)
			}
		})
	}
	var none []api.Future
	f.ok(f.do("GET", "/futures?after=op-never", ""), &none)
	if len(none) != 0 {
		t.Fatalf("after an operation not kept: %v", none)
	}
	f.failed(f.do("GET", "/futures?limit=0", ""), 400, "InvalidArgument")
	f.failed(f.do("GET", "/futures?after=op.*", ""), 400, "InvalidArgument")
}
