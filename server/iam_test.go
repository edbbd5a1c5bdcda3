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

	"github.com/fleetmanager/fm/internal/oidctest"
	"github.com/fleetmanager/fm/protocol"
)

// TestIAMSettings: the three IAM settings are kept as they were saved, every
// key included, their secret sealed and never shown (a save without it
// keeps it); bad input is refused and changes nothing; only admins read or
// change them.
func TestIAMSettings(t *testing.T) {
	f := start(t)
	var sso map[string]any
	f.ok(f.do("GET", "/iam/sso-settings", ""), &sso)
	if sso["enabled"] != false || sso["openIDParams"] == nil || sso["samlSPParams"] == nil {
		t.Fatalf("defaults: %v", sso)
	}
	body := `{"enabled": true, "protocol": "OPENID", "remappingRules": [{"ruleFrom": "(.*)@corp", "ruleTo": "$1"}],
		"openIDParams": {"clientId": "fm", "clientSecret": "oidc-s3cret", "issuer": "https://idp.example.com", "scope": "openid groups",
		"tokenEndpointAuthMethod": "CLIENT_SECRET_BASIC", "claimKeyGroups": "groups"}, "samlSPParams": {}, "someFutureKey": [1, 2]}`
	f.ok(f.do("PUT", "/iam/sso-settings", body), &sso)
	f.ok(f.do("GET", "/iam/sso-settings", ""), &sso)
	oidc := sso["openIDParams"].(map[string]any)
	if _, shown := oidc["clientSecret"]; shown || oidc["clientId"] != "fm" || sso["someFutureKey"] == nil {
		t.Fatalf("saved: %v", sso)
	}
	js := f.env.Bus.JetStream(t)
	kv, err := js.KeyValue(context.Background(), protocol.BucketSettings)
	if err != nil {
		t.Fatal(err)
	}
	sealedSecret := func() string {
		t.Helper()
		e, err := kv.Get(context.Background(), "main.iam.sso")
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(e.Value()), "oidc-s3cret") {
			t.Fatalf("the secret is in clear in fm_settings: %s", e.Value())
		}
		var doc struct{ IAMSecret string }
		_ = json.Unmarshal(e.Value(), &doc)
		return doc.IAMSecret
	}
	first := sealedSecret()
	if !strings.HasPrefix(first, "fmsealed") {
		t.Fatalf("the secret is not kept sealed: %q", first)
	}
	if sso["fmSecretSet"] != true {
		t.Fatalf("the setting does not say its secret is kept: %v", sso)
	}
	// The client's save: what it read, with a change, and no secret.
	sso["enabled"] = false
	echo, _ := json.Marshal(sso)
	f.ok(f.do("PUT", "/iam/sso-settings", string(echo)), nil)
	if sealedSecret() == "" {
		t.Fatal("a save without the secret dropped it")
	}
	// null clears it.
	oidc["clientSecret"] = nil
	echo, _ = json.Marshal(sso)
	f.ok(f.do("PUT", "/iam/sso-settings", string(echo)), &sso)
	if sealedSecret() != "" || sso["fmSecretSet"] != false {
		t.Fatalf("a null secret was not cleared: %v", sso)
	}
	sso["openIDParams"].(map[string]any)["clientSecret"] = "oidc-s3cret"
	echo, _ = json.Marshal(sso)
	f.ok(f.do("PUT", "/iam/sso-settings", string(echo)), nil)

	for _, tc := range []struct{ name, path, body, field string }{
		{"an unknown protocol", "/iam/sso-settings", `{"protocol": "KERBEROS"}`, "protocol"},
		{"enabled as text", "/iam/sso-settings", `{"enabled": "yes"}`, "enabled"},
		{"OpenID without a client", "/iam/sso-settings", `{"enabled": true, "protocol": "OPENID", "openIDParams": {"issuer": "https://idp.example.com"}}`, "clientId"},
		{"an issuer that is no URL", "/iam/sso-settings", `{"openIDParams": {"issuer": "idp"}}`, "issuer"},
		{"a rule without its target", "/iam/sso-settings", `{"remappingRules": [{"ruleFrom": "x"}]}`, "remappingRules"},
		{"a role that does not exist", "/iam/sso-settings", `{"fmRoleMappings": {"ops": "root"}}`, "fmRoleMappings"},
		{"an LDAP URL that is not LDAP", "/iam/ldap-settings", `{"enabled": true, "url": "http://ldap.example.com"}`, "url"},
		{"LDAP on without a URL", "/iam/ldap-settings", `{"enabled": true}`, "url"},
		{"a secret that is not text", "/iam/ldap-settings", `{"bindPassword": 42}`, "bindPassword"},
		{"a negative group limit", "/iam/azure-ad-settings", `{"groupsLimit": -1}`, "groupsLimit"},
		{"not an object", "/iam/azure-ad-settings", `[1]`, "map"},
		{"a known key spelt otherwise", "/iam/sso-settings", `{"openIDParams": {"issuer": "https://idp.example.com", "ISSUER": "junk"}}`, "ISSUER"},
		{"a secret spelt otherwise", "/iam/ldap-settings", `{"BindPassword": "in clear"}`, "BindPassword"},
		{"a rule that does not compile", "/iam/sso-settings", `{"remappingRules": [{"ruleFrom": "(?<=x)y", "ruleTo": "z"}]}`, "ruleFrom"},
		{"a secret too long", "/iam/azure-ad-settings", `{"credentialsClientSecret": "` + strings.Repeat("x", 5000) + `"}`, "credentialsClientSecret"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var before, after map[string]any
			f.ok(f.do("GET", tc.path, ""), &before)
			e := f.failed(f.do("PUT", tc.path, tc.body), 400, "InvalidArgument")
			if !strings.Contains(e.DetailedMessage, tc.field) {
				t.Fatalf("the error does not name %s: %s", tc.field, e.DetailedMessage)
			}
			f.ok(f.do("GET", tc.path, ""), &after)
			if b, a := mustJSON(t, before), mustJSON(t, after); a != b {
				t.Fatalf("a refused save changed the setting: %s -> %s", b, a)
			}
			if tc.path == "/iam/sso-settings" && sealedSecret() == "" {
				t.Fatal("a refused save dropped the secret")
			}
		})
	}

	var ldap map[string]any
	f.ok(f.do("PUT", "/iam/ldap-settings", `{"enabled": true, "url": "ldaps://ldap.example.com:636", "bindDN": "cn=fm", "bindPassword": "ldap-pw"}`), &ldap)
	if _, shown := ldap["bindPassword"]; shown || ldap["url"] != "ldaps://ldap.example.com:636" {
		t.Fatalf("LDAP saved: %v", ldap)
	}
	for _, role := range []string{"viewer", "operator"} {
		k := f.newKey(role)
		for _, p := range []string{"/iam/sso-settings", "/iam/ldap-settings", "/iam/azure-ad-settings"} {
			if r := f.doAs("GET", p, "", k.ID, k.Secret); r.status != http.StatusForbidden {
				t.Errorf("%s GET %s: %d", role, p, r.status)
			}
			if r := f.doAs("PUT", p, `{"enabled": false}`, k.ID, k.Secret); r.status != http.StatusForbidden {
				t.Errorf("%s PUT %s: %d", role, p, r.status)
			}
		}
	}
}

// TestSSOBearerTokens: with OpenID sign-in on, a person's ID token from the
// settings' issuer, for their client, authenticates a call; their role is
// the highest their groups map to, their name the remapped identifier; a
// token forged, expired, for another client or of a user with no role is
// refused, as is any token while sign-in is off.
func TestSSOBearerTokens(t *testing.T) {
	f := start(t)
	idp, other := oidctest.Run(t), oidctest.Run(t)
	// Each call from an address of its own (127.0.0.N): failed attempts
	// count per address.
	calls := 0
	bearerFrom := func(src, method, path, token string) response {
		t.Helper()
		req, _ := http.NewRequest(method, f.env.URL+tenantPath+path, nil)
		req.Header.Set("Authorization", "Bearer "+token)
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 10 * time.Second}
		client := &http.Client{Transport: &http.Transport{DialContext: d.DialContext, DisableKeepAlives: true}}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return response{status: resp.StatusCode, body: b, header: resp.Header}
	}
	bearer := func(method, path, token string) response {
		t.Helper()
		calls++
		return bearerFrom(fmt.Sprintf("127.0.0.%d", 2+calls%200), method, path, token)
	}
	alice := idp.Token(t, "fm", map[string]any{"sub": "u-1", "email": "Alice@Corp.example", "groups": []string{"staff", "fm-ops"}})
	if r := bearer("GET", "/instances", alice); r.status != 401 || !strings.Contains(string(r.body), "not enabled") {
		t.Fatalf("a token while sign-in is off: %d %s", r.status, r.body)
	}
	f.ok(f.do("PUT", "/iam/sso-settings", `{"enabled": true, "protocol": "OPENID",
		"remappingRules": [{"ruleFrom": "(.*)@corp\\.example", "ruleTo": "$1"}],
		"openIDParams": {"clientId": "fm", "clientSecret": "s", "issuer": "`+idp.Issuer+`", "claimKeyIdentifier": "email", "lowercaseIdentifier": true},
		"fmRoleMappings": {"fm-ops": "operator", "fm-admins": "admin"}}`), nil)

	if r := bearer("GET", "/instances", alice); r.status != 200 {
		t.Fatalf("alice lists instances: %d %s", r.status, r.body)
	}
	// An operator, not an admin.
	if r := bearer("POST", "/virtual-networks", alice); r.status != 403 {
		t.Fatalf("alice creates a network: %d %s", r.status, r.body)
	}
	vn, tpl, im := f.fleet()
	// The audit trail names her as her remapped, lower-cased identifier.
	req, _ := http.NewRequest("POST", f.env.URL+tenantPath+"/instances", strings.NewReader(instanceBody("by-alice", vn.ID, tpl.ID, im.ID)))
	req.Header.Set("Authorization", "Bearer "+alice)
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("alice's create: %v %v", resp, err)
	}
	resp.Body.Close()
	var audit []struct{ Who, Action string }
	f.ok(f.do("GET", "/audit?limit=1000", ""), &audit)
	if raw := mustJSON(t, audit); !strings.Contains(raw, `"Who":"sso:alice"`) {
		t.Fatalf("the audit trail does not name sso:alice: %s", raw)
	}

	for _, tc := range []struct {
		name, token string
		status      int
	}{
		{"forged", idp.Forged(t, "fm", map[string]any{"email": "mallory@corp.example", "groups": []string{"fm-admins"}}), 401},
		{"expired", idp.Token(t, "fm", map[string]any{"email": "bob@corp.example", "groups": []string{"fm-ops"}, "exp": time.Now().Add(-time.Minute).Unix()}), 401},
		{"for another client", idp.Token(t, "other-app", map[string]any{"email": "bob@corp.example", "groups": []string{"fm-ops"}}), 401},
		{"no role", idp.Token(t, "fm", map[string]any{"email": "carol@corp.example", "groups": []string{"staff"}}), 403},
		{"not a token", "not-a-jwt", 401},
		{"from another issuer", other.Token(t, "fm", map[string]any{"email": "bob@corp.example", "groups": []string{"fm-ops"}}), 401},
		{"for several audiences, given to another", idp.Token(t, "fm", map[string]any{"aud": []string{"fm", "other-app"}, "azp": "other-app",
			"email": "bob@corp.example", "groups": []string{"fm-ops"}}), 401},
		{"issued long ago", idp.Token(t, "fm", map[string]any{"iat": time.Now().Add(-13 * time.Hour).Unix(), "email": "bob@corp.example", "groups": []string{"fm-ops"}}), 401},
		{"an e-mail not verified", idp.Token(t, "fm", map[string]any{"email": "eve@corp.example", "email_verified": false, "groups": []string{"fm-ops"}}), 401},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := bearer("GET", "/instances", tc.token)
			if r.status != tc.status {
				t.Fatalf("%d %s, want %d", r.status, r.body, tc.status)
			}
			if strings.Contains(string(r.body), `"s"`) || strings.Contains(string(r.body), "oidc") {
				t.Fatalf("the refusal says too much: %s", r.body)
			}
		})
	}
	// A valid token with several audiences, given to FM, is taken.
	if r := bearer("GET", "/instances", idp.Token(t, "fm", map[string]any{"aud": []string{"fm", "other-app"}, "azp": "fm",
		"email": "bob@corp.example", "groups": []string{"fm-ops"}})); r.status != 200 {
		t.Fatalf("a token given to FM among several audiences: %d %s", r.status, r.body)
	}
	// Only the authorized groups sign in, when the settings name them.
	var cur map[string]any
	f.ok(f.do("GET", "/iam/sso-settings", ""), &cur)
	cur["authorizedGroups"] = []string{"fm-admins"}
	b, _ := json.Marshal(cur)
	f.ok(f.do("PUT", "/iam/sso-settings", string(b)), nil)
	if r := bearer("GET", "/instances", alice); r.status != 403 || !strings.Contains(string(r.body), "authorizedGroups") {
		t.Fatalf("alice, not in the authorized groups: %d %s", r.status, r.body)
	}
	// Bad tokens count against their address as wrong keys do.
	for range 10 {
		bearerFrom("127.0.0.250", "GET", "/instances", "not-a-jwt")
	}
	if r := bearerFrom("127.0.0.250", "GET", "/instances", alice); r.status != 429 {
		t.Fatalf("after ten bad tokens from one address: %d %s", r.status, r.body)
	}
	// An admin by group; sign-in turned off refuses tokens again.
	admin := idp.Token(t, "fm", map[string]any{"email": "dave@corp.example", "groups": "fm-admins"})
	if r := bearer("GET", "/api-keys", admin); r.status != 200 {
		t.Fatalf("an admin by group: %d %s", r.status, r.body)
	}
	// The keys at a URL of their own (no discovery); then another issuer:
	// the first one's tokens are refused.
	f.ok(f.do("PUT", "/iam/sso-settings", `{"enabled": true, "protocol": "OPENID", "fmDefaultRole": "viewer",
		"openIDParams": {"clientId": "fm", "issuer": "`+idp.Issuer+`", "jwksUri": "`+idp.Issuer+`/jwks"}}`), nil)
	if r := bearer("GET", "/instances", idp.Token(t, "fm", map[string]any{"sub": "frank"})); r.status != 200 {
		t.Fatalf("keys at jwksUri: %d %s", r.status, r.body)
	}
	f.ok(f.do("PUT", "/iam/sso-settings", `{"enabled": true, "protocol": "OPENID", "fmDefaultRole": "viewer",
		"openIDParams": {"clientId": "fm", "issuer": "`+other.Issuer+`"}}`), nil)
	if r := bearer("GET", "/instances", idp.Token(t, "fm", map[string]any{"sub": "frank"})); r.status != 401 {
		t.Fatalf("a token of the issuer before: %d %s", r.status, r.body)
	}
	if r := bearer("GET", "/instances", other.Token(t, "fm", map[string]any{"sub": "frank"})); r.status != 200 {
		t.Fatalf("a token of the issuer now: %d %s", r.status, r.body)
	}
	f.ok(f.do("PUT", "/iam/sso-settings", `{"enabled": false, "protocol": "OPENID", "openIDParams": {"clientId": "fm", "issuer": "`+idp.Issuer+`"}}`), nil)
	if r := bearer("GET", "/instances", admin); r.status != 401 {
		t.Fatalf("a token after sign-in was turned off: %d %s", r.status, r.body)
	}
}
