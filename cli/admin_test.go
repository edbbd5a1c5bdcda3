package cli

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestAuditFollowReadsOnAfterTheLastSequence: fm audit --follow asks for
// the records after the last one it printed, its sequence written as an
// integer however large (a JSON number decodes to a float64, which
// fmt.Sprint writes 1.234567e+06 from a million on); following a kind of
// object with no record yet reads on from the trail's end, not its start.
func TestAuditFollowReadsOnAfterTheLastSequence(t *testing.T) {
	for _, c := range []struct {
		name      string
		ofKind    string // the last record of the kind, if any
		wantAfter string
	}{
		{"records of the kind", `[{"seq":1234567,"who":"key:a","action":"POST /x","object":"instances","outcome":"ok"}]`, "after=1234567&limit=1000&object=instances"},
		{"none of the kind yet", `[]`, "after=2345678&limit=1000&object=instances"},
	} {
		t.Run(c.name, func(t *testing.T) {
			var mu sync.Mutex
			var asked []string
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				mu.Lock()
				defer mu.Unlock()
				q := r.URL.Query()
				asked = append(asked, q.Encode())
				switch {
				case !q.Has("object"): // the trail's last record, of any kind
					_, _ = w.Write([]byte(`[{"seq":2345678,"who":"key:a","action":"DELETE /y","object":"api-keys","outcome":"ok"}]`))
				case !q.Has("after"):
					_, _ = w.Write([]byte(c.ofKind))
				default:
					_, _ = w.Write([]byte(`[]`))
					// Stopped while it waits to ask again (a second apart).
					time.AfterFunc(200*time.Millisecond, cancel)
				}
			}))
			defer srv.Close()
			keyFile := filepath.Join(t.TempDir(), "key.json")
			if err := os.WriteFile(keyFile, []byte(`{"id":"k","secret":"s"}`), 0o600); err != nil {
				t.Fatal(err)
			}
			var out, errOut strings.Builder
			err := runAudit(ctx, Env{Stdout: &out, Stderr: &errOut}, auditResource,
				[]string{"--follow", "--object", "instances", "--url", srv.URL, "--key-file", keyFile})
			if err != nil {
				t.Fatalf("%v: %s", err, errOut.String())
			}
			mu.Lock()
			defer mu.Unlock()
			// The trail's end before each page; then the page.
			if len(asked) < 4 || asked[0] != "limit=1" || asked[2] != "limit=1" || asked[3] != c.wantAfter {
				t.Fatalf("asked %q", asked)
			}
			if strings.Contains(c.ofKind, "POST /x") != strings.Contains(out.String(), "POST /x") || strings.Contains(out.String(), "DELETE /y") {
				t.Fatalf("printed %q", out.String())
			}
		})
	}
}
