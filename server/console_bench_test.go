package server_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/fleetmanager/fm/console/consoletest"
)

// BenchmarkConsoleDashboard renders the web console's fleet dashboard in
// headless Chromium, for a fleet of FM_BENCH_INSTANCES running instances
// (default 1000): from the navigation to the page drawn with the fleet's
// summary and first page of rows (its three REST calls, and the DOM). The
// time is measured in the page (performance.now, up to the frame after the
// page is built); ms/render is its mean.
//
//	FM_BENCH_INSTANCES=10000 go test ./server -run '^$' -bench ConsoleDashboard -benchtime 20x
func BenchmarkConsoleDashboard(b *testing.B) {
	n := benchInstances(b)
	f := start(b)
	seedRunningFleet(b, f, n)
	br := consoletest.StartBrowser(b)
	ctx := br.Context()
	if err := chromedp.Do(ctx, chromedp.Navigate(f.env.URL+"/")); err != nil {
		b.Fatal(err)
	}
	br.WaitJS("the sign-in form", `document.querySelector('#signin-title')`, 30*time.Second)
	_ = consoletest.Eval[any](br, fmt.Sprintf(`fetch('/console/session', {method: 'POST', headers: {'Content-Type': 'application/json'},
		body: JSON.stringify({keyId: %s, secret: %s})}).then(() => location.reload())`, consoletest.JSString(f.env.Key.ID), consoletest.JSString(f.env.Key.Secret)))
	br.WaitJS("the dashboard", `document.querySelector('main').dataset.route !== undefined && document.querySelector('#summary .big')`, time.Minute)
	if got := consoletest.Eval[string](br, `document.querySelector('#summary .big').innerText`); got != fmt.Sprint(n) {
		b.Fatalf("the dashboard counts %s instances, not %d", got, n)
	}
	total := 0.0
	i := 0
	b.ResetTimer()
	for b.Loop() {
		i++
		ms := consoletest.Eval[float64](br, fmt.Sprintf(`new Promise((resolve) => {
			const main = document.querySelector('main'), want = '#/?render=%d', t0 = performance.now();
			const obs = new MutationObserver(() => {
				if (main.dataset.route === want) { obs.disconnect(); requestAnimationFrame(() => resolve(performance.now() - t0)); }
			});
			obs.observe(main, {attributes: true});
			location.hash = want;
		})`, i))
		total += ms
	}
	b.StopTimer()
	rows := consoletest.Eval[int](br, `document.querySelectorAll('main table[aria-label=Instances] tbody tr').length`)
	if rows != min(n, 50) || !strings.Contains(consoletest.Eval[string](br, `document.querySelector('main').innerText`), "scrape-") {
		b.Fatalf("the dashboard shows %d rows", rows)
	}
	b.ReportMetric(total/float64(i), "ms/render")
}
