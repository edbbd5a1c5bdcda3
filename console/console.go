// Package console is FM's web console: the pages and scripts a browser
// loads from FM's own address, embedded in the binary (no CDN: it works
// offline). The server mounts Handler at "/" and AssetsPath; only package
// server imports it.
//
// The console is a small script, written without a framework or a build
// step, that calls FM's REST API from the browser with the session the
// server keeps for it (server/consolesession.go): everything it shows is
// what the API answers to the signed-in key, and everything it changes goes
// through the API, so roles, revisions and the audit trail apply as they do
// to every client. docs/architecture.md says why this way.
//
// What the script shows comes from FM's users (labels, descriptions, tags)
// and from agents (DSS versions, log lines): it writes text only
// (textContent, never innerHTML), and the Content-Security-Policy sent with
// the page allows no inline script, so that markup in a label can neither
// run nor load anything.
package console

import (
	"embed"
	"io/fs"
	"net/http"
	"strings"
)

// AssetsPath is where the console's scripts and styles are served.
const AssetsPath = "/console/assets/"

//go:embed assets
var assets embed.FS

// securityPolicy is sent with every page and asset: scripts, styles and
// calls from FM's own origin only, no framing by another site
// (clickjacking), no plug-ins, forms posted only to FM.
const securityPolicy = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
	"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

// Handler serves the console's page at "/" and its assets under AssetsPath.
func Handler() http.Handler {
	sub, err := fs.Sub(assets, "assets")
	if err != nil {
		panic(err) // the embedded tree is part of the binary
	}
	files := http.StripPrefix(AssetsPath, http.FileServerFS(sub))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", securityPolicy)
		h.Set("X-Frame-Options", "DENY")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cross-Origin-Opener-Policy", "same-origin")
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			h.Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		// A new FM's page must not run an old script: revalidate always.
		h.Set("Cache-Control", "no-cache")
		if r.URL.Path == "/" {
			http.ServeFileFS(w, r, sub, "index.html")
			return
		}
		if strings.HasSuffix(r.URL.Path, "/") {
			http.NotFound(w, r) // no listing of the assets
			return
		}
		files.ServeHTTP(w, r)
	})
}
