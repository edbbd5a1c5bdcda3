package server_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// TestDiagnosisDownload: an instance's bundles in fm_diagnosis are listed
// and downloaded over REST by operators (audited), never another
// instance's through a crafted name, and not by viewers.
func TestDiagnosisDownload(t *testing.T) {
	f := start(t)
	obs, err := f.env.Bus.JetStream(t).ObjectStore(context.Background(), protocol.ObjectStoreDiagnosis)
	if err != nil {
		t.Fatal(err)
	}
	bundle := bytes.Repeat([]byte("a bundle of logs\n"), 20000) // several chunks
	for name, data := range map[string][]byte{"in-one/op-1-cmd.tar.gz": bundle, "in-other/op-2-cmd.tar.gz": []byte("not yours")} {
		if _, err := obs.Put(context.Background(), jetstream.ObjectMeta{Name: name}, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
	}
	var listed []api.Diagnosis
	f.ok(f.do("GET", "/instances/in-one/diagnoses", ""), &listed)
	if len(listed) != 1 || listed[0].Name != "op-1-cmd.tar.gz" || listed[0].SizeBytes != int64(len(bundle)) || listed[0].CreatedAt.IsZero() {
		t.Fatalf("listed: %+v", listed)
	}
	r := f.do("GET", "/instances/in-one/diagnoses/op-1-cmd.tar.gz", "")
	if r.status != http.StatusOK || !bytes.Equal(r.body, bundle) || r.header.Get("Content-Type") != "application/gzip" ||
		!strings.Contains(r.header.Get("Content-Disposition"), `filename=in-one-op-1-cmd.tar.gz`) {
		t.Fatalf("download: %d %d bytes %v", r.status, len(r.body), r.header)
	}
	for _, bad := range []string{"/instances/in-one/diagnoses/op-2-cmd.tar.gz", "/instances/in-one/diagnoses/..%2Fin-other%2Fop-2-cmd.tar.gz",
		"/instances/in-one/diagnoses/op-1-cmd", "/instances/in.one/diagnoses/op-1-cmd.tar.gz", "/instances/in-one/diagnoses/in-other%2Fop-2-cmd.tar.gz"} {
		if r := f.do("GET", bad, ""); r.status != http.StatusNotFound || bytes.Contains(r.body, []byte("not yours")) {
			t.Errorf("GET %s: %d %s", bad, r.status, r.body)
		}
	}
	v := f.newKey("viewer")
	for _, p := range []string{"/instances/in-one/diagnoses", "/instances/in-one/diagnoses/op-1-cmd.tar.gz"} {
		if r := f.doAs("GET", p, "", v.ID, v.Secret); r.status != http.StatusForbidden {
			t.Errorf("a viewer's GET %s: %d", p, r.status)
		}
	}
	var audit []struct{ Action, Outcome string }
	f.ok(f.do("GET", "/audit?limit=1000", ""), &audit)
	raw, _ := json.Marshal(audit)
	if !strings.Contains(string(raw), `"Action":"GET /api/public/tenants/main/instances/in-one/diagnoses/op-1-cmd.tar.gz","Outcome":"ok"`) {
		t.Errorf("the download is not audited: %s", raw)
	}
}
