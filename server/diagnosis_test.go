package server_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/internal/natsauth"
	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
	"github.com/fleetmanager/fm/server/servertest"
	"github.com/nats-io/nats.go"
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

// TestTheRelayTakesDiagnosisChunksOnlyForACollectUnderWay: FM_DIAG is
// shared by every instance, so the relay of what agents store takes a
// diagnosis chunk only for the collect-diagnosis of its instance under
// way, on its command's subjects. (On a bus without FM's accounts, as
// here, a test's connection publishes where the agents' imports lead.)
func TestTheRelayTakesDiagnosisChunksOnlyForACollectUnderWay(t *testing.T) {
	f := start(t, servertest.WithConfig(func(c *server.Config) { c.SweepInterval = time.Hour }))
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("diag", vn.ID, tpl.ID, im.ID))
	other := f.createInstance(instanceBody("other", vn.ID, tpl.ID, im.ID))
	runningWithVolume(t, f.env.Bus, in.ID)
	runningWithVolume(t, f.env.Bus, other.ID)
	nc := f.env.Bus.Connect(t)
	// stored sends a chunk as an agent does, again until answered (the
	// relay drops what it refuses; the server's copies may lag behind an
	// operation just started) when it is to be stored.
	stored := func(instance, run string, want bool) bool {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); ; {
			m, err := nc.Request(natsauth.RelaySubject(protocol.DiagSubject(instance, run)), []byte("chunk"), time.Second)
			if err == nil && strings.Contains(string(m.Data), protocol.StreamDiagnosis) {
				return true
			}
			if !errors.Is(err, nats.ErrTimeout) {
				t.Fatalf("a chunk on %s: %v", run, err)
			}
			if !want || time.Now().After(deadline) {
				return false
			}
		}
	}
	if stored(in.ID, "op-none-cmd-r1", false) {
		t.Fatal("a chunk was stored with no collect-diagnosis under way")
	}
	var op, othersOp api.Future
	f.ok(f.do("GET", "/instances/"+in.ID+"/actions/collect-diagnosis", ""), &op)
	f.ok(f.do("GET", "/instances/"+other.ID+"/actions/collect-diagnosis", ""), &othersOp)
	cmd := op.JobID + "-cmd"
	for _, c := range []struct {
		instance, run string
		want          bool
	}{
		{in.ID, cmd + "-r-1", true},
		{in.ID, cmd, true},
		{other.ID, othersOp.JobID + "-cmd-r-1", true},
		{in.ID, othersOp.JobID + "-cmd-r-1", false}, // another's collect
		{other.ID, cmd + "-r-1", false},
		{in.ID, "r-1", false},
	} {
		if got := stored(c.instance, c.run, c.want); got != c.want {
			t.Errorf("a chunk of %s on %s: stored %v, want %v", c.instance, c.run, got, c.want)
		}
	}
	f.ok(f.do("DELETE", "/futures/"+op.JobID, ""), nil)
	f.waitFuture(op.JobID, api.OpAborted, 20*time.Second)
	if stored(in.ID, cmd+"-r-2", false) {
		t.Fatal("a chunk was stored after its collect-diagnosis ended")
	}
	// Its chunks went when it ended; the other's stay.
	diag, err := f.env.Bus.JetStream(t).Stream(context.Background(), protocol.StreamDiagnosis)
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		info, err := diag.Info(context.Background(), jetstream.WithSubjectFilter(protocol.DiagSubject("*", "*")))
		if err != nil {
			t.Fatal(err)
		}
		if _, left := info.State.Subjects[protocol.DiagSubject(in.ID, cmd+"-r-1")]; !left && len(info.State.Subjects) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("FM_DIAG holds %v after the collect ended", info.State.Subjects)
		}
	}
}

// TestADiagnosisIsFiledAndKeptSealed: an agent with an instance key sends
// its bundle sealed with it; FM opens it, checks it, and keeps it sealed
// with FM's own key (logs and DSS's settings may hold secrets); an
// operator downloads it opened. A bundle that does not open with the
// instance's key fails the operation, and nothing is filed.
func TestADiagnosisIsFiledAndKeptSealed(t *testing.T) {
	f, ready := diagnosable(t)
	in, key := ready("sealed-diag")
	js := f.env.Bus.JetStream(t)

	bundle := bytes.Repeat([]byte("backend.log: DKU_SECRET_MARKER\n"), 30000) // several chunks
	collect := func(sealWith []byte, beforeTheResult func()) api.Future {
		t.Helper()
		return collectDiagnosis(t, f, in, sealWith, bundle, 0, beforeTheResult)
	}

	bad := collect(seal.NewKey(), func() {})
	f.waitFuture(bad.JobID, api.OpFailed, 20*time.Second)
	// The operation's end cannot be written at first: the result is folded
	// again, and finds the bundle filed (its chunks are still there, too).
	var restore func()
	op := collect(key, func() { restore = refuseWrites(t, js, protocol.BucketOps) })
	waitRedelivered(t, js)
	restore()
	done := f.waitFuture(op.JobID, api.OpSucceeded, 20*time.Second)
	// The result describes the bundle as it is downloaded.
	var result map[string]any
	sum := sha256.Sum256(bundle)
	if err := json.Unmarshal(done.Result, &result); err != nil || result["sizeBytes"] != float64(len(bundle)) ||
		result["sha256"] != hex.EncodeToString(sum[:]) || result["sealed"] != nil || result["object"] != in+"/"+op.JobID+"-cmd.tar.gz" {
		t.Fatalf("the result: %s", done.Result)
	}
	obs, err := js.ObjectStore(context.Background(), protocol.ObjectStoreDiagnosis)
	if err != nil {
		t.Fatal(err)
	}
	names, _ := obs.List(context.Background())
	if len(names) != 1 || names[0].Name != in+"/"+op.JobID+"-cmd.tar.gz" {
		t.Fatalf("filed: %+v", names)
	}
	kept, err := obs.GetBytes(context.Background(), names[0].Name)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(kept, []byte("DKU_SECRET_MARKER")) || !bytes.HasPrefix(kept, seal.StreamMagic()) {
		t.Fatal("the bundle is kept in clear")
	}
	var listed []api.Diagnosis
	f.ok(f.do("GET", "/instances/"+in+"/diagnoses", ""), &listed)
	if len(listed) != 1 || listed[0].SizeBytes != int64(len(bundle)) {
		t.Fatalf("listed: %+v, want one of %d bytes", listed, len(bundle))
	}
	r := f.do("GET", "/instances/"+in+"/diagnoses/"+listed[0].Name, "")
	if r.status != http.StatusOK || !bytes.Equal(r.body, bundle) {
		t.Fatalf("download: %d, %d bytes", r.status, len(r.body))
	}
}

// collectDiagnosis asks for a diagnosis of instance in and answers as its
// agent would: bundle sealed with sealWith, sent in chunks, then the
// result, which claims missing chunks more than were sent.
// beforeTheResult runs just before the result is published.
func collectDiagnosis(t *testing.T, f *fm, in string, sealWith, bundle []byte, missing int, beforeTheResult func()) api.Future {
	t.Helper()
	js := f.env.Bus.JetStream(t)
	var op api.Future
	f.ok(f.do("GET", "/instances/"+in+"/actions/collect-diagnosis", ""), &op)
	cmd := op.JobID + "-cmd"
	var sealed bytes.Buffer
	w, err := seal.NewStreamWriter(&sealed, sealWith, protocol.SealedDiagnosisPlace(in, cmd))
	if err != nil {
		t.Fatal(err)
	}
	w.Write(bundle)
	w.Close()
	subject := protocol.DiagSubject(in, cmd+"-r-1")
	data := sealed.Bytes()
	chunks := 0
	for off := 0; off < len(data); off += 200 << 10 {
		if _, err := js.Publish(context.Background(), subject, data[off:min(off+200<<10, len(data))]); err != nil {
			t.Fatal(err)
		}
		chunks++
	}
	sum := sha256.Sum256(data)
	result, _ := json.Marshal(protocol.DiagnosisResult{Subject: subject, Chunks: chunks + missing, SizeBytes: int64(len(data)),
		SHA256: hex.EncodeToString(sum[:]), Sealed: true})
	beforeTheResult()
	publishEvent(t, js, protocol.Event{Instance: in, Kind: protocol.EventCommand, Source: "agent", CommandID: cmd, OpID: op.JobID,
		Step: string(protocol.CommandCollectDiagnosis), Status: protocol.StatusOK, Result: result})
	return op
}

// TestFilingADiagnosisHoldsNoOtherFolding: a bundle being filed (here one
// whose last chunk never comes: the filer waits for it, then fails the
// operation) does not hold up the folding of other instances' events: a
// second instance's diagnosis is filed, and its operation ended, first.
func TestFilingADiagnosisHoldsNoOtherFolding(t *testing.T) {
	f, ready := diagnosable(t)
	stuck, stuckKey := ready("diag-stuck")
	other, otherKey := ready("diag-other")
	bundle := bytes.Repeat([]byte("backend.log\n"), 1000)
	held := collectDiagnosis(t, f, stuck, stuckKey, bundle, 1, func() {})
	// The agent sends its result over and over while it is filed: the
	// copies take no filer, and do not stay among the events handed out.
	js := f.env.Bus.JetStream(t)
	events, err := js.Consumer(context.Background(), protocol.StreamEvents, server.EventsConsumer)
	if err != nil {
		t.Fatal(err)
	}
	last, err := js.Stream(context.Background(), protocol.StreamEvents)
	if err != nil {
		t.Fatal(err)
	}
	m, err := last.GetLastMsgForSubject(context.Background(), protocol.EventSubject(stuck, protocol.EventCommand))
	if err != nil {
		t.Fatal(err)
	}
	for range 20 {
		if _, err := js.Publish(context.Background(), m.Subject, m.Data); err != nil {
			t.Fatal(err)
		}
	}
	filed := collectDiagnosis(t, f, other, otherKey, bundle, 0, func() {})
	f.waitFuture(filed.JobID, api.OpSucceeded, 20*time.Second)
	if info, err := events.Info(context.Background()); err != nil || info.NumAckPending > 3 {
		t.Fatalf("events handed out and not settled: %+v %v; the copies stayed", info, err)
	}
	var now api.Future
	f.ok(f.do("GET", "/futures/"+held.JobID, ""), &now)
	if now.State != api.OpRunning {
		t.Fatalf("the diagnosis missing a chunk ended (%s) before the other was filed: they were not filed side by side", now.State)
	}
	f.waitFuture(held.JobID, api.OpFailed, 30*time.Second)
}

// diagnosable starts FM (with an authority, no sweep) and returns ready,
// which makes a running instance whose agent joined, and returns its id and
// its instance key.
func diagnosable(t *testing.T) (*fm, func(label string) (string, []byte)) {
	t.Helper()
	f := startWithAuthority(t, time.Hour, servertest.WithConfig(func(c *server.Config) { c.SweepInterval = time.Hour }))
	vn, tpl, _ := f.fleet()
	im := f.addImageWithKit("dss-diag", "14.0.0")
	return f, func(label string) (string, []byte) {
		t.Helper()
		in := f.createInstance(instanceBody(label, vn.ID, tpl.ID, im.ID)).ID
		req := f.provisionRequest(in)
		var joined protocol.JoinResponse
		f.ok(f.joinAs(in, req.Spec.Join.Token, machineKey(t)), &joined)
		key, err := base64.StdEncoding.DecodeString(joined.InstanceKey)
		if err != nil {
			t.Fatal(err)
		}
		f.abortOperation(in)
		runningWithVolume(t, f.env.Bus, in)
		return in, key
	}
}
