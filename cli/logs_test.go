package cli

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/client"
)

// TestFollowLogs: fm instance logs reads page after page while the server
// says there is more, reads on after the sequence it was given (also when
// a page is empty), asks again after a 503 when following, prints what an
// agent shipped without its control characters, and stops when told.
func TestFollowLogs(t *testing.T) {
	var mu sync.Mutex
	var asked []string
	pages := []struct {
		status int
		body   string
	}{
		{200, `{"entries":[{"seq":4,"source":"agent","text":"one\n"}],"next":4,"more":true}`},
		{200, `{"entries":[{"seq":7,"source":"dss","text":"two\u001b[2J\n"}],"next":7}`},
		{503, `{"errorType":"Unavailable","message":"Service unavailable"}`},
		{200, `{"entries":[],"next":7}`},
		{200, `{"entries":[{"seq":9,"source":"agent","text":"three\n"}],"next":9}`},
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		asked = append(asked, r.URL.Query().Encode())
		if len(asked) > len(pages) {
			cancel()
			_ = json.NewEncoder(w).Encode(map[string]any{"entries": []any{}, "next": 9})
			return
		}
		p := pages[len(asked)-1]
		w.WriteHeader(p.status)
		_, _ = w.Write([]byte(p.body))
	}))
	defer srv.Close()
	var out strings.Builder
	c := client.New(srv.URL, client.KeyFile{ID: "k", Secret: "s"})
	if err := followLogs(ctx, &out, c, logsRequest{id: "in-1", since: "10m", follow: true, interval: time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	if want := "agent: one\ndss: two?[2J\nagent: three\n"; out.String() != want {
		t.Fatalf("printed %q, want %q", out.String(), want)
	}
	mu.Lock()
	defer mu.Unlock()
	want := []string{"limit=500&since=10m", "after=4&limit=500", "after=7&limit=500", "after=7&limit=500", "after=7&limit=500", "after=9&limit=500"}
	if strings.Join(asked, " ") != strings.Join(want, " ") {
		t.Fatalf("asked\n%v\nwant\n%v", asked, want)
	}

	// Not following: a failure is the command's.
	asked = nil
	failing := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(503)
		_, _ = w.Write([]byte(`{"errorType":"Unavailable","message":"Service unavailable"}`))
	}))
	defer failing.Close()
	if err := followLogs(context.Background(), &out, client.New(failing.URL, client.KeyFile{ID: "k", Secret: "s"}),
		logsRequest{id: "in-1", source: "agent", since: "10m", interval: time.Millisecond}); err == nil {
		t.Fatal("a 503 without --follow is no error")
	}
}

// TestLogLines: a line split between two messages of a source is one line
// with one prefix; another source's message starts a line of its own;
// JSON lines are each message whole.
func TestLogLines(t *testing.T) {
	var out strings.Builder
	l := logLines{w: &out, prefixed: true}
	for _, e := range []api.LogEntry{
		{Source: "agent", Text: "one\ntw"},
		{Source: "agent", Text: "o\nthr"},
		{Source: "dss", Text: "four\n"},
		{Source: "agent", Text: "five\n"},
	} {
		l.print(e)
	}
	if want := "agent: one\nagent: two\nagent: thr\ndss: four\nagent: five\n"; out.String() != want {
		t.Fatalf("printed %q, want %q", out.String(), want)
	}

	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte(`{"entries":[{"seq":4,"time":"2026-12-06T10:00:00Z","source":"agent","text":"one\n"}],"next":4}`))
	}))
	defer srv.Close()
	out.Reset()
	if err := followLogs(context.Background(), &out, client.New(srv.URL, client.KeyFile{ID: "k", Secret: "s"}),
		logsRequest{id: "in-1", since: "10m", jsonLines: true, interval: time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	if want := `{"seq":4,"time":"2026-12-06T10:00:00Z","source":"agent","text":"one\n"}` + "\n"; out.String() != want {
		t.Fatalf("JSON lines %q, want %q", out.String(), want)
	}
}
