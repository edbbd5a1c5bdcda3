package server_test

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/server"
	"github.com/fleetmanager/fm/server/servertest"
)

func TestWireQuirks(t *testing.T) {
	f := start(t)
	vn := f.createNetwork(`{"label":"n","awsVpcId":"vpc-1","awsSubnetId":"subnet-1"}`)

	t.Run("double slash is served without a redirect", func(t *testing.T) {
		for _, p := range []string{"//api/public/tenants/main/virtual-networks", "/api/public/tenants/main//virtual-networks/", "/api/public/tenants/main/./virtual-networks"} {
			r := f.do("GET", p, "")
			if r.status != 200 {
				t.Fatalf("GET %s: %d %s", p, r.status, r.body)
			}
		}
		// A POST through // stays a POST.
		var created api.VirtualNetwork
		f.ok(f.do("POST", "//api/public/tenants/main/virtual-networks?useDefaultValues=False",
			`{"label":"via double slash","awsVpcId":"vpc-1","awsSubnetId":"subnet-1"}`), &created)
		if created.ID == "" {
			t.Fatal("no object created")
		}
	})
	t.Run("unknown tenant", func(t *testing.T) {
		e := f.failed(f.do("GET", "/api/public/tenants/other/virtual-networks", ""), 404, "NotFound")
		if !strings.Contains(e.DetailedMessage, `"other"`) {
			t.Fatal(e.DetailedMessage)
		}
	})
	t.Run("an unknown path is a JSON error", func(t *testing.T) {
		f.failed(f.do("GET", "/nothing-here", ""), 404, "NotFound")
		f.failed(f.do("GET", "/api/nothing", ""), 404, "NotFound")
	})
	t.Run("a wrong method is named as such, with what is allowed", func(t *testing.T) {
		for _, c := range []struct{ method, path, allow string }{
			{"PATCH", tenantPath + "/virtual-networks/" + vn.ID, "DELETE, GET, PUT"},
			{"DELETE", tenantPath + "/instances/whatever", "GET, PUT"},
			{"GET", "/api/join", "POST"},
			{"POST", "/download/fm", "GET, HEAD"},
		} {
			r := f.do(c.method, c.path, "")
			f.failed(r, 405, "MethodNotAllowed")
			if r.header.Get("Allow") != c.allow {
				t.Fatalf("%s %s: Allow %q, want %q", c.method, c.path, r.header.Get("Allow"), c.allow)
			}
		}
	})
	t.Run("no path answers a redirect", func(t *testing.T) {
		for _, p := range []string{"/api", "/api/", "//api", "/api/public", "/api/public/", "/api/public/tenants/main", "/api/public/tenants/main/", "/download", "/download/"} {
			r := f.do("GET", p, "")
			f.failed(r, 404, "NotFound")
			if loc := r.header.Get("Location"); loc != "" {
				t.Fatalf("GET %s: Location %q", p, loc)
			}
		}
		// Without a key, the API's paths ask for one (and redirect nowhere).
		f.failed(f.doAs("GET", "/api", "", "", ""), 401, "Unauthenticated")
	})
	t.Run("a JSON content type is not required nor harmful", func(t *testing.T) {
		req, _ := http.NewRequest("PUT", f.env.URL+tenantPath+"/cloud-tags", strings.NewReader(`{"a":"b"}`))
		req.SetBasicAuth(f.env.Key.ID, f.env.Key.Secret)
		req.Header.Set("Content-Type", "text/plain")
		resp, err := http.DefaultClient.Do(req)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("%v %v", resp, err)
		}
		resp.Body.Close()
	})
	t.Run("bad peek boolean", func(t *testing.T) {
		f.failed(f.do("GET", "/futures/op-x?peek=perhaps", ""), 400, "InvalidArgument")
	})
	t.Run("oversized body", func(t *testing.T) {
		big := `{"label":"` + strings.Repeat("x", 2<<20) + `"}`
		e := f.failed(f.do("POST", "/instance-settings-templates", big), 413, "RequestTooLarge")
		if !strings.Contains(e.DetailedMessage, "larger than") {
			t.Fatal(e.DetailedMessage)
		}
	})
	t.Run("health needs no key", func(t *testing.T) {
		if r := f.doAs("GET", "/healthz", "", "", ""); r.status != 200 {
			t.Fatalf("healthz %d", r.status)
		}
	})
}

// TestMetricsAccess: /metrics (whose series name instances) needs an API
// key, any role, on the REST API's listener unless the server is told to
// make it public; a listener of its own for metrics serves them without one.
func TestMetricsAccess(t *testing.T) {
	scrape := func(t *testing.T, r response) {
		t.Helper()
		if r.status != 200 || !strings.Contains(string(r.body), `fm_objects{kind="virtual_network"} 0`) ||
			!strings.Contains(string(r.body), "fm_http_requests_total") {
			t.Fatalf("metrics %d: %.400s", r.status, r.body)
		}
	}
	get := func(t *testing.T, url string) response {
		t.Helper()
		resp, err := http.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return response{status: resp.StatusCode, body: b, header: resp.Header}
	}
	cases := []struct {
		name   string
		config func(*server.Config)
		check  func(t *testing.T, f *fm)
	}{
		{"by default with a key", nil, func(t *testing.T, f *fm) {
			f.failed(f.doAs("GET", "/metrics", "", "", ""), 401, "Unauthenticated")
			f.failed(f.doAs("GET", "/metrics", "", f.env.Key.ID, "wrong"), 401, "Unauthenticated")
			k := f.newKey("viewer")
			scrape(t, f.doAs("GET", "/metrics", "", k.ID, k.Secret))
		}},
		{"public", func(c *server.Config) { c.MetricsPublic = true }, func(t *testing.T, f *fm) {
			scrape(t, f.doAs("GET", "/metrics", "", "", ""))
		}},
		{"on a listener of their own", func(c *server.Config) { c.MetricsAddr = "127.0.0.1:0" }, func(t *testing.T, f *fm) {
			addr := f.env.Server.MetricsAddr()
			if addr == nil {
				t.Fatal("no metrics listener")
			}
			scrape(t, get(t, "http://"+addr.String()+"/metrics"))
			if r := get(t, "http://"+addr.String()+tenantPath+"/instances"); r.status != 404 {
				t.Fatalf("the metrics listener serves the API: %d %s", r.status, r.body)
			}
			f.failed(f.doAs("GET", "/metrics", "", "", ""), 401, "Unauthenticated")
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var opts []servertest.Option
			if c.config != nil {
				opts = append(opts, servertest.WithConfig(c.config))
			}
			f := start(t, opts...)
			f.t = t
			f.ok(f.do("GET", "/instances", ""), nil) // a request to count
			c.check(t, f)
		})
	}
}

func TestAuthentication(t *testing.T) {
	f := start(t)
	cases := []struct{ name, id, secret string }{
		{"no key", "", ""},
		{"wrong secret", f.env.Key.ID, "wrong"},
		{"unknown key", "nobody", f.env.Key.Secret},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := f.doAs("GET", "/instances", "", tc.id, tc.secret)
			f.failed(r, 401, "Unauthenticated")
			if r.header.Get("WWW-Authenticate") == "" {
				t.Fatal("no WWW-Authenticate challenge")
			}
		})
	}
	// A remembered secret does not let another secret in.
	f.ok(f.do("GET", "/instances", ""), nil)
	f.failed(f.doAs("GET", "/instances", "", f.env.Key.ID, f.env.Key.Secret+"x"), 401, "Unauthenticated")
}

func TestCloudTagsAndCredentials(t *testing.T) {
	f := start(t)
	var tags api.CloudTagsResponse
	f.ok(f.do("GET", "/cloud-tags", ""), &tags)
	if tags.Msg != "{}" {
		t.Fatalf("initial msg %q", tags.Msg)
	}
	f.ok(f.do("PUT", "/cloud-tags", `{"cost-center":"42","owner":"data-platform"}`), nil)
	f.ok(f.do("GET", "/cloud-tags", ""), &tags)
	var m map[string]string
	if err := json.Unmarshal([]byte(tags.Msg), &m); err != nil || m["cost-center"] != "42" || len(m) != 2 {
		t.Fatalf("msg %q: %v", tags.Msg, err)
	}
	f.failed(f.do("PUT", "/cloud-tags", `{"aws:x":"y"}`), 400, "InvalidArgument")
	f.failed(f.do("PUT", "/cloud-tags", `{"msg":"{}"}`+"x"), 400, "InvalidArgument")
	f.ok(f.do("GET", "/cloud-tags", ""), &tags)
	if !strings.Contains(tags.Msg, "cost-center") {
		t.Fatal("a refused PUT changed the tags")
	}

	var cc map[string]any
	f.ok(f.do("GET", "/cloud-credentials", ""), &cc)
	if cc["awsAuthenticationMode"] != "SAME_AS_FM" {
		t.Fatalf("defaults %v", cc)
	}
	cc["awsAuthenticationMode"], cc["awsAccessKeyId"], cc["awsSecretAccessKey"] = "KEYPAIR", "AKIAIOSFODNN7EXAMPLE", "topsecretvalue"
	cc["licenseMode"], cc["license"] = "STATIC", "{\n  \"content\": {}\n}"
	r := f.do("PUT", "/cloud-credentials", mustJSON(t, cc))
	f.ok(r, nil)
	got := f.snapshotOf("/cloud-credentials")
	if strings.Contains(got, "topsecretvalue") || strings.Contains(string(r.body), "topsecretvalue") {
		t.Fatal("the secret key is returned")
	}
	// Echoing the GET (without the secret) keeps the stored secret: the
	// save is valid only because of it.
	f.ok(f.do("PUT", "/cloud-credentials", got), nil)
	got = f.snapshotOf("/cloud-credentials")
	bad := map[string]any{"awsAuthenticationMode": "IAM_ROLE"}
	e := f.failed(f.do("PUT", "/cloud-credentials", mustJSON(t, bad)), 400, "InvalidArgument")
	if !strings.Contains(e.DetailedMessage, "awsIAMRoleARN: is required") {
		t.Fatal(e.DetailedMessage)
	}
	f.failed(f.do("PUT", "/cloud-credentials", `{"licenseMode":"AUTO_UPDATE"}`), 400, "InvalidArgument")
	if f.snapshotOf("/cloud-credentials") != got {
		t.Fatal("refused PUTs changed the credentials")
	}
}

func TestFutures(t *testing.T) {
	f := start(t)
	vn := f.createNetwork(`{"label":"n","awsVpcId":"vpc-1","awsSubnetId":"subnet-1"}`)
	var fut api.Future
	f.ok(f.do("DELETE", "/virtual-networks/"+vn.ID, ""), &fut)
	// Repeated non-peek reads give the same outcome.
	for i := 0; i < 3; i++ {
		var again api.Future
		f.ok(f.do("GET", "/futures/"+fut.JobID+"?peek=False", ""), &again)
		if !again.HasResult || again.JobID != fut.JobID || string(again.Result) != string(fut.Result) {
			t.Fatalf("read %d: %+v", i, again)
		}
	}
	f.ok(f.do("GET", "/futures/"+fut.JobID+"?peek=True", ""), nil)
	// Aborting a finished operation changes nothing.
	f.ok(f.do("DELETE", "/futures/"+fut.JobID, ""), nil)
	var list []api.Future
	f.ok(f.do("GET", "/futures?targetId="+vn.ID, ""), &list)
	if len(list) != 1 || list[0].State != "succeeded" || list[0].Kind != "delete-virtual-network" || list[0].StartedBy != f.env.Key.ID {
		t.Fatalf("list %+v", list)
	}
	f.failed(f.do("GET", "/futures?state=sleeping", ""), 400, "InvalidArgument")
	f.failed(f.do("GET", "/futures/op-unknown?peek=False", ""), 404, "NotFound")
	// The literal path a client builds when a response had no jobId.
	f.failed(f.do("GET", "/futures/None?peek=False", ""), 404, "NotFound")
}

func TestConcurrentSavesOneWins(t *testing.T) {
	f := start(t)
	vn := f.createNetwork(`{"label":"n","awsVpcId":"vpc-1","awsSubnetId":"subnet-1"}`)
	m := map[string]any{}
	f.ok(f.do("GET", "/virtual-networks/"+vn.ID, ""), &m)
	// Several clients save the same read concurrently.
	const n = 6
	statuses := make([]int, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			mine := map[string]any{}
			for k, v := range m {
				mine[k] = v
			}
			mine["eventServerNodeLabel"] = "writer-" + string(rune('a'+i))
			statuses[i] = f.do("PUT", "/virtual-networks/"+vn.ID, mustJSON(t, mine)).status
		}(i)
	}
	wg.Wait()
	wins := 0
	for _, s := range statuses {
		switch s {
		case 200:
			wins++
		case 409:
		default:
			t.Fatalf("unexpected status %d", s)
		}
	}
	if wins != 1 {
		t.Fatalf("%d saves of one read won, want exactly 1 (statuses %v)", wins, statuses)
	}
	// A save of the stale read is refused with a conflict, and nothing is lost.
	var cur api.VirtualNetwork
	f.ok(f.do("GET", "/virtual-networks/"+vn.ID, ""), &cur)
	e := f.failed(f.do("PUT", "/virtual-networks/"+vn.ID, mustJSON(t, m)), 409, "Conflict")
	if !strings.Contains(e.DetailedMessage, "read it again") {
		t.Fatal(e.DetailedMessage)
	}
	var after api.VirtualNetwork
	f.ok(f.do("GET", "/virtual-networks/"+vn.ID, ""), &after)
	if after.EventServerNodeLabel != cur.EventServerNodeLabel || after.Revision != cur.Revision {
		t.Fatal("a refused save changed the network")
	}
}

func TestConcurrentCreatesKeepLabelsUnique(t *testing.T) {
	f := start(t)
	const n = 8
	statuses := make([]int, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			statuses[i] = f.do("POST", "/instance-settings-templates", `{"label":"same"}`).status
		}(i)
	}
	wg.Wait()
	var list []api.InstanceSettingsTemplate
	f.ok(f.do("GET", "/instance-settings-templates", ""), &list)
	if len(list) != 1 {
		t.Fatalf("%d templates labelled the same exist (statuses %v)", len(list), statuses)
	}
}

func TestRestartKeepsEveryObject(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("i", vn.ID, tpl.ID, im.ID))
	f.ok(f.do("PUT", "/cloud-tags", `{"k":"v"}`), nil)
	var fut api.Future
	f.ok(f.do("DELETE", "/images/"+f.addImage("dss-9.0.0-old", "9.0.0").ID, ""), &fut)
	paths := []string{"/virtual-networks", "/instance-settings-templates", "/instances", "/images", "/cloud-tags",
		"/cloud-credentials", "/futures/" + fut.JobID, "/instances/" + in.ID}
	before := map[string]string{}
	for _, p := range paths {
		before[p] = f.snapshotOf(p)
	}
	f.env.Restart(t)
	for _, p := range paths {
		if got := f.snapshotOf(p); got != before[p] {
			t.Errorf("%s changed across a restart:\n%s\n%s", p, before[p], got)
		}
	}
	// Labels are still claimed after the restart.
	f.failed(f.do("POST", "/instances", instanceBody("I", vn.ID, tpl.ID, im.ID)), 409, "AlreadyExists")
}
