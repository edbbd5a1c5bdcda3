package api

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

// TestCloudAccountKeys: cloudAccountKeys names every JSON key of
// CloudAccount's fields (Meta's included), so that none is taken for an
// unknown one.
func TestCloudAccountKeys(t *testing.T) {
	want := map[string]bool{}
	var walk func(reflect.Type)
	walk = func(typ reflect.Type) {
		for i := range typ.NumField() {
			f := typ.Field(i)
			if f.Anonymous {
				walk(f.Type)
				continue
			}
			if name, _, _ := strings.Cut(f.Tag.Get("json"), ","); name != "-" && name != "" {
				want[strings.ToLower(name)] = true
			}
		}
	}
	walk(reflect.TypeOf(CloudAccount{}))
	if !reflect.DeepEqual(want, cloudAccountKeys) {
		t.Fatalf("cloudAccountKeys %v, the struct's %v", cloudAccountKeys, want)
	}
}

// TestCloudAccountKeepsWhatItDoesNotKnow: keys FM does not know come back
// as they were, other clouds' secrets are dropped, and known fields are
// the struct's.
func TestCloudAccountKeepsWhatItDoesNotKnow(t *testing.T) {
	in := `{"id":"ca-1","label":"prod","awsAuthenticationMode":"IAM_ROLE","nbNetworks":3,` +
		`"azureTenantId":"t-1","someFutureField":{"a":[1,2]},"azureSecret":"s3cret","gcpServiceAccountKey":"k"}`
	var a CloudAccount
	if err := json.Unmarshal([]byte(in), &a); err != nil {
		t.Fatal(err)
	}
	if a.ID != "ca-1" || a.AWSAuthenticationMode != "IAM_ROLE" || a.NbNetworks != 3 || len(a.Extra) != 2 {
		t.Fatalf("decoded %+v", a)
	}
	out, err := json.Marshal(a)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"azureTenantId":"t-1"`, `"someFutureField":{"a":[1,2]}`, `"label":"prod"`} {
		if !strings.Contains(string(out), want) {
			t.Errorf("%s lacks %s", out, want)
		}
	}
	if strings.Contains(string(out), "s3cret") || strings.Contains(string(out), "gcpServiceAccountKey") {
		t.Errorf("another cloud's secret was kept: %s", out)
	}
	// An Extra key cannot shadow a field, in any case, set or omitted.
	a.Extra["label"] = json.RawMessage(`"forged"`)
	a.Extra["AWSExternalID"] = json.RawMessage(`"forged"`)
	out, _ = json.Marshal(a)
	if !strings.Contains(string(out), `"label":"prod"`) || strings.Contains(string(out), "forged") {
		t.Errorf("an extra key replaced a field: %s", out)
	}
	// A field's key in another case fills the field (as Go's decoder
	// does) and is not kept beside it: no secret in clear, no second
	// value to win when read back.
	var b CloudAccount
	if err := json.Unmarshal([]byte(`{"label":"k","awssecretaccesskey":"wJal","AWSEXTERNALID":"victim","Deleting":true,"AzureSecret":"s"}`), &b); err != nil {
		t.Fatal(err)
	}
	if len(b.Extra) != 0 {
		t.Fatalf("case variants kept in Extra: %v", b.Extra)
	}
	b.AWSSecretAccessKey = ""
	if out, _ := json.Marshal(b); strings.Contains(string(out), "wJal") || strings.Contains(strings.ToLower(string(out)), "azuresecret") {
		t.Fatalf("a case variant came back out: %s", out)
	}
}
