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
// fmt.Sprint writes 1.234567e+06 from a million on).
func TestAuditFollowReadsOnAfterTheLastSequence(t *testing.T) {
	var mu sync.Mutex
	var asked []string
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		asked = append(asked, r.URL.Query().Encode())
		if len(asked) == 1 {
			_, _ = w.Write([]byte(`[{"seq":1234567,"who":"key:a","action":"POST /x","object":"instances","outcome":"ok"}]`))
			return
		}
		_, _ = w.Write([]byte(`[]`))
		if len(asked) == 2 {
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
	if len(asked) < 2 || asked[1] != "after=1234567&limit=1000&object=instances" {
		t.Fatalf("asked %q", asked)
	}
	if !strings.Contains(out.String(), "POST /x") {
		t.Fatalf("printed %q", out.String())
	}
}
