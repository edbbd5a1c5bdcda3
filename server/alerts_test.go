package server_test

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
	"github.com/fleetmanager/fm/server/servertest"
)

// webhookReceiver is an alert webhook that records what it is sent, and
// refuses the first failFirst requests with a 503.
type webhookReceiver struct {
	t      *testing.T
	srv    *httptest.Server
	secret string

	mu        sync.Mutex
	failFirst int
	requests  int
	got       []receivedAlert
}

type receivedAlert struct {
	Status      string            `json:"status"`
	Labels      map[string]string `json:"labels"`
	Annotations map[string]string `json:"annotations"`
	StartsAt    time.Time         `json:"startsAt"`
	EndsAt      time.Time         `json:"endsAt"`
	Fingerprint string            `json:"fingerprint"`
	idempotency string
}

func newWebhookReceiver(t *testing.T, secret string, failFirst int) *webhookReceiver {
	w := &webhookReceiver{t: t, secret: secret, failFirst: failFirst}
	w.srv = httptest.NewServer(http.HandlerFunc(w.serve))
	t.Cleanup(w.srv.Close)
	return w
}

func (w *webhookReceiver) serve(rw http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	w.mu.Lock()
	defer w.mu.Unlock()
	w.requests++
	if w.requests <= w.failFirst {
		http.Error(rw, "not now", http.StatusServiceUnavailable)
		return
	}
	want := ""
	if w.secret != "" {
		mac := hmac.New(sha256.New, []byte(w.secret))
		mac.Write(body)
		want = "sha256=" + hex.EncodeToString(mac.Sum(nil))
	}
	if sig := r.Header.Get("X-FM-Signature"); sig != want {
		w.t.Errorf("a request's signature %q, want %q", sig, want)
	}
	var msg struct {
		Version string          `json:"version"`
		Status  string          `json:"status"`
		Alerts  []receivedAlert `json:"alerts"`
	}
	if err := json.Unmarshal(body, &msg); err != nil || msg.Version != "4" || len(msg.Alerts) == 0 {
		w.t.Errorf("not an Alertmanager webhook message (version 4): %v %s", err, body)
	}
	for _, a := range msg.Alerts {
		if a.Status != msg.Status {
			w.t.Errorf("an alert %s in a message %s", a.Status, msg.Status)
		}
		a.idempotency = r.Header.Get("Idempotency-Key")
		w.got = append(w.got, a)
	}
}

// named returns what was received of the alerts of one rule.
func (w *webhookReceiver) named(name string) []receivedAlert {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []receivedAlert
	for _, a := range w.got {
		if a.Labels["alertname"] == name {
			out = append(out, a)
		}
	}
	return out
}

func (w *webhookReceiver) waitNamed(name string, n int, within time.Duration) []receivedAlert {
	w.t.Helper()
	for deadline := time.Now().Add(within); ; time.Sleep(50 * time.Millisecond) {
		if got := w.named(name); len(got) >= n {
			return got
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("%s: %d notifications after %s, want %d", name, len(w.named(name)), within, n)
		}
	}
}

// reportAgent writes an agent's status for id, as its agent does: it is
// heard from now.
func reportAgent(t testing.TB, f *fm, id string) {
	t.Helper()
	agents, err := f.env.Bus.JetStream(t).KeyValue(context.Background(), protocol.BucketAgents)
	if err != nil {
		t.Fatal(err)
	}
	st := protocol.AgentStatus{Instance: id, Time: time.Now().UTC(), Phase: protocol.PhaseReady,
		DSS:     protocol.DSSStatus{State: protocol.DSSRunning, Version: "14.0.0", NodeType: "design", Port: 10000},
		Machine: protocol.MachineFacts{DataVolumeBytes: 100 << 30, DataVolumeUsedBytes: 10 << 30}}
	data, _ := protocol.Encode(&st)
	if _, err := agents.Put(context.Background(), id, data); err != nil {
		t.Fatal(err)
	}
}

// holdProvisionerLease holds the provisioner's lease for the test, as a
// provisioner would: a server alone raises FMNoActiveProvisioner.
func holdProvisionerLease(t *testing.T, f *fm, ttl time.Duration) {
	t.Helper()
	leases, err := f.env.Bus.JetStream(t).KeyValue(context.Background(), protocol.BucketLeases)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	t.Cleanup(func() { cancel(); <-done })
	l := &bus.Lease{KV: leases, Key: protocol.LeaseProvisioner, Holder: "test-provisioner", TTL: ttl}
	go func() {
		defer close(done)
		_ = l.Run(ctx, func(held context.Context) error {
			select {
			case <-held.Done():
			case <-ctx.Done():
			}
			return nil
		})
	}()
}

func alertingConfig(c *server.Config) {
	c.HeartbeatSeconds = 1 // silent for 3 s + 2 s: not responding
	c.AlertInterval = 100 * time.Millisecond
	c.AlertHoldFor = 500 * time.Millisecond
}

// TestAlertsFireOnceAndResolveOnce: an agent that goes silent raises
// FMAgentNotResponding, told to the webhook once (after the webhook
// refused it once), signed, in Alertmanager's format; the agent heard
// again resolves it, told once; nothing more is sent after.
func TestAlertsFireOnceAndResolveOnce(t *testing.T) {
	f := start(t, servertest.WithConfig(alertingConfig))
	holdProvisionerLease(t, f, bus.DefaultTopology().LeaseTTL)
	hook := newWebhookReceiver(t, "s3cret", 1)
	f.ok(f.do("PUT", "/alerting", `{"webhookURL": "`+hook.srv.URL+`/hook", "webhookSecret": "s3cret"}`), nil)
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("silent", vn.ID, tpl.ID, im.ID))
	runningWithVolume(t, f.env.Bus, in.ID)
	reportAgent(t, f, in.ID)

	fired := hook.waitNamed("FMAgentNotResponding", 1, 30*time.Second)
	a := fired[0]
	hook.mu.Lock()
	requests := hook.requests
	hook.mu.Unlock()
	if requests != 2 {
		t.Fatalf("%d requests before the alert was taken, want 2 (one refused, the same sent again)", requests)
	}
	if a.Status != api.AlertFiring || a.Labels["instance_id"] != in.ID || a.Labels["severity"] != "warning" ||
		!strings.Contains(a.Annotations["summary"], in.ID) || a.Fingerprint == "" || a.idempotency == "" || a.StartsAt.IsZero() {
		t.Fatalf("the alert told: %+v", a)
	}
	// The webhook answered before the server recorded it told: the list
	// says so a moment later.
	var listed []api.Alert
	var mine *api.Alert
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		f.ok(f.do("GET", "/alerts", ""), &listed)
		mine = nil
		for i := range listed {
			if listed[i].Fingerprint == a.Fingerprint {
				mine = &listed[i]
			}
		}
		if mine != nil && mine.Notified || time.Now().After(deadline) {
			break
		}
	}
	if mine == nil || mine.Status != api.AlertFiring || !mine.Notified || mine.Name != "FMAgentNotResponding" {
		t.Fatalf("GET /alerts: %+v", listed)
	}

	reportAgent(t, f, in.ID)
	got := hook.waitNamed("FMAgentNotResponding", 2, 20*time.Second)
	if r := got[1]; r.Status != api.AlertResolved || r.Fingerprint != a.Fingerprint || !r.StartsAt.Equal(a.StartsAt) || r.EndsAt.IsZero() {
		t.Fatalf("the resolution told: %+v", r)
	}
	// Heard from again within the silence: nothing more is told, and the
	// resolved alert is gone from the list.
	for i := 0; i < 20; i++ {
		time.Sleep(100 * time.Millisecond)
		reportAgent(t, f, in.ID)
	}
	if n := len(hook.named("FMAgentNotResponding")); n != 2 {
		t.Fatalf("the webhook was told %d times of the agent, want 2 (fired, resolved)", n)
	}
	f.ok(f.do("GET", "/alerts", ""), &listed)
	for _, l := range listed {
		if l.Fingerprint == a.Fingerprint {
			t.Fatalf("a resolved and told alert is still listed: %+v", l)
		}
	}
}

// TestAnAlertToldWhenTheServerDiesIsToldAgain: the server dies after the
// webhook took an alert and before it recorded so. If the trouble lasts,
// the next server (once the dead one's lease expired) tells the alert
// again as the same request (same fingerprint, startsAt and
// Idempotency-Key), then no more; if it ended meanwhile, the next server
// tells its resolution (the webhook may know it fires: it is never dropped
// silently).
func TestAnAlertToldWhenTheServerDiesIsToldAgain(t *testing.T) {
	for _, tc := range []struct {
		name          string
		endsMeanwhile bool
		want          string // the status told after the restart
	}{
		{"the trouble lasts", false, api.AlertFiring},
		{"the trouble ends while no server runs", true, api.AlertResolved},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var env *servertest.Env
			var once sync.Once
			crashed := make(chan struct{})
			f := start(t, servertest.WithConfig(func(c *server.Config) {
				alertingConfig(c)
				c.Topology = bus.DefaultTopology()
				c.Topology.LeaseTTL = 2 * time.Second
				c.Crash = func(point string) {
					if point != "server/alert/sent" {
						return
					}
					once.Do(func() {
						env.Die()
						close(crashed)
						select {} // dead
					})
				}
			}))
			env = f.env
			holdProvisionerLease(t, f, 2*time.Second)
			hook := newWebhookReceiver(t, "", 0)
			f.ok(f.do("PUT", "/alerting", `{"webhookURL": "`+hook.srv.URL+`"}`), nil)
			vn, tpl, im := f.fleet()
			in := f.createInstance(instanceBody("dies", vn.ID, tpl.ID, im.ID))
			runningWithVolume(t, f.env.Bus, in.ID)
			reportAgent(t, f, in.ID)
			select {
			case <-crashed:
			case <-time.After(30 * time.Second):
				t.Fatal("no alert was ever sent")
			}
			if tc.endsMeanwhile {
				// Heard from until the resolution is told, however long the
				// restart and the lease's expiry take.
				stop := make(chan struct{})
				done := make(chan struct{})
				go func() {
					defer close(done)
					for {
						reportAgent(t, f, in.ID)
						select {
						case <-stop:
							return
						case <-time.After(500 * time.Millisecond):
						}
					}
				}()
				t.Cleanup(func() { close(stop); <-done })
			}
			f.env.StartAgain(t, func(c *server.Config) { c.Crash = nil })
			got := hook.waitNamed("FMAgentNotResponding", 2, 30*time.Second)
			first, again := got[0], got[1]
			if first.Status != api.AlertFiring || again.Status != tc.want || again.Fingerprint != first.Fingerprint || !again.StartsAt.Equal(first.StartsAt) {
				t.Fatalf("told %+v, then %+v; want %s second", first, again, tc.want)
			}
			if tc.want == api.AlertFiring && again.idempotency != first.idempotency {
				t.Fatalf("the same request sent again with another Idempotency-Key: %q, %q", first.idempotency, again.idempotency)
			}
			time.Sleep(time.Second)
			if n := len(hook.named("FMAgentNotResponding")); n != 2 {
				t.Fatalf("told %d times, want 2", n)
			}
		})
	}
}

// TestAnAlertWaitsForAWebhook: an alert that fires while no webhook is set
// is listed, not given up, and told once a webhook is set, however long it
// fired before; so is one a webhook refused before it was unset, once a
// new webhook is set after the give-up time.
func TestAnAlertWaitsForAWebhook(t *testing.T) {
	for _, tc := range []struct {
		name    string
		refused bool // a webhook that refuses everything was set, tried, then unset
	}{
		{"never tried", false},
		{"tried with a webhook since unset", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := start(t, servertest.WithConfig(func(c *server.Config) {
				alertingConfig(c)
				c.AlertGiveUpAfter = time.Second
			}))
			holdProvisionerLease(t, f, bus.DefaultTopology().LeaseTTL)
			if tc.refused {
				refusing := newWebhookReceiver(t, "", 1<<30)
				f.ok(f.do("PUT", "/alerting", `{"webhookURL": "`+refusing.srv.URL+`"}`), nil)
				defer func() {
					refusing.mu.Lock()
					defer refusing.mu.Unlock()
					if refusing.requests == 0 {
						t.Error("the refusing webhook was never tried")
					}
				}()
			}
			vn, tpl, im := f.fleet()
			in := f.createInstance(instanceBody("nohook", vn.ID, tpl.ID, im.ID))
			runningWithVolume(t, f.env.Bus, in.ID)
			reportAgent(t, f, in.ID)
			var listed []api.Alert
			for deadline := time.Now().Add(30 * time.Second); len(listed) == 0 || tc.refused && listed[0].Attempts == 0; time.Sleep(100 * time.Millisecond) {
				f.ok(f.do("GET", "/alerts", ""), &listed)
				if time.Now().After(deadline) {
					t.Fatalf("the alert never fired (and was tried): %+v", listed)
				}
			}
			if tc.refused {
				f.ok(f.do("PUT", "/alerting", `{"webhookURL": ""}`), nil)
			}
			time.Sleep(2 * time.Second) // longer than AlertGiveUpAfter
			f.ok(f.do("GET", "/alerts", ""), &listed)
			if len(listed) != 1 || listed[0].GaveUp || listed[0].Notified {
				t.Fatalf("an alert with no webhook to tell: %+v", listed)
			}
			hook := newWebhookReceiver(t, "", 0)
			f.ok(f.do("PUT", "/alerting", `{"webhookURL": "`+hook.srv.URL+`"}`), nil)
			if a := hook.waitNamed("FMAgentNotResponding", 1, 20*time.Second)[0]; a.Status != api.AlertFiring || a.Labels["instance_id"] != in.ID {
				t.Fatalf("told: %+v", a)
			}
		})
	}
}

// TestAConditionShorterThanItsHoldRaisesNothing: an agent silent for less
// than the hold time raises no alert.
func TestAConditionShorterThanItsHoldRaisesNothing(t *testing.T) {
	f := start(t, servertest.WithConfig(func(c *server.Config) {
		alertingConfig(c)
		c.AlertHoldFor = 6 * time.Second
	}))
	holdProvisionerLease(t, f, bus.DefaultTopology().LeaseTTL)
	hook := newWebhookReceiver(t, "", 0)
	f.ok(f.do("PUT", "/alerting", `{"webhookURL": "`+hook.srv.URL+`"}`), nil)
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("brief", vn.ID, tpl.ID, im.ID))
	runningWithVolume(t, f.env.Bus, in.ID)
	reportAgent(t, f, in.ID)
	var view api.Fleet
	for deadline := time.Now().Add(30 * time.Second); view.Summary.AgentsNotResponding == 0; time.Sleep(100 * time.Millisecond) {
		f.ok(f.do("GET", "/fleet?rows=false", ""), &view)
		if time.Now().After(deadline) {
			t.Fatal("the agent was never seen silent")
		}
	}
	reportAgent(t, f, in.ID)    // heard again as soon as it was seen silent, well within the 6 s hold
	time.Sleep(7 * time.Second) // past when the hold would have ended
	var listed []api.Alert
	f.ok(f.do("GET", "/alerts", ""), &listed)
	if len(listed) != 0 || len(hook.named("FMAgentNotResponding")) != 0 {
		t.Fatalf("a condition shorter than its hold raised %+v (told %+v)", listed, hook.named("FMAgentNotResponding"))
	}
}

// TestAlertingSettings: only admins read and change where alerts go; a
// bad URL is refused and changes nothing; the secret is write-only and
// kept by a save that echoes what GET showed; the URL and the secret are
// sealed at rest.
func TestAlertingSettings(t *testing.T) {
	f := start(t)
	f.ok(f.do("PUT", "/alerting", `{"webhookURL": "https://chat.example.com/hooks/T0K3N", "webhookSecret": "s3cret"}`), nil)
	var as api.AlertSettings
	f.ok(f.do("GET", "/alerting", ""), &as)
	if as.WebhookURL != "https://chat.example.com/hooks/T0K3N" || !as.HasWebhookSecret || as.WebhookSecret != "" {
		t.Fatalf("GET /alerting: %+v", as)
	}
	for _, bad := range []string{`{"webhookURL": "ftp://x"}`, `{"webhookURL": "https://user:pw@chat.example.com/"}`,
		`{"webhookURL": "/relative"}`, `{"webhookURL": 3}`, `{"webhookURL": "https://x/` + strings.Repeat("a", 3000) + `"}`} {
		if r := f.do("PUT", "/alerting", bad); r.status != http.StatusBadRequest {
			t.Errorf("PUT %s: %d %s, want 400", bad, r.status, r.body)
		}
	}
	// Echoed without the secret: kept.
	f.ok(f.do("PUT", "/alerting", `{"webhookURL": "https://chat.example.com/hooks/OTHER", "hasWebhookSecret": true}`), &as)
	if !as.HasWebhookSecret || as.WebhookURL != "https://chat.example.com/hooks/OTHER" {
		t.Fatalf("after an echo: %+v", as)
	}
	raw, err := f.env.Bus.JetStream(t).KeyValue(context.Background(), protocol.BucketSettings)
	if err != nil {
		t.Fatal(err)
	}
	e, err := raw.Get(context.Background(), "main.alerting")
	if err != nil {
		t.Fatal(err)
	}
	if s := string(e.Value()); strings.Contains(s, "OTHER") || strings.Contains(s, "s3cret") {
		t.Fatalf("the webhook's URL or secret is stored in clear: %s", s)
	}
	var audit []struct{ Action, Outcome string }
	f.ok(f.do("GET", "/audit?limit=1000", ""), &audit)
	if raw := mustJSON(t, audit); !strings.Contains(raw, `"Action":"GET /api/public/tenants/main/alerting","Outcome":"ok"`) {
		t.Errorf("reading the webhook (a credential) is not audited: %s", raw)
	}
	f.ok(f.do("PUT", "/alerting", `{"webhookURL": "", "clearWebhookSecret": true}`), &as)
	if as.HasWebhookSecret || as.WebhookURL != "" {
		t.Fatalf("after clearing: %+v", as)
	}
	for _, role := range []string{"viewer", "operator"} {
		k := f.newKey(role)
		if r := f.doAs("GET", "/alerting", "", k.ID, k.Secret); r.status != http.StatusForbidden {
			t.Errorf("%s GET /alerting: %d", role, r.status)
		}
		if r := f.doAs("PUT", "/alerting", `{"webhookURL": "https://evil.example.com/"}`, k.ID, k.Secret); r.status != http.StatusForbidden {
			t.Errorf("%s PUT /alerting: %d", role, r.status)
		}
		if r := f.doAs("GET", "/alerts", "", k.ID, k.Secret); r.status != http.StatusOK {
			t.Errorf("%s GET /alerts: %d", role, r.status)
		}
	}
}
