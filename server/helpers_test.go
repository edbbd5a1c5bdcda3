package server_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
	"github.com/fleetmanager/fm/server/servertest"
	"github.com/nats-io/nats.go/jetstream"
)

const tenantPath = "/api/public/tenants/main"

// fm is a test's view of a server, speaking raw HTTP the way Dataiku's
// Python client does: JSON bodies with no Content-Type, Basic auth.
type fm struct {
	t   testing.TB
	env *servertest.Env
	// joinFleet is the network and template of instances made by joined.
	joinFleet []string
}

func start(t testing.TB, opts ...servertest.Option) *fm {
	t.Helper()
	opts = append([]servertest.Option{servertest.WithNetwork(server.NetworkDefaults{
		VpcID: "vpc-0fm", SubnetID: "subnet-0fm", Region: "eu-west-1"})}, opts...)
	return &fm{t: t, env: servertest.Start(t, opts...)}
}

type response struct {
	status int
	body   []byte
	header http.Header
}

// do sends body (raw text, "" for none) to path (relative to the tenant
// prefix unless it starts with "//" or "/api" or "/metrics"...).
func (f *fm) do(method, path, body string) response {
	f.t.Helper()
	return f.doAs(method, path, body, f.env.Key.ID, f.env.Key.Secret)
}

func (f *fm) doAs(method, path, body, id, secret string) response {
	f.t.Helper()
	return f.doFrom("", method, path, body, id, secret)
}

// doFrom is doAs from the client address src ("" for any): the server tells
// its clients apart by address, and every 127.x.y.z is this machine.
func (f *fm) doFrom(src, method, path, body, id, secret string) response {
	f.t.Helper()
	r, err := f.tryFrom(src, method, path, body, id, secret)
	if err != nil {
		f.t.Fatal(err)
	}
	return r
}

// tryFrom is doFrom returning its error, for goroutines other than the
// test's.
func (f *fm) tryFrom(src, method, path, body, id, secret string) (response, error) {
	url := f.env.URL + path
	if path != "/api" && path != "/download" && !strings.HasPrefix(path, "/api/") && !strings.HasPrefix(path, "//") && !strings.HasPrefix(path, "/metrics") && !strings.HasPrefix(path, "/healthz") && !strings.HasPrefix(path, "/download/") {
		url = f.env.URL + tenantPath + path
	}
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		return response{}, err
	}
	if id != "" {
		req.SetBasicAuth(id, secret)
	}
	// No Content-Type, as the Python client sends.
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	if src != "" {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 10 * time.Second}
		client.Transport = &http.Transport{DialContext: d.DialContext, DisableKeepAlives: true}
	}
	resp, err := client.Do(req)
	if err != nil {
		return response{}, fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return response{status: resp.StatusCode, body: b, header: resp.Header}, nil
}

// send sends a request whose answer nobody waits for (a call the server
// dies in), from a goroutine: it fails nothing, and ends with the test
// (t.Context is cancelled before the test's clean-ups run).
func (f *fm) send(method, path string) {
	req, err := http.NewRequestWithContext(f.t.Context(), method, f.env.URL+tenantPath+path, nil)
	if err != nil {
		return
	}
	req.SetBasicAuth(f.env.Key.ID, f.env.Key.Secret)
	if resp, err := (&http.Client{Timeout: time.Minute}).Do(req); err == nil {
		resp.Body.Close()
	}
}

// ok asserts a 200 with a JSON body and decodes it into out (if not nil).
func (f *fm) ok(r response, out any) {
	f.t.Helper()
	if r.status != http.StatusOK {
		f.t.Fatalf("status %d, want 200: %s", r.status, r.body)
	}
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		f.t.Fatalf("Content-Type %q", ct)
	}
	if out != nil {
		if err := json.Unmarshal(r.body, out); err != nil {
			f.t.Fatalf("decode %s: %v", r.body, err)
		}
	}
}

// failed asserts an error response with the contract's body and returns it.
func (f *fm) failed(r response, status int, errorType string) api.Error {
	f.t.Helper()
	if r.status != status {
		f.t.Fatalf("status %d, want %d: %s", r.status, status, r.body)
	}
	var e api.Error
	if err := json.Unmarshal(r.body, &e); err != nil {
		f.t.Fatalf("error body is not the contract's JSON object: %s", r.body)
	}
	if e.ErrorType != errorType || e.Message == "" || e.DetailedMessage == "" {
		f.t.Fatalf("error body %+v, want errorType %s and both messages", e, errorType)
	}
	return e
}

func (f *fm) createNetwork(body string) api.VirtualNetwork {
	f.t.Helper()
	var vn api.VirtualNetwork
	f.ok(f.do("POST", "/virtual-networks?useDefaultValues=False", body), &vn)
	return vn
}

func (f *fm) createTemplate(body string) api.InstanceSettingsTemplate {
	f.t.Helper()
	var t api.InstanceSettingsTemplate
	f.ok(f.do("POST", "/instance-settings-templates", body), &t)
	return t
}

func (f *fm) addImage(id, version string) api.Image {
	f.t.Helper()
	var im api.Image
	f.ok(f.do("POST", "/images", `{"id":"`+id+`","dssVersion":"`+version+`","amis":{"eu-west-1":"ami-0123456789abcdef0"}}`), &im)
	return im
}

func (f *fm) createInstance(body string) api.Instance {
	f.t.Helper()
	var in api.Instance
	f.ok(f.do("POST", "/instances", body), &in)
	return in
}

// fleet creates a network, a template and an image for instance tests.
func (f *fm) fleet() (api.VirtualNetwork, api.InstanceSettingsTemplate, api.Image) {
	vn := f.createNetwork(`{"label":"net","mode":"EXISTING_MONOTENANT","awsVpcId":"vpc-1","awsSubnetId":"subnet-1","awsAutoCreateSecurityGroups":true}`)
	t := f.createTemplate(`{"label":"tpl","setupActions":[]}`)
	im := f.addImage("dss-14.0.0-test", "14.0.0")
	return vn, t, im
}

func instanceBody(label, vn, tpl, image string) string {
	return `{"label":"` + label + `","virtualNetworkId":"` + vn + `","instanceSettingsTemplateId":"` + tpl + `","imageId":"` + image + `","dssNodeType":"design"}`
}

// snapshotOf returns the raw listing at path, to compare stored state before
// and after a rejected request.
func (f *fm) snapshotOf(path string) string {
	f.t.Helper()
	r := f.do("GET", path, "")
	if r.status != 200 {
		f.t.Fatalf("GET %s: %d %s", path, r.status, r.body)
	}
	return string(r.body)
}

func mustJSON(t testing.TB, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// addImageWithKit registers an image whose kit is a URL (never fetched by
// these tests).
func (f *fm) addImageWithKit(id, version string) api.Image {
	f.t.Helper()
	var im api.Image
	f.ok(f.do("POST", "/images", `{"id":"`+id+`","label":"`+id+`","dssVersion":"`+version+`","kit":{"url":"https://kits.example.com/k.tgz","sha256":"`+strings.Repeat("a", 64)+`"}}`), &im)
	return im
}

// doneByFM counts the audit records of object that FM made of its own
// accord, by "action outcome".
func (f *fm) doneByFM(object string) map[string]int {
	f.t.Helper()
	var recs []protocol.AuditRecord
	f.ok(f.do("GET", "/audit?limit=1000&object="+object, ""), &recs)
	count := map[string]int{}
	for _, r := range recs {
		if r.Who == "fm" {
			count[r.Action+" "+r.Outcome]++
		}
	}
	return count
}

// opRequest reads operation jobID from fm_ops: the provision request it
// sent, and its deadline.
func opRequest(t *testing.T, js jetstream.JetStream, jobID string) (protocol.ProvisionRequest, time.Time) {
	t.Helper()
	ctx := context.Background()
	kv, err := js.KeyValue(ctx, protocol.BucketOps)
	if err != nil {
		t.Fatal(err)
	}
	entry, err := kv.Get(ctx, jobID)
	if err != nil {
		t.Fatal(err)
	}
	var op struct {
		Deadline time.Time       `json:"deadline"`
		Request  json.RawMessage `json:"request"`
	}
	var req protocol.ProvisionRequest
	if err := json.Unmarshal(entry.Value(), &op); err != nil {
		t.Fatal(err)
	}
	if err := protocol.Decode(op.Request, &req); err != nil {
		t.Fatal(err)
	}
	return req, op.Deadline
}

// accepted makes a call until it is answered 200, for at most 10 s (the
// server's copies follow the bus: a call right after a write to it may be
// refused first), and decodes the answer into out.
func (f *fm) accepted(method, path string, out any) {
	f.t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		r := f.do(method, path, "")
		if r.status == 200 {
			if err := json.Unmarshal(r.body, out); err != nil {
				f.t.Fatal(err)
			}
			return
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("%s %s: %d %s", method, path, r.status, r.body)
		}
	}
}
