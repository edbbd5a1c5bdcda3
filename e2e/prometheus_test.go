package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/cmdline"
)

// prometheusBins finds Debian's prometheus and promtool, which .ci/run
// installs; FM_REQUIRE_PROMETHEUS makes their absence a failure, so that
// CI cannot skip.
func prometheusBins(t *testing.T) (prom, promtool string) {
	t.Helper()
	prom, err := exec.LookPath("prometheus")
	if err == nil {
		promtool, err = exec.LookPath("promtool")
	}
	if err != nil {
		if os.Getenv("FM_REQUIRE_PROMETHEUS") != "" {
			t.Fatalf("prometheus or promtool not found, and FM_REQUIRE_PROMETHEUS is set: %v", err)
		}
		t.Skip("prometheus not found (apt-get install prometheus)")
	}
	return prom, promtool
}

// promQuery asks Prometheus's HTTP API for an instant vector and returns
// its samples' values.
func promQuery(t *testing.T, base, query string) []string {
	t.Helper()
	resp, err := http.Get(base + "/api/v1/query?query=" + url.QueryEscape(query))
	if err != nil {
		return nil // not up yet
	}
	defer resp.Body.Close()
	var out struct {
		Status string
		Data   struct {
			Result []struct {
				Value [2]any
			}
		}
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || out.Status != "success" {
		return nil
	}
	var values []string
	for _, r := range out.Data.Result {
		values = append(values, fmt.Sprint(r.Value[1]))
	}
	return values
}

// TestPrometheusSeesDSSGoDownAndComeBack: a real Prometheus scrapes fm dev
// (with FM's alert rules loaded) while an instance runs; DSS killed on its
// machine shows as fm_instance_dss_up 0 within two scrapes of the agent
// seeing it (within a second, by its exit check; at worst at its next
// check, 10 s), and 1 again once the agent's watchdog has restarted DSS.
// What fm dev serves passes promtool check metrics.
func TestPrometheusSeesDSSGoDownAndComeBack(t *testing.T) {
	prom, promtool := prometheusBins(t)
	data := t.TempDir()
	t.Cleanup(func() { StopUnder(data) })
	metricsAddr := FreePort(t)
	d := startDevAt(t, data, FreePort(t), "--heartbeat-seconds", "1", "--metrics-addr", metricsAddr)
	id := d.newInstance(t, "prom", "dss-13.4.0-standin")
	d.fm(t, "instance", "provision", id, "--wait")

	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	text, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	check := exec.Command(promtool, "check", "metrics")
	check.Stdin = strings.NewReader(string(text))
	if out, err := check.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}

	rules, err := filepath.Abs("../deploy/prometheus/rules/fm.rules.yml")
	if err != nil {
		t.Fatal(err)
	}
	const scrapeEvery = 2 * time.Second
	conf := filepath.Join(t.TempDir(), "prometheus.yml")
	writeFile(t, conf, fmt.Sprintf(`global:
  scrape_interval: %s
  evaluation_interval: %s
rule_files: [%q]
scrape_configs:
  - job_name: fm-server
    static_configs:
      - targets: [%q]
`, scrapeEvery, scrapeEvery, rules, metricsAddr))
	promAddr := FreePort(t)
	Start(t, prom, nil, "--config.file="+conf, "--storage.tsdb.path="+t.TempDir(),
		"--web.listen-address="+promAddr, "--log.level=warn")
	base := "http://" + promAddr
	dssUp := `fm_instance_dss_up{instance_id="` + id + `"}`
	waitFor := func(what, query, want string, timeout time.Duration) time.Duration {
		t.Helper()
		began := time.Now()
		for deadline := began.Add(timeout); ; time.Sleep(200 * time.Millisecond) {
			got := promQuery(t, base, query)
			if len(got) == 1 && got[0] == want {
				return time.Since(began)
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %s is %v after %s, want %s", what, query, got, timeout, want)
			}
		}
	}
	waitFor("a running DSS", dssUp, "1", time.Minute)
	var rulesAnswer struct {
		Data struct {
			Groups []struct{ Rules []struct{ Health string } }
		}
	}
	if resp, err := http.Get(base + "/api/v1/rules"); err != nil {
		t.Fatal(err)
	} else {
		_ = json.NewDecoder(resp.Body).Decode(&rulesAnswer)
		resp.Body.Close()
	}
	var loaded int
	for _, g := range rulesAnswer.Data.Groups {
		for _, r := range g.Rules {
			loaded++
			if r.Health == "err" {
				t.Errorf("a rule of fm.rules.yml fails in Prometheus: %+v", g)
			}
		}
	}
	if loaded < 10 {
		t.Errorf("Prometheus loaded %d of FM's rules", loaded)
	}

	pids := cmdline.Find(filepath.Join(data, "local", "volumes", id, "dataiku", "dss_data"))
	if len(pids) == 0 {
		t.Fatal("no DSS process found")
	}
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	// The agent sees DSS's processes gone within a second (its exit
	// check; at worst its next check, every 10 s), and says so in its
	// status at once; then a scrape or two. The bound is the worst case:
	// what it took is logged.
	down := waitFor("DSS killed", dssUp, "0", 10*time.Second+2*scrapeEvery+5*time.Second)
	t.Logf("fm_instance_dss_up went to 0 in Prometheus %s after DSS was killed", down.Round(100*time.Millisecond))
	back := waitFor("DSS restarted by the agent's watchdog", dssUp, "1", 2*time.Minute)
	t.Logf("and back to 1 %s later", back.Round(100*time.Millisecond))
	waitFor("the agent kept answering", `fm_instance_agent_up{instance_id="`+id+`"}`, "1", 10*time.Second)
}

func writeFile(t *testing.T, path, text string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
}
