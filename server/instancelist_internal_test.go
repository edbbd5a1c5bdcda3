package server

import (
	"encoding/json"
	"testing"

	"github.com/fleetmanager/fm/api"
)

// A list reuses an instance's encoding while its revision and the labels
// read into it are the same, encodes it again when one changed, and never
// serves or keeps what redaction changed for one reader.
func TestAListReusesOnlyUnchangedEncodings(t *testing.T) {
	var e instanceEncodings
	in := api.Instance{ID: "in-a", Label: "a", VirtualNetworkLabel: "net", InstanceSettingsTemplateLabel: "tpl", SSLCertificatePEM: "cert+key"}
	in.Revision = 1
	tests := []struct {
		name     string
		change   func(*api.Instance)
		redacted bool
		want     func(api.Instance) bool
	}{
		{"first", func(*api.Instance) {}, false, func(got api.Instance) bool { return got.Label == "a" }},
		// The same revision and labels: the kept encoding, even though the
		// value handed in differs (which a real revision never allows).
		{"reused", func(in *api.Instance) { in.Label = "not re-read" }, false, func(got api.Instance) bool { return got.Label == "a" }},
		{"new revision", func(in *api.Instance) { in.Revision, in.Label = 2, "b" }, false, func(got api.Instance) bool { return got.Label == "b" }},
		{"network renamed", func(in *api.Instance) { in.VirtualNetworkLabel = "net2" }, false,
			func(got api.Instance) bool { return got.VirtualNetworkLabel == "net2" }},
		{"template renamed", func(in *api.Instance) { in.InstanceSettingsTemplateLabel = "tpl2" }, false,
			func(got api.Instance) bool { return got.InstanceSettingsTemplateLabel == "tpl2" }},
		{"redacted for a viewer", func(in *api.Instance) { in.SSLCertificatePEM = "cert" }, true,
			func(got api.Instance) bool { return got.SSLCertificatePEM == "cert" }},
		{"the operator's again", func(in *api.Instance) { in.SSLCertificatePEM = "cert+key" }, false,
			func(got api.Instance) bool { return got.SSLCertificatePEM == "cert+key" }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.change(&in)
			b, err := e.list([]api.Instance{in}, []bool{tc.redacted}, true)
			if err != nil {
				t.Fatal(err)
			}
			var got []api.Instance
			if err := json.Unmarshal(b, &got); err != nil {
				t.Fatalf("%s: %v", b, err)
			}
			if len(got) != 1 || !tc.want(got[0]) {
				t.Fatalf("listed %s", b)
			}
		})
	}
	if b, _ := e.list(nil, nil, true); string(b) != "[]" {
		t.Fatalf("an empty list is %s", b)
	}
}
