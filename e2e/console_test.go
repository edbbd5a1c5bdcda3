package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/chromedp"
	"github.com/fleetmanager/fm/console/consoletest"
	"github.com/fleetmanager/fm/internal/oidctest"
)

// console drives the web console in a browser the way a person does: by
// the labels and texts on the page.
type console struct {
	*consoletest.Browser
	t   *testing.T
	url string
	// pasted counts the values typeInto had to set for lost keys.
	pasted int
}

func (c *console) open(hash string) {
	c.t.Helper()
	_ = consoletest.Eval[any](c.Browser, `(() => { if (location.hash === `+consoletest.JSString(hash)+`) window.dispatchEvent(new HashChangeEvent('hashchange')); else location.hash = `+consoletest.JSString(hash)+`; })()`)
	c.WaitJS("page "+hash+" shown", `document.querySelector('main').dataset.route === `+consoletest.JSString(hash), 30*time.Second)
}

// control is the JavaScript of the control whose label says label (within
// scope, a CSS selector).
func control(scope, label string) string {
	return fmt.Sprintf(`(() => { const l = [...document.querySelectorAll(%s + ' label')].find((x) => x.textContent.trim() === %s); return l && document.getElementById(l.htmlFor); })()`,
		consoletest.JSString(scope), consoletest.JSString(label))
}

// typeInto types text into the control labelled label, as keys, and checks
// the control then holds it. Under load, Chromium was seen to lose every key
// event sent to the tab after a sign-out: the control focused, no keydown
// reaching the document (a capturing listener saw none), mouse clicks
// still working. Only then, when not one keydown arrived, are the keys
// typed again after bringing the tab to the front, and if they are lost
// again the value is set as a paste would set it (an input event), at most
// twice a test and said in its log. Keys that arrived but did not make the
// value, and a control disabled, read-only or not focused, fail the test.
func (c *console) typeInto(scope, label, text string) {
	c.t.Helper()
	id := consoletest.Eval[string](c.Browser, control(scope, label)+`.id`)
	el := `document.getElementById(` + consoletest.JSString(id) + `)`
	before := consoletest.Eval[string](c.Browser, el+`.value`)
	for try := 1; ; try++ {
		_ = consoletest.Eval[any](c.Browser, `(() => { if (!window.__fmKeyWatch) { window.__fmKeyWatch = true; document.addEventListener('keydown', () => { window.__fmKeydowns++; }, true); } window.__fmKeydowns = 0; })()`)
		if try < 3 {
			c.Do(30*time.Second, chromedp.SendKeys(chromedp.ID(id), text))
		} else {
			c.pasted++
			if c.pasted > 2 {
				c.t.Fatalf("%s: the tab lost the keys typed a third time this test", label)
			}
			_ = consoletest.Eval[any](c.Browser, `(() => { const e = `+el+`; e.value = `+consoletest.JSString(before+text)+`; e.dispatchEvent(new Event('input', { bubbles: true })); })()`)
		}
		st := consoletest.Eval[struct {
			Value                       string
			Keydowns                    int
			Focused, Disabled, ReadOnly bool
		}](c.Browser, `(() => { const e = `+el+`; return {value: e.value, keydowns: window.__fmKeydowns, focused: document.activeElement === e, disabled: e.disabled, readOnly: e.readOnly}; })()`)
		switch {
		case st.Value == before+text:
			return
		case st.Disabled || st.ReadOnly || !st.Focused:
			c.t.Fatalf("%s: typed into a control disabled (%v), read-only (%v) or not focused (focused: %v)", label, st.Disabled, st.ReadOnly, st.Focused)
		case st.Keydowns > 0 || try == 3:
			c.t.Fatalf("%s: %d keys arrived, and the control holds %q, not %q", label, st.Keydowns, st.Value, before+text)
		}
		c.t.Logf("%s: not one of the %d keys typed reached the page: typing again", label, len(text))
		if try == 1 {
			ctx, cancel := context.WithTimeout(c.Context(), 10*time.Second)
			_, err := chromedp.Call(ctx, page.BringToFront, cdp.Empty{})
			cancel()
			if err != nil {
				c.t.Fatalf("bring the tab to the front: %v", err)
			}
		}
	}
}

// choose picks value in the select labelled label.
func (c *console) choose(scope, label, value string) {
	c.t.Helper()
	got := consoletest.Eval[string](c.Browser, fmt.Sprintf(`(() => { const s = %s; s.value = %s; s.dispatchEvent(new Event('change')); return s.value; })()`,
		control(scope, label), consoletest.JSString(value)))
	if got != value {
		c.t.Fatalf("%s: no choice %q", label, value)
	}
}

// click clicks the first button whose text is text (within scope, XPath).
func (c *console) click(scope, text string) {
	c.t.Helper()
	c.Do(30*time.Second, chromedp.Click(chromedp.Search(fmt.Sprintf(`%s//button[normalize-space()=%s]`, scope, consoletest.JSString(text)))))
}

// confirm checks the confirmation's text says want, and confirms.
func (c *console) confirm(want ...string) {
	c.t.Helper()
	c.WaitJS("the confirmation opens", `document.querySelector('#confirm').open`, 10*time.Second)
	body := consoletest.Eval[string](c.Browser, `document.querySelector('#confirm-body').innerText`)
	for _, w := range want {
		if !strings.Contains(body, w) {
			c.t.Fatalf("the confirmation says %q, not %q", body, w)
		}
	}
	c.Do(10*time.Second, chromedp.Click(chromedp.CSS("#confirm-ok")))
}

func (c *console) signIn(id, secret string) {
	c.t.Helper()
	c.WaitJS("the sign-in form", `document.querySelector('#signin-title')`, 30*time.Second)
	c.typeInto("main", "API key id", id)
	c.typeInto("main", "Secret", secret)
	c.click("//main", "Sign in")
	c.WaitJS("signed in", `!document.querySelector('#who').hidden && document.querySelector('main h1') && !document.querySelector('main').innerText.startsWith('Loading')`, 30*time.Second)
}

func (c *console) signOut() {
	c.t.Helper()
	c.click("//header", "Sign out")
	c.WaitJS("signed out", `document.querySelector('#signin-title')`, 30*time.Second)
}

// text is the main region's text.
func (c *console) text() string {
	return consoletest.Eval[string](c.Browser, `document.querySelector('main').innerText`)
}

func keyOf(t *testing.T, out string) (id, secret string) {
	t.Helper()
	var k struct{ ID, Secret string }
	if err := json.Unmarshal([]byte(out), &k); err != nil || k.ID == "" {
		t.Fatalf("key %q: %v", out, err)
	}
	return k.ID, k.Secret
}

// TestConsoleInABrowser is issue 18's walk through the console: sign in,
// a network, a template with two setup actions, an instance provisioned
// with its steps arriving live, DSS opened from the page, an upgrade, a
// snapshot taken and restored, a viewer who sees no action and is refused
// when it posts anyway, and a delete. Screenshots go to bin/artifacts/console.
func TestConsoleInABrowser(t *testing.T) {
	data := filepath.Join(t.TempDir(), "fm")
	d := startDevFast(t, data)
	py := NewPython(t, d.url, d.keyFile)
	viewerID, viewerSecret := keyOf(t, d.fm(t, "apikey", "create", "--label", "watcher", "--role", "viewer"))
	c := &console{Browser: consoletest.StartBrowser(t), t: t, url: d.url}

	c.Do(30*time.Second, chromedp.Navigate(d.url+"/"))
	c.Shot("signin")
	c.signIn(py.KeyID, py.Secret)
	c.Shot("dashboard-empty")

	// A network.
	c.open("#/networks")
	c.Do(10*time.Second, chromedp.Click(chromedp.Search(`//summary[normalize-space()="Create a network"]`)))
	c.typeInto("main", "Label", "lab-net")
	c.Do(10*time.Second, chromedp.Click(chromedp.CSS(`#`+mustID(c, "main", "Use FM's own VPC and subnet"))))
	c.click("//main//form", "Create a network")
	c.WaitJS("the network is listed", `document.querySelector('main table') && document.querySelector('main table').innerText.includes('lab-net')`, 30*time.Second)
	c.Shot("networks")

	// A template with two setup actions, the second moved up then back.
	c.open("#/templates")
	c.Do(10*time.Second, chromedp.Click(chromedp.Search(`//summary[normalize-space()="Create a template"]`)))
	c.typeInto("main", "Label", "lab-tpl")
	c.click("//main//form", "Create a template")
	c.WaitJS("the template is listed", `[...document.querySelectorAll('main table a')].some((a) => a.innerText === 'lab-tpl')`, 30*time.Second)
	c.Do(10*time.Second, chromedp.Click(chromedp.Search(`//main//table//a[normalize-space()="lab-tpl"]`)))
	c.WaitJS("the template's page", `document.querySelector('main h1') && document.querySelector('main h1').innerText === 'Template lab-tpl'`, 30*time.Second)
	c.click("//main", "Add a setup action")
	c.click("//main", "Add a setup action")
	setParams := func(i int, params string) {
		_ = consoletest.Eval[any](c.Browser, fmt.Sprintf(`(() => { const ta = document.querySelectorAll('#setup-actions textarea')[%d]; ta.value = %s; ta.dispatchEvent(new Event('input')); })()`, i, consoletest.JSString(params)))
	}
	setParams(0, `{"variables":[{"key":"TEAM","value":"web"}]}`)
	c.choose("#setup-actions fieldset:nth-of-type(2)", "Type", "ADD_PROPERTIES")
	setParams(1, `{"properties":[{"key":"dku.lab.mark","value":"42"}]}`)
	c.Do(10*time.Second, chromedp.Click(chromedp.Search(`//button[@aria-label="Move action 2 up"]`)))
	c.WaitJS("moved up", `document.querySelectorAll('#setup-actions select')[0].value === 'ADD_PROPERTIES'`, 5*time.Second)
	c.Do(10*time.Second, chromedp.Click(chromedp.Search(`//button[@aria-label="Move action 1 down"]`)))
	c.WaitJS("moved down", `document.querySelectorAll('#setup-actions select')[0].value === 'ADD_ENV_VARIABLES'`, 5*time.Second)
	// A wrong parameter is the API's to refuse, with its message.
	setParams(1, `{"properties":"not a list"}`)
	c.click("//main", "Save the template")
	c.WaitJS("the API's refusal shown", `document.querySelector('main .error')`, 10*time.Second)
	if msg := c.text(); !strings.Contains(msg, "properties") {
		t.Fatalf("the refusal does not say what is wrong:\n%s", msg)
	}
	setParams(1, `{"properties":[{"key":"dku.lab.mark","value":"42"}]}`)
	c.click("//main", "Save the template")
	c.WaitJS("saved", `document.querySelector('#flash').innerText.includes('saved')`, 10*time.Second)
	var tpls []struct {
		ID           string
		SetupActions []struct{ Type string } `json:"setupActions"`
	}
	py.Do(t, "GET", "/instance-settings-templates", "", &tpls)
	if len(tpls) != 1 || len(tpls[0].SetupActions) != 2 || tpls[0].SetupActions[0].Type != "ADD_ENV_VARIABLES" || tpls[0].SetupActions[1].Type != "ADD_PROPERTIES" {
		t.Fatalf("template as saved: %+v", tpls)
	}
	c.Shot("template")

	// An instance, provisioned, its steps arriving live.
	c.open("#/instances/new")
	c.typeInto("main", "Label", "web1")
	c.choose("main", "Image", "dss-13.4.0-standin")
	c.typeInto("main", "Data volume size (GB)", "5")
	c.click("//main", "Create")
	c.WaitJS("the instance's page", `document.querySelector('main h1') && document.querySelector('main h1').innerText.startsWith('web1')`, 30*time.Second)
	hash := consoletest.Eval[string](c.Browser, `location.hash`)
	id := strings.TrimPrefix(hash, "#/instances/")
	_ = consoletest.Eval[any](c.Browser, `window.__samePage = true`) // gone if the page were loaded again
	c.click("//main", "Provision")
	c.confirm("Provision makes the machine and installs DSS 13.4.0")
	stepsWhileRunning := 0
	deadline := time.Now().Add(3 * time.Minute)
	for {
		st := consoletest.Eval[struct {
			Summary string
			Steps   int
		}](c.Browser, `(() => { const d = document.querySelector('#op-list details'); return d ? {summary: d.querySelector('summary').innerText, steps: d.querySelectorAll('li').length} : {summary: '', steps: 0}; })()`)
		if strings.Contains(st.Summary, "running") && st.Steps > stepsWhileRunning {
			if stepsWhileRunning == 0 {
				c.Shot("instance-provisioning")
			}
			stepsWhileRunning = st.Steps
		}
		if strings.Contains(st.Summary, "succeeded") {
			break
		}
		if strings.Contains(st.Summary, "failed") || time.Now().After(deadline) {
			t.Fatalf("provision: %q\n%s", st.Summary, c.text())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if stepsWhileRunning == 0 {
		t.Fatal("no step was shown while the provision ran: the page did not follow it live")
	}
	c.WaitJS("the page kept, and the state shown running", `window.__samePage && document.querySelector('main h1').innerText.includes('running')`, 30*time.Second)
	c.Shot("instance-running")

	// DSS, opened from the page.
	dssURL := consoletest.Eval[string](c.Browser, `document.querySelector('#open-dss') ? document.querySelector('#open-dss').href : ''`)
	if !strings.HasPrefix(dssURL, "http") {
		t.Fatalf("no DSS link: %q", dssURL)
	}
	c.Do(30*time.Second, chromedp.Navigate(strings.TrimSuffix(dssURL, "/")+"/api/health"))
	health := consoletest.Eval[string](c.Browser, `document.body.innerText`)
	if !strings.Contains(health, `"13.4.0"`) {
		t.Fatalf("DSS at %s says %q", dssURL, health)
	}
	c.Do(30*time.Second, chromedp.Navigate(d.url+"/#/instances/"+id))
	c.WaitJS("back on the instance", `document.querySelector('main h1') && document.querySelector('main h1').innerText.startsWith('web1')`, 30*time.Second)

	// Upgraded by image: the confirmation says what happens.
	// A setting the API refuses: its message is shown, nothing is saved.
	c.Do(10*time.Second, chromedp.SetValue(chromedp.ID(mustID(c, "main", "Data volume size (GB)")), "-5"))
	c.click("//main", "Save settings")
	c.WaitJS("the API's refusal of the setting", `document.querySelector('main section[aria-labelledby=se-h] .error')`, 10*time.Second)
	if msg := consoletest.Eval[string](c.Browser, `document.querySelector('main section[aria-labelledby=se-h] .error').innerText`); !strings.Contains(msg, "dataVolumeSizeGB") {
		t.Fatalf("the refusal: %q", msg)
	}
	var saved struct{ DataVolumeSizeGB int }
	py.Do(t, "GET", "/instances/"+id, "", &saved)
	if saved.DataVolumeSizeGB != 5 {
		t.Fatalf("a refused setting was saved: %+v", saved)
	}
	c.Shot("instance-refused-setting")

	c.choose("main", "New image", "dss-14.0.0-standin")
	c.click("//main", "Change image and reprovision")
	c.confirm("Reprovision replaces the machine; the data volume is kept; a snapshot is taken first because DSS changes from 13.4.0 to 14.0.0")
	c.WaitJS("upgraded", `document.querySelector('main').innerText.includes('running 14.0.0') && document.querySelector('#op-list summary').innerText.includes('succeeded')`, 3*time.Minute)
	c.Shot("instance-upgraded")
	// The logs followed the upgrade as it went (the pane was filled when
	// the page opened, before it).
	c.WaitJS("the upgrade in the logs", `document.querySelector('pre.logs').innerText.includes('"target":"14.0.0"')`, 30*time.Second)

	// A snapshot taken, then restored.
	c.typeInto("main", "Reason", "before-restore")
	c.click("//main", "Take a snapshot")
	c.confirm("Takes a snapshot of the data volume")
	c.WaitJS("the snapshot available", `[...document.querySelectorAll('main table[aria-label=Snapshots] tr')].some((r) => r.innerText.includes('before-restore') && r.innerText.includes('AVAILABLE'))`, 2*time.Minute)
	before := consoletest.Eval[string](c.Browser, `document.querySelector('#op-list details').dataset.job`)
	c.click(`//table[@aria-label="Snapshots"]//tr[contains(., "before-restore")]`, "Restore")
	c.confirm("Restore replaces the machine", "DSS 14.0.0")
	c.WaitJS("restored", fmt.Sprintf(`(() => { const d = document.querySelector('#op-list details'); return d.dataset.job !== %s && d.querySelector('summary').innerText.includes('succeeded') && document.querySelector('main h1').innerText.includes('running'); })()`, consoletest.JSString(before)), 3*time.Minute)
	c.Shot("instance-restored")
	waitOp := func(what, kind string) {
		t.Helper()
		c.WaitJS(what, fmt.Sprintf(`document.querySelector('#op-list summary').innerText.startsWith(%s + ' — succeeded')`, consoletest.JSString(kind)), 3*time.Minute)
	}

	// A DSS password reset, a diagnosis collected and downloaded, a stop
	// and a start, the snapshot deleted.
	c.typeInto("main", "New password", "N3w-secret-pass")
	c.click("//main", "Reset password")
	c.confirm("Sets the DSS password of user admin")
	waitOp("the password reset", "reset-user-password")
	c.click("//main", "Collect diagnosis")
	c.confirm("Collects a diagnosis bundle")
	waitOp("the diagnosis", "collect-diagnosis")
	c.WaitJS("the bundle listed", `[...document.querySelectorAll('main section[aria-labelledby=dg-h] button')].some((b) => b.innerText.startsWith('Download'))`, time.Minute)
	size := consoletest.Eval[int](c.Browser, `(async () => {
		const name = document.querySelector('main section[aria-labelledby=dg-h] button').innerText.replace('Download ', '');
		const r = await fetch('/api/public/tenants/main/instances/`+id+`/diagnoses/' + encodeURIComponent(name), {headers: {'X-FM-CSRF': session.csrf}});
		return r.ok ? (await r.blob()).size : -r.status;
	})()`)
	if size <= 0 {
		t.Fatalf("the diagnosis download: %d", size)
	}
	c.Do(10*time.Second, chromedp.Click(chromedp.Search(`//main//button[starts-with(normalize-space(), "Download")]`)))
	c.click("//main", "Stop")
	c.confirm("Stop shuts the machine down")
	c.WaitJS("stopped", `document.querySelector('main h1').innerText.includes('stopped')`, 3*time.Minute)
	c.Shot("instance-stopped")
	c.click("//main", "Start")
	c.confirm("Start boots the machine and DSS")
	waitOp("started", "start")
	c.WaitJS("running", `document.querySelector('main h1').innerText.includes('running')`, time.Minute)
	c.click("//main", "Restart DSS")
	c.confirm("Restart DSS stops and starts DSS")
	waitOp("DSS restarted", "restart-dss")
	c.click("//main", "Replay setup actions")
	c.confirm("Replays the setup actions of template lab-tpl")
	waitOp("the setup actions replayed", "replay-setup-actions")
	c.click(`//table[@aria-label="Snapshots"]//tr[contains(., "before-restore")]`, "Delete")
	c.confirm("Deletes the snapshot")
	c.WaitJS("the snapshot deleted", `![...document.querySelectorAll('main table[aria-label=Snapshots] tr')].some((r) => r.innerText.includes('before-restore'))`, 2*time.Minute)

	// The template's setup actions replayed on every instance of it, from
	// its page.
	c.open("#/templates/" + tpls[0].ID)
	c.click("//main", "Replay on every instance")
	c.confirm("Replays template lab-tpl's setup actions on every running instance")
	c.WaitJS("the replay started", `document.querySelector('#flash').innerText.includes('Replay setup actions')`, 10*time.Second)
	c.open("#/instances/" + id)
	c.WaitJS("the template-wide replay done", `[...document.querySelectorAll('#op-list summary')].filter((s) => s.innerText.startsWith('replay-setup-actions — succeeded')).length >= 2`, 3*time.Minute)

	// The images, the API keys (one made, its secret shown once, revoked)
	// and the audit trail, by actor.
	c.open("#/images")
	c.WaitJS("the images", `document.querySelector('main table').innerText.includes('dss-14.0.0-standin')`, 10*time.Second)
	c.Shot("images")
	c.open("#/keys")
	c.Do(10*time.Second, chromedp.Click(chromedp.Search(`//summary[normalize-space()="Create a key"]`)))
	c.typeInto("main", "Label", "ci-robot")
	c.choose("main", "Role", "operator")
	c.click("//main//form", "Create a key")
	c.WaitJS("the secret shown", `document.querySelector('main .secret') && document.querySelector('main table').innerText.includes('ci-robot')`, 10*time.Second)
	c.Shot("api-keys")
	c.click(`//table[@aria-label="API keys"]//tr[contains(., "ci-robot")]`, "Revoke")
	c.confirm("every client and console session using it is refused")
	c.WaitJS("revoked", `![...document.querySelectorAll('main table[aria-label="API keys"] tr')].some((r) => r.innerText.includes('ci-robot') && r.querySelector('button'))`, 10*time.Second)
	c.open("#/audit?who=" + url.QueryEscape("key:"+py.KeyID))
	c.WaitJS("the admin's records", `document.querySelector('main table') && [...document.querySelectorAll('main table tbody tr')].every((r) => r.children[1].innerText === 'key:`+py.KeyID+`')`, 10*time.Second)
	if !strings.Contains(c.text(), "reset-user-password") {
		t.Fatalf("the admin's audit trail lacks the password reset:\n%s", c.text())
	}
	c.Shot("audit")
	c.open("#/instances/" + id)

	// A sign-out FM refuses (here, as if it were out of reach) leaves the
	// person signed in, and says so, rather than draw a sign-in form over a
	// live session.
	_ = consoletest.Eval[any](c.Browser, `(() => { const real = window.fetch; window.fetch = (url, opts) => { if (url !== '/console/session' || !opts || opts.method !== 'DELETE') return real(url, opts); window.fetch = real; return Promise.reject(new TypeError('unreachable')); }; })()`)
	c.click("//header", "Sign out")
	c.WaitJS("the failed sign-out told", `document.querySelector('#flash').innerText.includes('Sign-out failed') && !document.querySelector('#who').hidden && document.querySelector('main h1')`, 10*time.Second)

	// A viewer sees no action, and is refused when it posts anyway.
	c.signOut()
	c.signIn(viewerID, viewerSecret)
	c.open("#/")
	c.Shot("viewer-dashboard")
	if strings.Contains(c.text(), "Create an instance") {
		t.Fatal("the viewer is offered to create an instance")
	}
	c.open("#/instances/" + id)
	buttons := consoletest.Eval[[]string](c.Browser, `[...document.querySelectorAll('main button')].map((b) => b.innerText)`)
	if len(buttons) != 0 {
		t.Fatalf("the viewer sees buttons %q", buttons)
	}
	if !consoletest.Eval[bool](c.Browser, control("main", "Label")+`.disabled`) {
		t.Fatal("the viewer may edit the settings")
	}
	c.Shot("viewer-instance")
	statuses := consoletest.Eval[[]int](c.Browser, fmt.Sprintf(`Promise.all([
		fetch('/api/public/tenants/main/instances', {method: 'POST', headers: {'X-FM-CSRF': session.csrf, 'Content-Type': 'application/json'}, body: JSON.stringify({label: 'sneaky'})}),
		fetch('/api/public/tenants/main/instances/%s/actions/delete', {headers: {'X-FM-CSRF': session.csrf}}),
		fetch('/api/public/tenants/main/instances/%s/snapshots', {method: 'POST', headers: {'X-FM-CSRF': session.csrf}}),
	]).then((rs) => rs.map((r) => r.status))`, id, id))
	for _, s := range statuses {
		if s != http.StatusForbidden {
			t.Fatalf("the viewer's direct calls got %v, want 403 each", statuses)
		}
	}
	c.signOut()

	// XSS: markup in what users and agents write stays text.
	py.Do(t, "POST", "/instances", fmt.Sprintf(`{"label":"<img src=x onerror=\"window.__xss=1\">","description":"<script>window.__xss=2</script>",
		"fmTags":["<svg onload=window.__xss=3>"],"virtualNetworkId":%q,"instanceSettingsTemplateId":%q,"imageId":"dss-13.4.0-standin"}`, mustVN(t, py), tpls[0].ID), nil)
	c.signIn(py.KeyID, py.Secret)
	c.open("#/")
	c.WaitJS("the hostile label shown as text", `[...document.querySelectorAll('main table a')].some((a) => a.innerText === '<img src=x onerror="window.__xss=1">')`, 30*time.Second)
	c.Do(10*time.Second, chromedp.Click(chromedp.Search(`//main//table//a[starts-with(., "<img")]`)))
	c.WaitJS("its page", `document.querySelector('main').innerText.includes('<script>window.__xss=2</script>') && document.querySelector('main').innerText.includes('<svg onload=window.__xss=3>')`, 30*time.Second)
	if xss := consoletest.Eval[bool](c.Browser, `window.__xss === undefined && document.querySelectorAll('main img, main script, main svg').length === 0`); !xss {
		t.Fatalf("markup in a label ran or was made: %v", xss)
	}

	// Deprovisioned, then deleted, from its page.
	c.open("#/instances/" + id)
	c.click("//main", "Deprovision")
	c.confirm("Deprovision tears the machine down. The data volume is kept")
	c.WaitJS("deprovisioned", `document.querySelector('main h1').innerText.includes('deprovisioned')`, 3*time.Minute)
	c.Do(10*time.Second, chromedp.Click(chromedp.Search(`//form[@aria-label="Delete"]//button`)))
	c.confirm("Delete removes the instance web1.", "Its data volume is deleted with it", "Its snapshots are kept")
	c.WaitJS("back on the dashboard", `location.hash === '#/'`, 30*time.Second)
	deadline = time.Now().Add(2 * time.Minute)
	for py.Do(t, "GET", "/instances/"+id, "", nil) != http.StatusNotFound {
		if time.Now().After(deadline) {
			t.Fatal("the instance was not deleted")
		}
		time.Sleep(200 * time.Millisecond)
	}
	c.WaitJS("the dashboard follows", `!document.querySelector('main').innerText.includes('web1')`, 30*time.Second)
	c.Shot("dashboard")

	// The template and the network, once nothing uses them: the one
	// still used is refused with FM's reason, then deleted.
	var hostile []struct{ ID string }
	py.Do(t, "GET", "/instances", "", &hostile)
	c.open("#/templates")
	c.click(`//table[@aria-label="Templates"]//tr[contains(., "lab-tpl")]`, "Delete")
	c.confirm("FM refuses while something uses it")
	c.WaitJS("the refusal shown", `document.querySelector('#flash .bad')`, 10*time.Second)
	for _, in := range hostile {
		if code := py.Do(t, "GET", "/instances/"+in.ID+"/actions/delete", "", nil); code != http.StatusOK {
			t.Fatalf("delete %s: %d", in.ID, code)
		}
	}
	deadline = time.Now().Add(time.Minute)
	for {
		var left []struct{ ID string }
		py.Do(t, "GET", "/instances", "", &left)
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("instances left: %v", left)
		}
		time.Sleep(200 * time.Millisecond)
	}
	c.click(`//table[@aria-label="Templates"]//tr[contains(., "lab-tpl")]`, "Delete")
	c.confirm("FM refuses while something uses it")
	c.WaitJS("the template gone", `!document.querySelector('main').innerText.includes('lab-tpl')`, 30*time.Second)
	c.open("#/networks")
	c.click(`//table[@aria-label="Networks"]//tr[contains(., "lab-net")]`, "Delete")
	c.confirm("FM refuses while something uses it")
	c.WaitJS("the network gone", `!document.querySelector('main').innerText.includes('lab-net')`, 30*time.Second)

	// Single sign-on: a person of the identity provider signs in from the
	// sign-in page, with the role their groups give.
	idp := oidctest.Run(t)
	idp.ClientID, idp.ClientSecret = "fm", "client-secret"
	if code := py.Do(t, "PUT", "/iam/sso-settings", fmt.Sprintf(`{"enabled": true, "protocol": "OPENID",
		"openIDParams": {"clientId": "fm", "clientSecret": "client-secret", "issuer": %q, "claimKeyIdentifier": "email", "usePKCE": true},
		"fmRoleMappings": {"fm-ops": "operator"}}`, idp.Issuer), nil); code != http.StatusOK {
		t.Fatalf("SSO settings: %d", code)
	}
	idp.SignInAs(map[string]any{"email": "alice@corp.example", "groups": []string{"fm-ops"}})
	c.signOut()
	c.WaitJS("the single sign-on link", `document.querySelector('#sso')`, 10*time.Second)
	c.Shot("signin-sso")
	c.Do(30*time.Second, chromedp.Click(chromedp.CSS("#sso")))
	c.WaitJS("signed in by SSO", `!document.querySelector('#who').hidden && document.querySelector('#who').innerText.includes('sso:alice@corp.example (operator)')`, 30*time.Second)
	if nav := consoletest.Eval[string](c.Browser, `document.querySelector('#nav').innerText`); !strings.Contains(nav, "Templates") || strings.Contains(nav, "API keys") {
		t.Fatalf("an operator's sections: %q", nav)
	}

	// Clickjacking: another site's frame shows nothing of FM.
	evil := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, `<!doctype html><iframe id="fm" src="%s/" width="800" height="600"></iframe>`, d.url)
	}))
	defer evil.Close()
	c.Do(30*time.Second, chromedp.Navigate(evil.URL))
	framed := true
	deadline = time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(c.Context(), 10*time.Second)
		res, err := chromedp.Call(ctx, page.GetFrameTree, cdp.Empty{})
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		tree := res.FrameTree
		if len(tree.ChildFrames) == 1 && tree.ChildFrames[0].Frame.URL != "" && !strings.HasPrefix(tree.ChildFrames[0].Frame.URL, d.url) {
			framed = false
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if framed {
		t.Fatal("FM's console loaded in another site's frame")
	}
}

func mustID(c *console, scope, label string) string {
	return consoletest.Eval[string](c.Browser, control(scope, label)+`.id`)
}

func mustVN(t *testing.T, py *Python) string {
	var vns []struct{ ID string }
	py.Do(t, "GET", "/virtual-networks", "", &vns)
	if len(vns) == 0 {
		t.Fatal("no network")
	}
	return vns[0].ID
}
