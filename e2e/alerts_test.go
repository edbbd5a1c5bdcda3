package e2e

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestAWebhookHearsAnAgentStopAndComeBack: fm dev with a webhook set by
// `fm alert webhook`; an instance's agent stops answering (frozen); the
// receiver gets FMAgentNotResponding once, and
// its resolution once when the agent answers again, and nothing else
// about the instance. Then the agent is killed outright: in fm dev that is
// the machine lost, and FMInstanceFailed fires, resolved once the instance
// is started again.
func TestAWebhookHearsAnAgentStopAndComeBack(t *testing.T) {
	type told struct {
		Status string            `json:"status"`
		Labels map[string]string `json:"labels"`
	}
	var mu sync.Mutex
	var got []told
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		var msg struct{ Alerts []told }
		if err := json.Unmarshal(body, &msg); err != nil {
			t.Errorf("webhook body: %v: %s", err, body)
		}
		mu.Lock()
		got = append(got, msg.Alerts...)
		mu.Unlock()
	}))
	t.Cleanup(hook.Close)
	of := func(id string) []told {
		mu.Lock()
		defer mu.Unlock()
		var out []told
		for _, a := range got {
			if a.Labels["instance_id"] == id {
				out = append(out, a)
			}
		}
		return out
	}
	waitTold := func(id string, n int, within time.Duration) []told {
		t.Helper()
		for deadline := time.Now().Add(within); ; time.Sleep(200 * time.Millisecond) {
			if a := of(id); len(a) >= n {
				return a
			}
			if time.Now().After(deadline) {
				t.Fatalf("the webhook was told %d things of %s in %s, want %d: %+v", len(of(id)), id, within, n, of(id))
			}
		}
	}

	data := t.TempDir()
	t.Cleanup(func() { StopUnder(data) })
	d := startDevAt(t, data, FreePort(t), "--heartbeat-seconds", "1", "--alert-interval", "1s", "--alert-hold", "2s")
	d.fm(t, "alert", "webhook", "--set", hook.URL+"/fm")
	if out := d.fm(t, "alert", "webhook"); !strings.Contains(out, hook.URL+"/fm") {
		t.Fatalf("fm alert webhook shows: %s", out)
	}
	id := d.newInstance(t, "alerts", "dss-13.4.0-standin")
	d.fm(t, "instance", "provision", id, "--wait")

	raw, err := os.ReadFile(filepath.Join(data, "local", "machines", id, "agent.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(raw)))
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resumed := sync.OnceFunc(func() { _ = syscall.Kill(pid, syscall.SIGCONT) })
	t.Cleanup(resumed)
	// Silent for three heartbeats and 2 s, then held 2 s, then the next look.
	fired := waitTold(id, 1, 30*time.Second)
	if a := fired[0]; a.Status != "firing" || a.Labels["alertname"] != "FMAgentNotResponding" {
		t.Fatalf("told first: %+v", a)
	}
	if out := d.fm(t, "alert", "list"); !strings.Contains(out, "FMAgentNotResponding") || !strings.Contains(out, id) {
		t.Errorf("fm alert list while it fires:\n%s", out)
	}
	resumed()
	all := waitTold(id, 2, 30*time.Second)
	if a := all[1]; a.Status != "resolved" || a.Labels["alertname"] != "FMAgentNotResponding" {
		t.Fatalf("told second: %+v", a)
	}
	time.Sleep(5 * time.Second) // five more looks
	if all := of(id); len(all) != 2 {
		t.Fatalf("the webhook was told %d things of the instance, want 2 (fired, resolved): %+v", len(all), all)
	}

	// Killed outright: in fm dev the machine is lost (the agent's process is
	// the machine), and the instance fails; started again, it is resolved.
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	named := func(name, status string) int {
		n := 0
		for _, a := range of(id) {
			if a.Labels["alertname"] == name && a.Status == status {
				n++
			}
		}
		return n
	}
	waitNamed := func(name, status string) {
		t.Helper()
		for deadline := time.Now().Add(45 * time.Second); named(name, status) == 0; time.Sleep(200 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("no %s %s in 45 s: %+v", name, status, of(id))
			}
		}
	}
	waitNamed("FMInstanceFailed", "firing")
	d.fm(t, "instance", "start", id, "--wait")
	waitNamed("FMInstanceFailed", "resolved")
	time.Sleep(3 * time.Second)
	if named("FMInstanceFailed", "firing") != 1 || named("FMInstanceFailed", "resolved") != 1 {
		t.Fatalf("FMInstanceFailed told more than once each: %+v", of(id))
	}
}
