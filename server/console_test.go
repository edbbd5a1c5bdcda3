package server_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/oidctest"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
	"github.com/fleetmanager/fm/server/servertest"
	"github.com/nats-io/nats.go/jetstream"
)

func mustURL(t *testing.T, raw string) *url.URL {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// browser is a test's web browser: a cookie jar, and the headers a browser
// sends (Sec-Fetch-Site, Origin) set as each case says.
type browser struct {
	f      *fm
	client *http.Client
	csrf   string
}

func (f *fm) browser() *browser {
	jar, _ := cookiejar.New(nil)
	return &browser{f: f, client: &http.Client{Jar: jar, Timeout: 30 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}}
}

// call sends a request as the console's script does: the session's token
// in X-FM-CSRF (unless csrf is "-"), from FM's own origin unless site says
// otherwise.
func (b *browser) call(method, path, body, csrf, site string) response {
	b.f.t.Helper()
	// The console's own calls as they are; the API's under the tenant.
	url := b.f.env.URL + tenantPath + path
	if strings.HasPrefix(path, "/console/") {
		url = b.f.env.URL + path
	}
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, _ := http.NewRequest(method, url, rd)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if csrf == "" {
		csrf = b.csrf
	}
	if csrf != "-" {
		req.Header.Set("X-FM-CSRF", csrf)
	}
	switch site {
	case "", "same-origin":
		req.Header.Set("Sec-Fetch-Site", "same-origin")
		req.Header.Set("Origin", b.f.env.URL)
	default:
		req.Header.Set("Sec-Fetch-Site", site)
		req.Header.Set("Origin", "https://evil.example")
	}
	resp, err := b.client.Do(req)
	if err != nil {
		b.f.t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	return response{status: resp.StatusCode, body: raw, header: resp.Header}
}

// signIn signs in with k and keeps the session's CSRF token.
func (b *browser) signIn(k key) server.SessionInfo {
	b.f.t.Helper()
	var info server.SessionInfo
	b.f.ok(b.call("POST", server.SessionPath, `{"keyId":"`+k.ID+`","secret":"`+k.Secret+`"}`, "-", ""), &info)
	b.csrf = info.CSRF
	return info
}

// cookie is the browser's session cookie ("" for none).
func (b *browser) cookie() string {
	req, _ := http.NewRequest("GET", b.f.env.URL+"/", nil)
	for _, c := range b.client.Jar.Cookies(req.URL) {
		if c.Name == "fm_session" {
			return c.Value
		}
	}
	return ""
}

func TestConsolePageIsServedWithItsProtections(t *testing.T) {
	f := start(t)
	get := func(method, path string) response {
		req, _ := http.NewRequest(method, f.env.URL+path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return response{status: resp.StatusCode, body: b, header: resp.Header}
	}
	for _, path := range []string{"/", "/console/assets/core.js", "/console/assets/instance.js", "/console/assets/app.css"} {
		r := get("GET", path)
		if r.status != http.StatusOK || len(r.body) == 0 {
			t.Fatalf("GET %s: %d", path, r.status)
		}
		csp := r.header.Get("Content-Security-Policy")
		if !strings.Contains(csp, "frame-ancestors 'none'") || !strings.Contains(csp, "script-src 'self'") || strings.Contains(csp, "unsafe-inline") {
			t.Errorf("GET %s: Content-Security-Policy %q", path, csp)
		}
		if r.header.Get("X-Frame-Options") != "DENY" || r.header.Get("X-Content-Type-Options") != "nosniff" {
			t.Errorf("GET %s: headers %v", path, r.header)
		}
	}
	if r := get("GET", "/console/assets/"); r.status != http.StatusNotFound {
		t.Errorf("the assets' folder is listed: %d %s", r.status, r.body)
	}
	if r := get("POST", "/"); r.status != http.StatusMethodNotAllowed {
		t.Errorf("POST /: %d", r.status)
	}
	// The API is still the API: no page in place of its JSON 404.
	f.failed(get("GET", "/nowhere"), http.StatusNotFound, "NotFound")
}

func TestConsoleSessionNeedsItsTokenForEveryCall(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("web", vn.ID, tpl.ID, im.ID))
	op := f.newKey(server.RoleOperator)

	b := f.browser()
	// A wrong secret starts nothing.
	f.failed(b.call("POST", server.SessionPath, `{"keyId":"`+op.ID+`","secret":"wrong"}`, "-", ""), http.StatusUnauthorized, "Unauthenticated")
	if b.cookie() != "" {
		t.Fatal("a failed sign-in set a cookie")
	}
	// Another site cannot sign anyone in.
	f.failed(b.call("POST", server.SessionPath, `{"keyId":"`+op.ID+`","secret":"`+op.Secret+`"}`, "-", "cross-site"), http.StatusForbidden, "PermissionDenied")

	info := b.signIn(op)
	if info.Role != server.RoleOperator || info.Who != "key:"+op.ID || info.CSRF == "" {
		t.Fatalf("session %+v", info)
	}
	// The cookie as set: a script cannot read it, another site's request
	// does not carry it (plain HTTP here: not Secure; TestConsoleOverTLS).
	signIn := b.call("POST", server.SessionPath, `{"keyId":"`+op.ID+`","secret":"`+op.Secret+`"}`, "-", "")
	f.ok(signIn, &info)
	b.csrf = info.CSRF
	if set := signIn.header.Get("Set-Cookie"); !strings.HasPrefix(set, "fm_session=") || !strings.Contains(set, "; HttpOnly") ||
		!strings.Contains(set, "; SameSite=Strict") || !strings.Contains(set, "; Path=/") || strings.Contains(set, "Secure") {
		t.Fatalf("Set-Cookie: %s", set)
	}
	r := b.call("GET", "/fleet", "", "", "")
	f.ok(r, nil)
	set := ""
	for _, c := range b.client.Jar.Cookies(mustURL(t, f.env.URL)) {
		set += c.Name
	}
	if set != "fm_session" {
		t.Fatalf("cookies %q", set)
	}

	cases := []struct {
		name, method, path, csrf, site string
	}{
		{"no token", "GET", "/fleet", "-", ""},
		{"a wrong token", "GET", "/fleet", "not-the-token", ""},
		// Dataiku's API deletes on GET: an <img> of another site must not.
		{"a GET action without its token", "GET", "/instances/" + in.ID + "/actions/delete", "-", ""},
		{"a change from another site, token and all", "POST", "/instances/" + in.ID + "/snapshots", "", "cross-site"},
		{"sign-out without its token", "DELETE", server.SessionPath, "-", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f.failed(b.call(c.method, c.path, "", c.csrf, c.site), http.StatusForbidden, "PermissionDenied")
		})
	}
	// Nothing changed, and the session still works.
	if r := f.do("GET", "/instances/"+in.ID, ""); r.status != http.StatusOK {
		t.Fatalf("the instance is gone: %d", r.status)
	}
	f.ok(b.call("GET", server.SessionPath, "", "-", ""), nil)

	// What the session does is on the audit trail as its key's.
	// (Refused, as the instance has no machine: audited all the same.)
	var who string
	f.failed(b.call("GET", "/instances/"+in.ID+"/actions/restart-dss", "", "", ""), http.StatusConflict, "FailedPrecondition")
	var trail []protocol.AuditRecord
	f.ok(f.do("GET", "/audit?object=instances&limit=5", ""), &trail)
	for _, rec := range trail {
		if strings.HasSuffix(rec.Action, "/actions/restart-dss") {
			who = rec.Who
		}
	}
	if who != "key:"+op.ID {
		t.Fatalf("the console's call is recorded as %q, want key:%s: %+v", who, op.ID, trail)
	}

	// Sign-out ends the session for good.
	f.ok(b.call("DELETE", server.SessionPath, "", "", ""), nil)
	cookie := b.cookie()
	if cookie != "" {
		t.Fatalf("sign-out left the cookie %q", cookie)
	}
	f.failed(b.call("GET", "/fleet", "", "", ""), http.StatusUnauthorized, "Unauthenticated")
}

func TestConsoleSignInNeverKeepsAPlantedCookie(t *testing.T) {
	f := start(t)
	attacker, victim := f.newKey(server.RoleViewer), f.newKey(server.RoleAdmin)
	a := f.browser()
	a.signIn(attacker)
	planted := a.cookie()

	// The victim's browser carries the attacker's cookie when it signs in.
	v := f.browser()
	v.client.Jar.SetCookies(mustURL(t, f.env.URL), []*http.Cookie{{Name: "fm_session", Value: planted, Path: "/"}})
	info := v.signIn(victim)
	if got := v.cookie(); got == planted || got == "" {
		t.Fatalf("sign-in kept the planted cookie")
	}
	if info.Who != "key:"+victim.ID {
		t.Fatalf("signed in as %s", info.Who)
	}
	// The planted one no longer works for anyone.
	f.failed(a.call("GET", "/fleet", "", "", ""), http.StatusUnauthorized, "Unauthenticated")
	f.ok(v.call("GET", "/api-keys", "", "", ""), nil)
}

func TestConsoleSessionEndsWithItsKeyAndKeepsToItsRole(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("web", vn.ID, tpl.ID, im.ID))
	viewer, op := f.newKey(server.RoleViewer), f.newKey(server.RoleOperator)

	v := f.browser()
	v.signIn(viewer)
	f.ok(v.call("GET", "/instances/"+in.ID, "", "", ""), nil)
	for _, c := range []struct{ method, path, body string }{
		{"POST", "/instances", instanceBody("other", vn.ID, tpl.ID, im.ID)},
		{"GET", "/instances/" + in.ID + "/actions/delete", ""},
		{"PUT", "/instances/" + in.ID, mustJSON(t, in)},
		{"GET", "/api-keys", ""},
	} {
		f.failed(v.call(c.method, c.path, c.body, "", ""), http.StatusForbidden, "PermissionDenied")
	}
	if r := f.do("GET", "/instances/"+in.ID+"/actions/delete", ""); r.status != http.StatusOK {
		t.Fatalf("the viewer's refused delete left the instance undeletable: %d %s", r.status, r.body)
	}

	o := f.browser()
	o.signIn(op)
	f.ok(o.call("GET", "/fleet", "", "", ""), nil)
	f.ok(f.do("DELETE", "/api-keys/"+op.ID, ""), nil)
	f.failed(o.call("GET", "/fleet", "", "", ""), http.StatusUnauthorized, "Unauthenticated")
	f.failed(o.call("GET", server.SessionPath, "", "-", ""), http.StatusUnauthorized, "Unauthenticated")
}

func TestConsoleSessionsAreKeptWithoutTheirCookies(t *testing.T) {
	f := start(t)
	b := f.browser()
	b.signIn(key{ID: f.env.Key.ID, Secret: f.env.Key.Secret})
	cookie := b.cookie()
	kv := sessionsBucket(t, f)
	keys, err := kv.Keys(t.Context())
	if err != nil || len(keys) != 1 {
		t.Fatalf("sessions %v %v", keys, err)
	}
	e, err := kv.Get(t.Context(), keys[0])
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(keys[0], cookie) || strings.Contains(string(e.Value()), cookie) || strings.Contains(string(e.Value()), f.env.Key.Secret) {
		t.Fatalf("the bucket holds the cookie or the key's secret: %s = %s", keys[0], e.Value())
	}
}

// events reads a live stream's events into a channel until the test ends.
func (b *browser) events(t *testing.T, query string) (<-chan [2]string, int) {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	req, _ := http.NewRequestWithContext(ctx, "GET", b.f.env.URL+server.LivePath+query, nil)
	req.Header.Set("Sec-Fetch-Site", "same-origin")
	client := &http.Client{Jar: b.client.Jar}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, resp.StatusCode
	}
	out := make(chan [2]string, 100)
	go func() {
		defer close(out)
		defer resp.Body.Close()
		sc := bufio.NewScanner(resp.Body)
		var event string
		for sc.Scan() {
			line := sc.Text()
			if v, ok := strings.CutPrefix(line, "event: "); ok {
				event = v
			} else if v, ok := strings.CutPrefix(line, "data: "); ok {
				select {
				case out <- [2]string{event, v}:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return out, http.StatusOK
}

func TestConsoleFollowsTheFleetLive(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	viewer := f.newKey(server.RoleViewer)
	b := f.browser()
	b.signIn(viewer)

	if _, status := f.browser().events(t, ""); status != http.StatusUnauthorized {
		t.Fatalf("a stream without a session: %d", status)
	}
	in := f.createInstance(instanceBody("web", vn.ID, tpl.ID, im.ID))
	if _, status := b.events(t, "?logs="+in.ID); status != http.StatusForbidden {
		t.Fatalf("a viewer follows logs: %d", status)
	}
	events, status := b.events(t, "")
	if status != http.StatusOK {
		t.Fatalf("stream: %d", status)
	}
	hello := <-events
	if hello[0] != "hello" || !strings.Contains(hello[1], viewer.ID) {
		t.Fatalf("first event %v", hello)
	}
	if m := f.do("GET", "/metrics", ""); !strings.Contains(string(m.body), "\nfm_console_streams 1\n") {
		t.Fatalf("the open stream is not counted:\n%s", m.body)
	}
	var saved map[string]any
	f.ok(f.do("GET", "/instances/"+in.ID, ""), &saved)
	saved["description"] = "changed"
	f.ok(f.do("PUT", "/instances/"+in.ID, mustJSON(t, saved)), nil)
	deadline := time.After(20 * time.Second)
	for {
		select {
		case ev := <-events:
			t.Logf("event %v", ev)
			var change struct{ Kind, ID string }
			_ = json.Unmarshal([]byte(ev[1]), &change)
			if ev[0] == "change" && change.Kind == "instance" && change.ID == in.ID {
				return
			}
		case <-deadline:
			t.Fatal("no change event for the saved instance")
		}
	}
}

// sessionsBucket is fm_sessions, as the server's connection reaches it.
func sessionsBucket(t *testing.T, f *fm) jetstream.KeyValue {
	t.Helper()
	js, err := jetstream.New(f.env.Conn)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(t.Context(), protocol.BucketSessions)
	if err != nil {
		t.Fatal(err)
	}
	return kv
}

// sessionStored reports, when called, whether b's session is in
// fm_sessions.
func sessionStored(t *testing.T, f *fm, b *browser) func() bool {
	t.Helper()
	kv := sessionsBucket(t, f)
	sum := sha256.Sum256([]byte(b.cookie()))
	return func() bool {
		_, err := kv.Get(t.Context(), hex.EncodeToString(sum[:]))
		if err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
			t.Fatal(err)
		}
		return err == nil
	}
}

// untilCallback starts an SSO sign-in in b and follows it as far as the
// provider's redirect back, which it returns (b then follows redirects).
func untilCallback(t *testing.T, b *browser) string {
	t.Helper()
	b.client.CheckRedirect = func(req *http.Request, _ []*http.Request) error {
		if strings.HasPrefix(req.URL.Path, server.SSOCallbackPath) {
			return http.ErrUseLastResponse
		}
		return nil
	}
	defer func() { b.client.CheckRedirect = nil }()
	resp, err := b.client.Get(b.f.env.URL + server.SSOStartPath)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.Header.Get("Location")
}

func TestConsoleSingleSignOn(t *testing.T) {
	f := start(t)
	idp := oidctest.Run(t)
	idp.ClientID, idp.ClientSecret = "fm", "client-secret"
	settings := func(enabled bool, extra string) {
		f.ok(f.do("PUT", "/iam/sso-settings", fmt.Sprintf(`{"enabled": %t, "protocol": "OPENID",
			"openIDParams": {"clientId": "fm", "clientSecret": "client-secret", "issuer": %q, "claimKeyIdentifier": "email" %s},
			"fmRoleMappings": {"fm-ops": "operator"}}`, enabled, idp.Issuer, extra)), nil)
	}
	// signIn goes through the provider as a browser does, and returns where
	// it ends.
	signIn := func(b *browser) string {
		t.Helper()
		b.client.CheckRedirect = nil
		req, _ := http.NewRequest("GET", f.env.URL+server.SSOStartPath, nil)
		resp, err := b.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.Request.URL.String()
	}
	var enabled struct{ Enabled bool }
	f.ok(f.browser().call("GET", server.SSOPath, "", "-", ""), &enabled)
	if enabled.Enabled {
		t.Fatal("SSO is said to be on before its settings")
	}
	if end := signIn(f.browser()); !strings.Contains(end, "sso-error=") {
		t.Fatalf("SSO off, the sign-in ends at %s", end)
	}
	settings(true, `, "usePKCE": true`)
	idp.SignInAs(map[string]any{"email": "alice@corp.example", "groups": []string{"fm-ops"}})
	b := f.browser()
	if end := signIn(b); strings.Contains(end, "sso-error") || !strings.HasSuffix(end, "/") {
		t.Fatalf("the sign-in ends at %s", end)
	}
	var info server.SessionInfo
	f.ok(b.call("GET", server.SessionPath, "", "-", ""), &info)
	if info.Who != "sso:alice@corp.example" || info.Role != server.RoleOperator {
		t.Fatalf("signed in as %+v", info)
	}
	b.csrf = info.CSRF
	f.ok(b.call("GET", "/fleet", "", "", ""), nil)
	// No longer than the ID token (an hour, oidctest's).
	if info.Expires.After(time.Now().Add(time.Hour + time.Minute)) {
		t.Fatalf("the SSO session lasts until %s, past its token", info.Expires)
	}

	t.Run("a callback replayed", func(t *testing.T) {
		r := f.browser()
		callback := untilCallback(t, r)
		// The sealed cookie, as whoever saw the callback's URL and stole
		// the cookie too would hold it.
		var sealed *http.Cookie
		for _, c := range r.client.Jar.Cookies(mustURL(t, f.env.URL+server.SSOCallbackPath)) {
			if c.Name == "fm_sso_state" {
				sealed = c
			}
		}
		if sealed == nil {
			t.Fatal("no sign-in cookie")
		}
		for i, want := range []string{"/", "#sso-error=stale"} {
			resp, err := r.client.Get(callback)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if end := resp.Request.URL.String(); !strings.HasSuffix(end, want) {
				t.Fatalf("callback %d ends at %s, want …%s", i+1, end, want)
			}
		}
		// With the cookie put back: the provider redeems a code once.
		thief := f.browser()
		thief.client.Jar.SetCookies(mustURL(t, f.env.URL+server.SSOCallbackPath), []*http.Cookie{{Name: sealed.Name, Value: sealed.Value, Path: server.SSOCallbackPath}})
		resp, err := thief.client.Get(callback)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if to := resp.Header.Get("Location"); !strings.HasSuffix(to, "#sso-error=refused") || thief.cookie() != "" {
			t.Fatalf("a replay with the cookie goes to %q", to)
		}
	})
	t.Run("a session ends with its token", func(t *testing.T) {
		idp.SignInAs(map[string]any{"email": "alice@corp.example", "groups": []string{"fm-ops"}, "exp": time.Now().Add(2 * time.Second).Unix()})
		defer idp.SignInAs(map[string]any{"email": "alice@corp.example", "groups": []string{"fm-ops"}})
		short := f.browser()
		signIn(short)
		var si server.SessionInfo
		f.ok(short.call("GET", server.SessionPath, "", "-", ""), &si)
		short.csrf = si.CSRF
		f.ok(short.call("GET", "/fleet", "", "", ""), nil)
		deadline := time.Now().Add(10 * time.Second)
		for short.call("GET", "/fleet", "", "", "").status != http.StatusUnauthorized {
			if time.Now().After(deadline) {
				t.Fatal("the session outlived its ID token")
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
	t.Run("a callback of another browser's sign-in", func(t *testing.T) {
		// The attacker starts a sign-in, and sends the victim the link
		// back with their own code: the victim's browser has no state
		// cookie for it.
		callback := untilCallback(t, f.browser())
		if !strings.Contains(callback, "code=") {
			t.Fatalf("no code: %s", callback)
		}
		v := f.browser()
		if end := func() string {
			v.client.CheckRedirect = nil
			resp, err := v.client.Get(callback)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			return resp.Request.URL.String()
		}(); !strings.Contains(end, "sso-error") {
			t.Fatalf("the planted callback signed the victim in: %s", end)
		}
		if v.cookie() != "" {
			t.Fatal("the planted callback set a session cookie")
		}
	})
	t.Run("a token of another sign-in", func(t *testing.T) {
		idp.SignInAs(map[string]any{"email": "alice@corp.example", "groups": []string{"fm-ops"}, "nonce": "another"})
		defer idp.SignInAs(map[string]any{"email": "alice@corp.example", "groups": []string{"fm-ops"}})
		if end := signIn(f.browser()); !strings.Contains(end, "sso-error") {
			t.Fatalf("a token with another nonce signed in: %s", end)
		}
	})
	t.Run("a user with no role", func(t *testing.T) {
		idp.SignInAs(map[string]any{"email": "carol@corp.example", "groups": []string{"staff"}})
		defer idp.SignInAs(map[string]any{"email": "alice@corp.example", "groups": []string{"fm-ops"}})
		if end := signIn(f.browser()); !strings.HasSuffix(end, "#sso-error=no-role") {
			t.Fatalf("carol: %s", end)
		}
	})
	t.Run("a wrong client secret", func(t *testing.T) {
		idp.ClientSecret = "rotated"
		defer func() { idp.ClientSecret = "client-secret" }()
		if end := signIn(f.browser()); !strings.Contains(end, "sso-error") {
			t.Fatalf("signed in with a wrong client secret: %s", end)
		}
	})
	t.Run("the user cancels", func(t *testing.T) {
		idp.SignInAs(nil)
		defer idp.SignInAs(map[string]any{"email": "alice@corp.example", "groups": []string{"fm-ops"}})
		if end := signIn(f.browser()); !strings.HasSuffix(end, "#sso-error=denied") {
			t.Fatalf("a refusal: %s", end)
		}
	})
	// Turning SSO off ends the sessions it started, and turning it on
	// again does not bring them back (signed out meanwhile or not).
	signedOut := f.browser()
	signIn(signedOut)
	var so server.SessionInfo
	f.ok(signedOut.call("GET", server.SessionPath, "", "-", ""), &so)
	signedOut.csrf = so.CSRF
	settings(false, "")
	f.failed(b.call("GET", "/fleet", "", "", ""), http.StatusUnauthorized, "Unauthenticated")
	stored := sessionStored(t, f, signedOut)
	if !stored() {
		t.Fatal("the session is not in fm_sessions")
	}
	f.ok(signedOut.call("DELETE", server.SessionPath, "", "", ""), nil)
	if stored() {
		t.Fatal("the refused session's sign-out left it in fm_sessions")
	}
	settings(true, "")
	f.failed(b.call("GET", "/fleet", "", "", ""), http.StatusUnauthorized, "Unauthenticated")
	f.failed(signedOut.call("GET", "/fleet", "", "", ""), http.StatusUnauthorized, "Unauthenticated")
	// A change of the settings (here, the role mappings) ends them too.
	fresh := f.browser()
	signIn(fresh)
	f.ok(fresh.call("GET", server.SessionPath, "", "-", ""), &so)
	fresh.csrf = so.CSRF
	f.ok(fresh.call("GET", "/fleet", "", "", ""), nil)
	settings(true, `, "usePKCE": false`)
	f.failed(fresh.call("GET", "/fleet", "", "", ""), http.StatusUnauthorized, "Unauthenticated")
}

func TestConsoleOverTLS(t *testing.T) {
	// Behind a load balancer that ends TLS: the console's URL says https.
	f := start(t, servertest.WithConfig(func(c *server.Config) { c.ConsoleURL = "https://fm.example.com/" }))
	r := f.browser().call("POST", server.SessionPath, `{"keyId":"`+f.env.Key.ID+`","secret":"`+f.env.Key.Secret+`"}`, "-", "")
	f.ok(r, nil)
	// __Host-: only this host may set it, over TLS, for the whole site.
	if set := r.header.Get("Set-Cookie"); !strings.HasPrefix(set, "__Host-fm_session=") || !strings.Contains(set, "; Secure") ||
		!strings.Contains(set, "; HttpOnly") || !strings.Contains(set, "; Path=/") || strings.Contains(set, "Domain=") {
		t.Fatalf("Set-Cookie: %s", set)
	}
	// A plain fm_session cookie (tossed by a sibling host) is no session.
	req, _ := http.NewRequest("GET", f.env.URL+server.SessionPath, nil)
	req.Header.Set("Cookie", "fm_session="+strings.TrimPrefix(strings.SplitN(r.header.Get("Set-Cookie"), ";", 2)[0], "__Host-fm_session="))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("the session under the plain name: %d", resp.StatusCode)
	}
	// Under its own name it is the session (the proxy ended TLS).
	req.Header.Set("Cookie", strings.SplitN(r.header.Get("Set-Cookie"), ";", 2)[0])
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("the session under __Host-fm_session: %d", resp.StatusCode)
	}
	// The SSO callback is made from the console's URL, not the request's host.
	idp := oidctest.Run(t)
	f.ok(f.do("PUT", "/iam/sso-settings", fmt.Sprintf(`{"enabled": true, "protocol": "OPENID", "fmDefaultRole": "viewer",
		"openIDParams": {"clientId": "fm", "clientSecret": "s", "issuer": %q}}`, idp.Issuer)), nil)
	b := f.browser()
	start := b.call("GET", server.SSOStartPath, "", "-", "")
	loc, _ := url.Parse(start.header.Get("Location"))
	if start.status != http.StatusFound || loc.Query().Get("redirect_uri") != "https://fm.example.com/console/sso/callback" {
		t.Fatalf("SSO start: %d %s", start.status, start.header.Get("Location"))
	}
	if set := start.header.Get("Set-Cookie"); !strings.HasPrefix(set, "__Host-fm_sso_state=") || !strings.Contains(set, "; Secure") ||
		!strings.Contains(set, "SameSite=Lax") || !strings.Contains(set, "; Path=/;") {
		t.Fatalf("the sign-in's cookie: %s", set)
	}
	for _, bad := range []struct {
		url string
		tls bool
	}{{"ftp://fm.example.com", false}, {"https://", false}, {"https://fm.example.com/console", false}, {"fm.example.com", false},
		{"http://fm.example.com", true}} {
		cfg := server.Config{Conn: f.env.Conn, ConsoleURL: bad.url}
		if bad.tls {
			cfg.TLS = &tls.Config{}
		}
		if _, err := server.New(cfg); err == nil || !strings.Contains(err.Error(), "console") {
			t.Errorf("ConsoleURL %q (TLS %t): %v", bad.url, bad.tls, err)
		}
	}
}

func TestConsoleLiveStreamsEnd(t *testing.T) {
	f := start(t, servertest.WithConfig(func(c *server.Config) { c.ConsoleKeepAlive = 200 * time.Millisecond }))
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("web", vn.ID, tpl.ID, im.ID))
	op := f.newKey(server.RoleOperator)
	b := f.browser()
	b.signIn(op)
	// Another site's page cannot open one.
	req, _ := http.NewRequest("GET", f.env.URL+server.LivePath, nil)
	req.Header.Set("Sec-Fetch-Site", "cross-site")
	resp, err := b.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("a cross-site stream: %d", resp.StatusCode)
	}
	// An instance's log lines are told to an operator following them.
	logs, status := b.events(t, "?logs="+in.ID)
	if status != http.StatusOK {
		t.Fatalf("logs stream: %d", status)
	}
	<-logs // hello
	if err := f.env.Conn.Publish(protocol.LogSubject(in.ID, "agent"), []byte("a line")); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, logs, "change", `"kind":"log","id":"`+in.ID+`"`)
	// At most 10 streams a session; the 11th is refused, another
	// session's is not.
	for range 9 {
		if _, status := b.events(t, ""); status != http.StatusOK {
			t.Fatalf("stream: %d", status)
		}
	}
	if _, status := b.events(t, ""); status != http.StatusServiceUnavailable {
		t.Fatalf("an 11th stream of one session: %d", status)
	}
	// Another session of the same key gets 10 more, and no 21st.
	b2 := f.browser()
	b2.signIn(op)
	for range 10 {
		if _, status := b2.events(t, ""); status != http.StatusOK {
			t.Fatalf("stream: %d", status)
		}
	}
	b3 := f.browser()
	b3.signIn(op)
	if _, status := b3.events(t, ""); status != http.StatusServiceUnavailable {
		t.Fatalf("a 21st stream of one key: %d", status)
	}
	other := f.browser()
	other.signIn(key{ID: f.env.Key.ID, Secret: f.env.Key.Secret})
	otherEvents, status := other.events(t, "")
	if status != http.StatusOK {
		t.Fatalf("another session's stream: %d", status)
	}
	// A revoked key ends its streams, saying so.
	f.ok(f.do("DELETE", "/api-keys/"+op.ID, ""), nil)
	waitEvent(t, logs, "ended", "sign in again")
	// The server's stop ends the others.
	<-otherEvents // hello
	f.env.Stop()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case _, open := <-otherEvents:
			if !open {
				return
			}
		case <-deadline:
			t.Fatal("a stream outlived its server")
		}
	}
}

// waitEvent waits for an event whose data holds want.
func waitEvent(t *testing.T, events <-chan [2]string, name, want string) {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		select {
		case ev, open := <-events:
			if !open {
				t.Fatalf("the stream ended before %s %s", name, want)
			}
			if ev[0] == name && strings.Contains(ev[1], want) {
				return
			}
		case <-deadline:
			t.Fatalf("no %s event with %s", name, want)
		}
	}
}

func TestConsoleSignInsArePaced(t *testing.T) {
	f := start(t)
	k := f.newKey(server.RoleViewer)
	b := f.browser()
	for i := range 10 {
		if r := b.call("POST", server.SessionPath, `{"keyId":"`+k.ID+`","secret":"`+k.Secret+`"}`, "-", ""); r.status != http.StatusOK {
			t.Fatalf("sign-in %d: %d %s", i+1, r.status, r.body)
		}
	}
	f.failed(b.call("POST", server.SessionPath, `{"keyId":"`+k.ID+`","secret":"`+k.Secret+`"}`, "-", ""), http.StatusTooManyRequests, "ResourceExhausted")
	// Another key is not held back.
	b.signIn(key{ID: f.env.Key.ID, Secret: f.env.Key.Secret})
}
