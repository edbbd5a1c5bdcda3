package server_test

import (
	"encoding/json"
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"

	"github.com/fleetmanager/fm/api"
)

// TestCallIDs: every REST call is named, by the client's X-Request-Id if it
// is usable, else by one the server makes; the response echoes it, and the
// audit record and the provision request the call causes carry it.
func TestCallIDs(t *testing.T) {
	f := start(t)
	vn, tpl, _ := f.fleet()
	im := f.addImageWithKit("dss-called", "14.0.0")
	in := f.createInstance(instanceBody("called", vn.ID, tpl.ID, im.ID))
	call := func(method, path, id string) (*http.Response, []byte) {
		t.Helper()
		req, err := http.NewRequest(method, f.env.URL+"/api/public/tenants/main"+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		req.SetBasicAuth(f.env.Key.ID, f.env.Key.Secret)
		if id != "" {
			req.Header.Set("X-Request-Id", id)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, b
	}
	made := regexp.MustCompile(`^req-[a-z0-9]+$`)
	for _, tc := range []struct{ name, sent, want string }{
		{"none sent", "", ""},
		{"a usable one", "ci-run-42.step_1", "ci-run-42.step_1"},
		{"spaces", "a b", ""},
		{"a tab", "a\tb", ""},
		{"a quote", `a"b`, ""},
		{"too long", strings.Repeat("x", 65), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, _ := call("GET", "/instances", tc.sent)
			got := resp.Header.Get("X-Request-Id")
			if tc.want != "" && got != tc.want || tc.want == "" && !made.MatchString(got) {
				t.Fatalf("sent %q, answered %q", tc.sent, got)
			}
		})
	}

	resp, body := call("GET", "/instances/"+in.ID+"/actions/reprovision", "deploy-7")
	if resp.StatusCode != 200 || resp.Header.Get("X-Request-Id") != "deploy-7" {
		t.Fatalf("reprovision: %d %s, X-Request-Id %q", resp.StatusCode, body, resp.Header.Get("X-Request-Id"))
	}
	var fut api.Future
	if err := json.Unmarshal(body, &fut); err != nil || fut.JobID == "" {
		t.Fatalf("reprovision: %s (%v)", body, err)
	}
	if req, _ := opRequest(t, f.env.Bus.JetStream(t), fut.JobID); req.CallID != "deploy-7" {
		t.Fatalf("the provision request's callId is %q, want deploy-7", req.CallID)
	}
	var records []struct {
		Action, CallID string
	}
	f.ok(f.do("GET", "/audit?limit=100", ""), &records)
	var found bool
	for _, r := range records {
		if strings.HasSuffix(r.Action, "/actions/reprovision") {
			found = r.CallID == "deploy-7"
		}
	}
	if !found {
		t.Fatalf("no audit record of the reprovision with callId deploy-7: %+v", records)
	}
}
