package server

import (
	"os"
	"strings"
	"testing"
	"time"
)

// TestAlertRulesMatchPrometheus: every alert the server raises is a rule of
// deploy/prometheus/rules/fm.rules.yml, with its severity and hold time,
// and every rule there is raised by the server but those only an outside
// watcher can see.
func TestAlertRulesMatchPrometheus(t *testing.T) {
	b, err := os.ReadFile("../deploy/prometheus/rules/fm.rules.yml")
	if err != nil {
		t.Fatal(err)
	}
	type rule struct {
		severity string
		holdFor  time.Duration
	}
	rules := map[string]*rule{}
	var cur *rule
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "- alert: "):
			cur = &rule{}
			rules[strings.TrimPrefix(line, "- alert: ")] = cur
		case cur != nil && strings.HasPrefix(line, "for: "):
			if cur.holdFor, err = time.ParseDuration(strings.TrimPrefix(line, "for: ")); err != nil {
				t.Fatal(err)
			}
		case cur != nil && strings.HasPrefix(line, "severity: "):
			cur.severity = strings.TrimPrefix(line, "severity: ")
		}
	}
	if len(rules) < 10 {
		t.Fatalf("read %d rules from fm.rules.yml", len(rules))
	}
	outsideOnly := map[string]bool{"FMReplicaDown": true, "FMProvisionerDown": true, "FMBusDisconnected": true}
	raised := map[string]bool{}
	for _, r := range serverAlertRules {
		raised[r.name] = true
		p, ok := rules[r.name]
		if !ok {
			t.Errorf("the server raises %s, which fm.rules.yml does not have", r.name)
			continue
		}
		if p.severity != r.severity || p.holdFor != r.holdFor {
			t.Errorf("%s: the server's is %s after %s, Prometheus's %s after %s", r.name, r.severity, r.holdFor, p.severity, p.holdFor)
		}
	}
	for name := range rules {
		if !raised[name] && !outsideOnly[name] {
			t.Errorf("fm.rules.yml has %s, which the server does not raise", name)
		}
	}
}
