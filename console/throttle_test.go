package console_test

import (
	"net/http/httptest"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/fleetmanager/fm/console"
	"github.com/fleetmanager/fm/console/consoletest"
)

// TestReloadsNeverOverlap holds the pages' live reloads (core.js's
// throttled) to one read at a time: a change told while a read is in
// flight gets one more read after it, never a second read beside it. Two
// reads in flight could end in either order, and the earlier one, drawn
// last, left an instance's page showing an ended operation as running
// (seen in TestConsoleInABrowser under load).
func TestReloadsNeverOverlap(t *testing.T) {
	srv := httptest.NewServer(console.Handler())
	t.Cleanup(srv.Close)
	br := consoletest.StartBrowser(t)
	br.Do(30*time.Second, chromedp.Navigate(srv.URL+"/"))
	br.WaitJS("core.js loaded", `typeof throttled === 'function' && typeof generation === 'number'`, 30*time.Second)

	// Each read waits until the test ends it; the script tells what it saw.
	got := consoletest.Eval[map[string]any](br, `(async () => {
		const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
		const until = async (cond) => { for (let i = 0; i < 300 && !cond(); i++) await sleep(10); return cond(); };
		const reads = [], ends = [];
		let inFlight = 0, most = 0;
		const reload = throttled(generation, () => new Promise((resolve) => {
			const n = reads.length;
			reads.push('started');
			inFlight++;
			most = Math.max(most, inFlight);
			ends.push(() => { reads[n] = 'ended'; inFlight--; resolve(); });
		}), 10);
		reload();
		const first = await until(() => reads.length === 1);
		reload(); reload(); // two changes told while the first read is in flight
		await sleep(200);
		const beside = reads.length;
		ends[0]();
		const after = await until(() => reads.length === 2);
		ends[1]();
		await sleep(200);
		return {first, beside, after, reads: reads.length, most, last: reads[reads.length - 1]};
	})()`)
	want := map[string]any{"first": true, "beside": 1.0, "after": true, "reads": 2.0, "most": 1.0, "last": "ended"}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v (all: %v)", k, got[k], v, got)
		}
	}
}
