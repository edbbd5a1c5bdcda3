// Package consoletest drives the web console (package console) in a real
// headless Chromium, for the tests and benchmarks of any package (e2e's
// walk through the console, server's dashboard benchmark). Tests import
// it; nothing else may.
package consoletest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// Browser is a headless Chromium (Debian's chromium package) driven
// through the DevTools protocol by chromedp, for the web console's tests.
// FM_REQUIRE_CHROMIUM makes a machine without it fail them rather than
// skip (CI sets it).
type Browser struct {
	t   testing.TB
	ctx context.Context
	// Shots is where Shot saves screenshots: $FM_ARTIFACTS/console, or
	// bin/artifacts/console in the checkout (ignored by git).
	Shots string
}

// StartBrowser starts Chromium; it is stopped when the test ends.
func StartBrowser(t testing.TB) *Browser {
	t.Helper()
	var path string
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			path = p
			break
		}
	}
	if path == "" {
		if os.Getenv("FM_REQUIRE_CHROMIUM") != "" {
			t.Fatal("chromium not found, and FM_REQUIRE_CHROMIUM is set (apt-get install chromium)")
		}
		t.Skip("chromium not found (apt-get install chromium): the console's browser tests need it")
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(path),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1366, 900),
		// Root in a container has no user namespaces to sandbox with.
		chromedp.NoSandbox,
		chromedp.Flag("disable-dev-shm-usage", true),
	)
	alloc, stopAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, stop := chromedp.NewContext(alloc)
	t.Cleanup(func() {
		stop()
		stopAlloc() // kills Chromium and waits for it
	})
	// No timeout on the first call: it would stop the browser with it.
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	shots := os.Getenv("FM_ARTIFACTS")
	if shots == "" {
		shots = filepath.Join(moduleRoot(t), "bin", "artifacts")
	}
	shots = filepath.Join(shots, "console")
	if err := os.MkdirAll(shots, 0o755); err != nil {
		t.Fatal(err)
	}
	return &Browser{t: t, ctx: ctx, Shots: shots}
}

// Context is the browser tab's context, for chromedp calls of a test's own.
func (b *Browser) Context() context.Context { return b.ctx }

// Do runs actions within timeout, failing the test on an error.
func (b *Browser) Do(timeout time.Duration, actions ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, timeout)
	defer cancel()
	if err := chromedp.Do(ctx, actions...); err != nil {
		b.t.Fatalf("browser: %v", err)
	}
}

// Eval evaluates a JavaScript expression in the page; a promise is awaited.
func Eval[T any](b *Browser, js string) T {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](js, chromedp.EvalAwaitPromise))
	if err != nil {
		b.t.Fatalf("browser: %s: %v", js, err)
	}
	return v
}

// WaitJS polls a JavaScript expression until it is true, for at most
// timeout, and fails the test, saying what, otherwise.
func (b *Browser) WaitJS(what, js string, timeout time.Duration) {
	b.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
		ok, err := chromedp.Run(ctx, chromedp.Evaluate[bool]("Boolean("+js+")"))
		cancel()
		if err == nil && ok {
			return
		}
		if time.Now().After(deadline) {
			text, _ := chromedp.Run(b.ctx, chromedp.Evaluate[string](`document.querySelector('main') ? document.querySelector('main').innerText.slice(0, 3000) : ''`))
			b.Shot("failed-" + strings.NewReplacer(" ", "-", "/", "-", "'", "").Replace(what))
			b.t.Fatalf("browser: %s: not within %s (%v); the page shows:\n%s", what, timeout, err, text)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Shot saves a screenshot of the whole page as <name>.png.
func (b *Browser) Shot(name string) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
	defer cancel()
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		b.t.Logf("screenshot %s: %v", name, err)
		return
	}
	file := filepath.Join(b.Shots, name+".png")
	if err := os.WriteFile(file, png, 0o644); err != nil {
		b.t.Logf("screenshot %s: %v", name, err)
		return
	}
	b.t.Logf("screenshot: %s", file)
}

// JSString quotes s as a JavaScript string literal.
func JSString(s string) string {
	return fmt.Sprintf("%q", s) // Go's quoting is valid JavaScript for the text tests use
}

// moduleRoot is the checkout's root: the nearest folder above the test's
// with a go.mod.
func moduleRoot(t testing.TB) string {
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
		if filepath.Dir(d) == d {
			return dir
		}
	}
}
