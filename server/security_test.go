package server_test

import (
	"context"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
	"github.com/fleetmanager/fm/server/servertest"
	"github.com/nats-io/nats.go/jetstream"
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
		{"GET", i + "/actions/upgrade-agent", "", "operator"},
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
		{"GET", "/cloud-accounts", "", "viewer"},
		{"POST", "/cloud-accounts", `{"label":""}`, "admin"},
		{"GET", "/cloud-accounts/ca-none", "", "viewer"},
		{"PUT", "/cloud-accounts/ca-none", `{"label":"x"}`, "admin"},
		{"DELETE", "/cloud-accounts/ca-none", "", "admin"},
		{"GET", "/alerts", "", "viewer"},
		{"GET", "/alerting", "", "admin"},
		{"PUT", "/alerting", `{"webhookURL":"ftp://x"}`, "admin"},
		{"GET", i + "/diagnoses", "", "operator"},
		{"GET", i + "/diagnoses/none.tar.gz", "", "operator"},
		{"GET", "/api-keys", "", "admin"},
		{"POST", "/api-keys", `{"label":"","role":"viewer"}`, "admin"},
		{"DELETE", "/api-keys/none", "", "admin"},
		{"GET", "/audit?limit=1", "", "admin"},
		{"GET", "/agent-upgrade", "", "viewer"},
		{"POST", "/agent-upgrade", `{"batchSize":-1}`, "admin"},
		{"DELETE", "/agent-upgrade", "", "admin"},
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

// TestReplicasShareTheirCountOfFailedAttempts: failures counted by one
// replica of the server count at another, as on one server, whether counted
// by key id or by client address.
func TestReplicasShareTheirCountOfFailedAttempts(t *testing.T) {
	a := start(t)
	b := &fm{t: t, env: a.env.Replica(t)}
	key := a.env.Key
	// Ten guesses at the admin key's secret through replica A, each from
	// an address of its own: through B, more guesses are refused unchecked
	// (the right secret still passes: its holder is not locked out).
	for n := range 10 {
		a.failed(a.doFrom(fmt.Sprintf("127.0.0.%d", 2+n), "GET", "/instances", "", key.ID, "wrong"), 401, "Unauthenticated")
	}
	// B counts its own failures too: the guesses it checks before it
	// refuses must be fewer than the ten it would check alone.
	checked := 0
	waitFor(t, "the key id's failures at replica A refuse guesses at replica B", func() bool {
		// Each guess from an address of its own, lest the address's limit
		// answer.
		status := b.doFrom(fmt.Sprintf("127.0.1.%d", checked+1), "GET", "/instances", "", key.ID, "wrong").status
		if status == 401 {
			checked++
		}
		return status == 429 || checked >= 10
	})
	if checked >= 10 {
		t.Fatalf("replica B checked %d guesses at a key id that failed ten times at replica A", checked)
	}
	b.ok(b.doFrom("127.0.0.20", "GET", "/instances", "", key.ID, key.Secret), nil)
	// Ten failures from one address through A: B refuses that address
	// whatever key it shows, and only that address.
	other := a.newKey("operator")
	for n := range 10 {
		a.failed(a.doFrom("127.0.0.30", "GET", "/instances", "", fmt.Sprintf("key-%d", n), "wrong"), 401, "Unauthenticated")
	}
	waitFor(t, "an address's failures at replica A block it at replica B", func() bool {
		return b.doFrom("127.0.0.30", "GET", "/instances", "", other.ID, other.Secret).status == 429
	})
	b.ok(b.doFrom("127.0.0.31", "GET", "/instances", "", other.ID, other.Secret), nil)
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

// TestAuditListsPageAndFilter: the audit list gives the last records (of
// one kind of object, however far back they are), or those after a
// sequence, oldest first, as the stream holds them.
func TestAuditListsPageAndFilter(t *testing.T) {
	f := start(t)
	js := f.env.Bus.JetStream(t)
	ctx := context.Background()
	// 600 records (more than one batch of a read), one in ten about
	// instances, the first of them early, one in seven by another actor;
	// the last 300 after mid.
	var mid time.Time
	for i := range 600 {
		object := "virtual-networks"
		if i%10 == 2 {
			object = "instances"
		}
		who := "key:test"
		if i%7 == 3 {
			who = "key:other"
		}
		if i == 300 {
			time.Sleep(20 * time.Millisecond) // (stream timestamps apart)
			mid = time.Now()
			time.Sleep(20 * time.Millisecond)
		}
		data, err := protocol.Encode(&protocol.AuditRecord{ID: fmt.Sprintf("au-test-%d", i), Tenant: "main", Object: object,
			Action: fmt.Sprintf("test %d", i), Who: who, Outcome: "ok", Time: time.Now().UTC()})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := js.Publish(ctx, protocol.AuditSubject("main", object), data); err != nil {
			t.Fatal(err)
		}
	}
	// What the stream holds, read one by one.
	st, err := js.Stream(ctx, protocol.StreamAudit)
	if err != nil {
		t.Fatal(err)
	}
	var all, instances, others, late, lateOthers []uint64
	for seq := st.CachedInfo().State.FirstSeq; seq <= st.CachedInfo().State.LastSeq; seq++ {
		m, err := st.GetMsg(ctx, seq)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, seq)
		if strings.HasSuffix(m.Subject, ".instances") {
			instances = append(instances, seq)
		}
		var rec protocol.AuditRecord
		if err := protocol.Decode(m.Data, &rec); err != nil {
			t.Fatal(err)
		}
		if rec.Who == "key:other" {
			others = append(others, seq)
		}
		if !m.Time.Before(mid) {
			late = append(late, seq)
			if rec.Who == "key:other" {
				lateOthers = append(lateOthers, seq)
			}
		}
	}
	if len(late) != 300 || len(others) < 80 {
		t.Fatalf("%d records after mid, %d of the other actor", len(late), len(others))
	}
	since := url.QueryEscape(mid.UTC().Format(time.RFC3339Nano))
	if len(instances) != 60 || len(all) < 600 {
		t.Fatalf("the stream holds %d records, %d about instances", len(all), len(instances))
	}
	last := all[len(all)-1]
	for _, c := range []struct {
		query string
		want  []uint64
	}{
		{"", all[len(all)-100:]},
		{"limit=5", all[len(all)-5:]},
		{"limit=1000", all[max(0, len(all)-1000):]},
		{"object=instances&limit=2", instances[len(instances)-2:]},
		{"object=instances&limit=59", instances[1:]},
		{"object=instances", instances},
		{"after=" + strconv.FormatUint(all[3], 10) + "&limit=3", all[4:7]},
		{"after=" + strconv.FormatUint(all[3], 10) + "&limit=300", all[4:304]},
		{"after=" + strconv.FormatUint(instances[0], 10) + "&object=instances", instances[1:]},
		{"after=" + strconv.FormatUint(instances[0], 10) + "&object=instances&limit=1", instances[1:2]},
		{"after=" + strconv.FormatUint(last, 10), nil},
		{"object=api-keys&limit=7", nil},
		{"who=key:other&limit=1000", others},
		{"who=key:other&limit=3", others[len(others)-3:]},
		{"since=" + since + "&limit=1000", late},
		{"since=" + since, late[len(late)-100:]},
		{"since=" + since + "&who=key:other&limit=1000", lateOthers},
		{"since=" + since + "&after=" + strconv.FormatUint(all[3], 10) + "&limit=2", late[:2]},
		{"since=" + url.QueryEscape(time.Now().Add(time.Hour).UTC().Format(time.RFC3339)), nil},
		{"who=key:nobody", nil},
	} {
		t.Run(c.query, func(t *testing.T) {
			var got []struct{ Seq uint64 }
			f.ok(f.do("GET", "/audit?"+c.query, ""), &got)
			var seqs []uint64
			for _, e := range got {
				seqs = append(seqs, e.Seq)
			}
			if !slices.Equal(seqs, c.want) {
				t.Fatalf("sequences %v, want %v", seqs, c.want)
			}
		})
	}
	for _, bad := range []string{"object=instances.*", "object=>", "limit=1001", "limit=0", "after=-1", "after=18446744073709551615", "since=yesterday"} {
		f.failed(f.do("GET", "/audit?"+bad, ""), 400, "InvalidArgument")
	}
	// No consumer outlives its list.
	if n := len(consumerNames(t, st)); n != 0 {
		t.Fatalf("%d consumers left on the audit stream", n)
	}
}

func consumerNames(t *testing.T, st jetstream.Stream) []string {
	t.Helper()
	var names []string
	l := st.ConsumerNames(context.Background())
	for n := range l.Name() {
		names = append(names, n)
	}
	if err := l.Err(); err != nil {
		t.Fatal(err)
	}
	return names
}

func TestSecretsAreSealedInTheBuckets(t *testing.T) {
	f := start(t)
	license := `{\n  \"content\": {\"licensee\": \"ACME-SECRET-LICENSE\"}\n}`
	f.createTemplate(`{"label":"lic","license":"` + license + `","dataikuAwsAPIAccessMode":"KEYPAIR","dataikuAwsKeypairStorageMode":"INLINE_ENCRYPTED","dataikuAwsAccessKeyId":"AKIAIOSFODNN7EXAMPLE","dataikuAwsSecretAccessKey":"TEMPLATEsecretKEY0123456789"}`)
	f.ok(f.do("PUT", "/cloud-credentials", `{"licenseMode":"AUTO_UPDATE","licenseToken":"TENANT-LICENSE-TOKEN","awsAuthenticationMode":"KEYPAIR","awsAccessKeyId":"AKIAIOSFODNN7EXAMPLE","awsSecretAccessKey":"TENANT-SECRET-KEY"}`), nil)
	var account api.CloudAccount
	f.ok(f.do("POST", "/cloud-accounts", `{"label":"keys","awsAuthenticationMode":"KEYPAIR","awsAccessKeyId":"AKIAIOSFODNN7EXAMPLE","awsSecretAccessKey":"ACCOUNT-SECRET-KEY"}`), &account)
	f.ok(f.do("PUT", "/alerting", `{"webhookURL":"https://chat.example.com/hooks/WEBHOOK-TOKEN","webhookSecret":"WEBHOOK-SECRET"}`), nil)
	// A provision request of an instance on the account's network carries
	// its secret, sealed.
	vn := f.createNetwork(`{"label":"on-keys","mode":"EXISTING_MONOTENANT","awsVpcId":"vpc-1","awsSubnetId":"subnet-1","accountId":"` + account.ID + `"}`)
	in := f.createInstance(instanceBody("sealed", vn.ID, f.createTemplate(`{"label":"plain"}`).ID, f.addImageWithKit("dss-14.0.0-test", "14.0.0").ID))
	var op api.Future
	f.ok(f.do("GET", "/instances/"+in.ID+"/actions/reprovision", ""), &op)
	raw := bustest.Dump(t, f.env.Bus.JetStream(t))
	for _, secret := range []string{"ACME-SECRET-LICENSE", "TEMPLATEsecretKEY0123456789", "TENANT-LICENSE-TOKEN", "TENANT-SECRET-KEY",
		"ACCOUNT-SECRET-KEY", "WEBHOOK-TOKEN", "WEBHOOK-SECRET", f.env.Key.Secret} {
		if strings.Contains(raw, secret) {
			t.Errorf("%s is in a bucket in clear", secret)
		}
	}
	if !strings.Contains(raw, "fmsealed2:") || !strings.Contains(raw, `"sealedSecretAccessKey":"fmsealed2:`) {
		t.Fatal("nothing sealed found (the account's key in the provision request): the scan read nothing")
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

// TestASealedValueMovedToAnotherObjectDoesNotOpen: each sealed field is
// bound to its bucket, key and field; one copied into another object's
// record (by someone who can write the bucket) is not read as that
// object's.
func TestASealedValueMovedToAnotherObjectDoesNotOpen(t *testing.T) {
	f := start(t)
	a := f.createTemplate(`{"label":"a","license":"{\"licensee\": \"LICENSE-OF-A\"}"}`)
	b := f.createTemplate(`{"label":"b","license":"{\"licensee\": \"LICENSE-OF-B\"}"}`)
	kv, err := f.env.Bus.JetStream(t).KeyValue(context.Background(), protocol.BucketTemplates)
	if err != nil {
		t.Fatal(err)
	}
	read := func(id string) map[string]any {
		e, err := kv.Get(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		var doc map[string]any
		if err := json.Unmarshal(e.Value(), &doc); err != nil {
			t.Fatal(err)
		}
		return doc
	}
	docA, docB := read(a.ID), read(b.ID)
	docB["license"] = docA["license"]
	if _, err := kv.Put(context.Background(), b.ID, []byte(mustJSON(t, docB))); err != nil {
		t.Fatal(err)
	}
	// A server that starts reads every record afresh.
	f.env.Restart(t)
	r := f.do("GET", "/instance-settings-templates/"+b.ID, "")
	if strings.Contains(string(r.body), "LICENSE-OF-A") {
		t.Fatalf("a sealed value moved from A opened as B's: %d %s", r.status, r.body)
	}
	if r := f.do("GET", "/instance-settings-templates/"+a.ID, ""); !strings.Contains(string(r.body), "LICENSE-OF-A") {
		t.Fatalf("A after the move: %d %s", r.status, r.body)
	}
}

// legacyKey stores a viewer key as an FM from before HMAC-hashed secrets
// stored it, its secret hashed with PBKDF2-SHA256 at the given work
// factor, and waits until the server has it.
func (f *fm) legacyKey(iterations int) key {
	f.t.Helper()
	k := key{ID: rand.Text()[:24], Secret: rand.Text() + rand.Text(), Role: "viewer"}
	salt := []byte(rand.Text()[:16])
	dk, err := pbkdf2.Key(sha256.New, k.Secret, salt, iterations, 32)
	if err != nil {
		f.t.Fatal(err)
	}
	rec := map[string]any{"id": k.ID, "label": "legacy " + k.ID, "role": k.Role, "createdAt": time.Now().UTC(), "createdBy": "fm",
		"hash": fmt.Sprintf("pbkdf2-sha256$%d$%s$%s", iterations, base64.RawStdEncoding.EncodeToString(salt), base64.RawStdEncoding.EncodeToString(dk))}
	if _, err := f.keysBucket().Create(context.Background(), k.ID, []byte(mustJSON(f.t, rec))); err != nil {
		f.t.Fatal(err)
	}
	waitFor(f.t, "the server has key "+k.ID, func() bool {
		var listed []key
		f.ok(f.do("GET", "/api-keys", ""), &listed)
		return slices.ContainsFunc(listed, func(l key) bool { return l.ID == k.ID })
	})
	return k
}

func (f *fm) keysBucket() jetstream.KeyValue {
	f.t.Helper()
	kv, err := f.env.Bus.JetStream(f.t).KeyValue(context.Background(), protocol.BucketAPIKeys)
	if err != nil {
		f.t.Fatal(err)
	}
	return kv
}

// storedHash is the hash fm_apikeys holds for a key.
func (f *fm) storedHash(id string) string {
	f.t.Helper()
	e, err := f.keysBucket().Get(context.Background(), id)
	if err != nil {
		f.t.Fatal(err)
	}
	var rec struct{ Hash string }
	if err := json.Unmarshal(e.Value(), &rec); err != nil {
		f.t.Fatal(err)
	}
	return rec.Hash
}

// TestKeySecretHashes: a key's secret is kept as an HMAC-SHA-256 (cheap to
// check, so that a wrong guess costs the server little); a key an older FM
// stored with PBKDF2 still authenticates, and is stored as an HMAC from its
// first success on.
func TestKeySecretHashes(t *testing.T) {
	f := start(t)
	cases := []struct {
		name string
		run  func(t *testing.T, f *fm)
	}{
		{"a new key", func(t *testing.T, f *fm) {
			k := f.newKey("viewer")
			if h := f.storedHash(k.ID); !strings.HasPrefix(h, "hmac-sha256$") || strings.Contains(h, k.Secret) {
				t.Fatalf("stored hash %q", h)
			}
			f.ok(f.doAs("GET", "/instances", "", k.ID, k.Secret), nil)
			f.failed(f.doAs("GET", "/instances", "", k.ID, k.Secret+"x"), 401, "Unauthenticated")
		}},
		{"a key an older FM stored", func(t *testing.T, f *fm) {
			k := f.legacyKey(1000)
			// A wrong secret changes nothing.
			f.failed(f.doAs("GET", "/instances", "", k.ID, k.Secret[1:]), 401, "Unauthenticated")
			if h := f.storedHash(k.ID); !strings.HasPrefix(h, "pbkdf2-sha256$") {
				t.Fatalf("after a wrong secret the hash is %q", h)
			}
			f.ok(f.doAs("GET", "/instances", "", k.ID, k.Secret), nil)
			waitFor(t, "the key is stored as an HMAC", func() bool { return strings.HasPrefix(f.storedHash(k.ID), "hmac-sha256$") })
			f.ok(f.doAs("GET", "/instances", "", k.ID, k.Secret), nil)
			f.failed(f.doAs("GET", "/instances", "", k.ID, k.Secret[1:]), 401, "Unauthenticated")
			var listed []map[string]any
			f.ok(f.do("GET", "/api-keys", ""), &listed)
			if raw := mustJSON(t, listed); strings.Contains(raw, "hmac") || strings.Contains(raw, "pbkdf2") {
				t.Fatalf("the key list shows a hash: %s", raw)
			}
		}},
		{"a revoked key an older FM stored", func(t *testing.T, f *fm) {
			k := f.legacyKey(1000)
			f.ok(f.do("DELETE", "/api-keys/"+k.ID, ""), nil)
			f.failed(f.doAs("GET", "/instances", "", k.ID, k.Secret), 401, "Unauthenticated")
			if h := f.storedHash(k.ID); !strings.HasPrefix(h, "pbkdf2-sha256$") {
				t.Fatalf("a revoked key was re-hashed: %q", h)
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { c.run(t, &fm{t: t, env: f.env}) })
	}
}

// TestRateLimits: failed API authentications are counted by client address
// and by key id, failed joins by address, each count apart; an attempt
// holds its place in the counts while it is checked, so that a parallel
// burst gets no more attempts checked than the limit.
func TestRateLimits(t *testing.T) {
	f := startWithAuthority(t, time.Hour)
	vn, tpl, _ := f.fleet()
	im := f.addImageWithKit("dss-limits", "14.0.0")
	in := f.createInstance(instanceBody("limits", vn.ID, tpl.ID, im.ID))
	const limit = 10
	admin := key{ID: f.env.Key.ID, Secret: f.env.Key.Secret}
	badJoin := func(t *testing.T) string { return joinBody(t, in.ID, "jt-none.secret", machineKey(t)) }
	refused := func(f *fm, r response) {
		f.t.Helper()
		f.failed(r, 429, "ResourceExhausted")
		if s, err := strconv.Atoi(r.header.Get("Retry-After")); err != nil || s < 1 || s > 60 {
			f.t.Fatalf("Retry-After %q", r.header.Get("Retry-After"))
		}
	}
	cases := []struct {
		name string
		run  func(t *testing.T, f *fm)
	}{
		{"a parallel burst gets at most the limit checked", func(t *testing.T, f *fm) {
			// A key an older FM stored, with a work factor that makes each
			// check take a while: the burst is all in flight at once.
			k := f.legacyKey(100_000)
			const n = 40
			statuses := make(chan int, n)
			errs := make(chan error, n)
			begin := make(chan struct{})
			var wg sync.WaitGroup
			for i := 0; i < n; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-begin
					r, err := f.tryFrom("127.0.0.2", "GET", "/instances", "", k.ID, "wrong")
					if err != nil {
						errs <- err
						return
					}
					statuses <- r.status
				}()
			}
			close(begin)
			wg.Wait()
			close(statuses)
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			count := map[int]int{}
			for s := range statuses {
				count[s]++
			}
			if count[401] < 1 || count[401] > limit || count[401]+count[429] != n {
				t.Fatalf("statuses %v: want at most %d answered 401, the rest 429", count, limit)
			}
		}},
		{"API failures from an address do not block a join from it", func(t *testing.T, f *fm) {
			k := f.newKey("viewer")
			for i := 0; i < limit; i++ {
				f.failed(f.doFrom("127.0.0.3", "GET", "/instances", "", k.ID, "wrong"), 401, "Unauthenticated")
			}
			refused(f, f.doFrom("127.0.0.3", "GET", "/instances", "", admin.ID, admin.Secret))
			tok := f.reprovision(in.ID).Token
			f.ok(f.doFrom("127.0.0.3", "POST", server.JoinPath, joinBody(t, in.ID, tok, machineKey(t)), "", ""), nil)
		}},
		{"join failures from an address do not block the API from it", func(t *testing.T, f *fm) {
			for i := 0; i < limit; i++ {
				f.failed(f.doFrom("127.0.0.4", "POST", server.JoinPath, badJoin(t), "", ""), 401, "Unauthenticated")
			}
			refused(f, f.doFrom("127.0.0.4", "POST", server.JoinPath, badJoin(t), "", ""))
			f.ok(f.doFrom("127.0.0.4", "GET", "/instances", "", admin.ID, admin.Secret), nil)
		}},
		{"wrong secrets for a key block more guesses at it, not its holder", func(t *testing.T, f *fm) {
			x, y := f.newKey("viewer"), f.newKey("viewer")
			for i := 0; i < limit; i++ {
				f.failed(f.doFrom("127.0.0.5", "GET", "/instances", "", x.ID, "wrong"), 401, "Unauthenticated")
			}
			// Guesses at x are refused from everywhere; x's holder, who
			// knows its secret, is not locked out by whoever read its id
			// (a viewer sees key ids) ...
			refused(f, f.doFrom("127.0.0.6", "GET", "/instances", "", x.ID, "wrong-again"))
			f.ok(f.doFrom("127.0.0.6", "GET", "/instances", "", x.ID, x.Secret), nil)
			// ... another key is not blocked, except from the address that failed.
			f.ok(f.doFrom("127.0.0.6", "GET", "/instances", "", y.ID, y.Secret), nil)
			refused(f, f.doFrom("127.0.0.5", "GET", "/instances", "", y.ID, y.Secret))
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { c.run(t, &fm{t: t, env: f.env}) })
	}
}

// TestAStoppingServerDrains: a server stopped with a drain time keeps
// answering calls while /healthz answers 503 (a load balancer's cue to send
// calls elsewhere), and then stops.
func TestAStoppingServerDrains(t *testing.T) {
	const drain = 5 * time.Second
	f := start(t, servertest.WithConfig(func(c *server.Config) { c.DrainTime = drain }))
	f.ok(f.doAs("GET", "/healthz", "", "", ""), nil)
	stopped := make(chan struct{})
	stopping := time.Now()
	go func() { f.env.Stop(); close(stopped) }()
	waitFor(t, "/healthz answers 503 once the server is stopping", func() bool {
		return f.doAs("GET", "/healthz", "", "", "").status == 503
	})
	f.ok(f.do("GET", "/instances", ""), nil)
	select {
	case <-stopped:
	case <-time.After(30 * time.Second):
		t.Fatal("the server did not stop after its drain time")
	}
	if took := time.Since(stopping); took < drain {
		t.Fatalf("the server stopped %s after it was asked to, before its drain time", took)
	}
	if _, err := f.tryFrom("", "GET", "/instances", "", f.env.Key.ID, f.env.Key.Secret); err == nil {
		t.Fatal("the stopped server still answers")
	}
}
