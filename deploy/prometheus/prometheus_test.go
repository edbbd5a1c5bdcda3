package prometheus

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// promtool is Prometheus's own checker (Debian's prometheus package, which
// .ci/run installs): required where FM_REQUIRE_PROMETHEUS is set, so that
// CI cannot skip it.
func promtool(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("FM_REQUIRE_PROMETHEUS") != "" {
			t.Fatal("promtool not found, and FM_REQUIRE_PROMETHEUS is set")
		}
		t.Skip("promtool not found (apt-get install prometheus)")
	}
	return path
}

func TestPromtoolAcceptsTheFiles(t *testing.T) {
	bin := promtool(t)
	for _, args := range [][]string{
		{"check", "config", "prometheus.yml"},
		{"check", "rules", "rules/fm.rules.yml"},
		{"test", "rules", "rules/fm.rules.test.yml"},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			out, err := exec.Command(bin, args...).CombinedOutput()
			if err != nil {
				t.Fatalf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
			}
		})
	}
}

// servedMetrics are the names of the metrics FM's server and provisioner
// define, read from their source: every fm_ name given to a metric.
func servedMetrics(t *testing.T) map[string]bool {
	t.Helper()
	def := regexp.MustCompile(`(?:Name:\s*|NewDesc\(|instanceDesc\()"(fm_[a-z0-9_]+)"`)
	names := map[string]bool{}
	for _, dir := range []string{"../../server", "../../provisioner"} {
		files, err := filepath.Glob(filepath.Join(dir, "*.go"))
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range files {
			if strings.HasSuffix(f, "_test.go") {
				continue
			}
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range def.FindAllSubmatch(b, -1) {
				names[string(m[1])] = true
			}
		}
	}
	if len(names) < 20 {
		t.Fatalf("found only %d metrics in FM's source: %v", len(names), names)
	}
	return names
}

// TestRulesAndDashboardUseServedMetrics: a metric renamed in the code, or
// misspelt in a rule or a panel, is caught here rather than by an alert
// that never fires.
func TestRulesAndDashboardUseServedMetrics(t *testing.T) {
	served := servedMetrics(t)
	used := regexp.MustCompile(`\bfm_[a-z0-9_]+`)
	for _, f := range []string{"rules/fm.rules.yml", "grafana/fm-dashboard.json"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var unknown []string
		for _, name := range used.FindAllString(string(b), -1) {
			base := name
			for _, suffix := range []string{"_bucket", "_sum", "_count"} {
				if trimmed, ok := strings.CutSuffix(name, suffix); ok && served[trimmed] {
					base = trimmed
				}
			}
			if !served[base] && !slices.Contains(unknown, name) {
				unknown = append(unknown, name)
			}
		}
		if len(unknown) > 0 {
			t.Errorf("%s uses metrics FM does not serve: %v", f, unknown)
		}
	}
}
