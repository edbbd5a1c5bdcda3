package cli

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
)

func TestParseFlagsInterspersedAndEnv(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		wantPos []string
		wantOut string
		wantURL string
		wantErr bool
	}{
		{"flags after id", []string{"in-1", "--output", "json"}, nil, []string{"in-1"}, "json", "def", false},
		{"flags before and after", []string{"--url", "u", "a", "b", "--output=json"}, nil, []string{"a", "b"}, "json", "u", false},
		{"env fills missing flag", []string{"x"}, map[string]string{"FM_URL": "from-env"}, []string{"x"}, "table", "from-env", false},
		{"flag beats env", []string{"--url", "flag"}, map[string]string{"FM_URL": "env"}, nil, "table", "flag", false},
		{"double dash ends flags", []string{"--", "--output"}, nil, []string{"--output"}, "table", "def", false},
		{"unknown flag", []string{"--nope"}, nil, nil, "", "", true},
		{"bad env value", nil, map[string]string{"FM_COUNT": "many"}, nil, "", "", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			fs := flag.NewFlagSet("t", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			out := fs.String("output", "table", "")
			url := fs.String("url", "def", "")
			fs.Int("count", 0, "")
			pos, err := ParseFlags(fs, tc.args)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if tc.wantErr {
				return
			}
			if !reflect.DeepEqual(pos, tc.wantPos) || *out != tc.wantOut || *url != tc.wantURL {
				t.Fatalf("pos %q output %q url %q", pos, *out, *url)
			}
		})
	}
}

func TestObjFieldApply(t *testing.T) {
	tests := []struct {
		f       objField
		text    string
		want    string
		wantErr bool
	}{
		{objField{"label", "label", "string", ""}, "x y", `{"label":"x y"}`, false},
		{objField{"size", "dataVolumeSizeGB", "int", ""}, "50", `{"dataVolumeSizeGB":50}`, false},
		{objField{"size", "dataVolumeSizeGB", "int", ""}, "fifty", "", true},
		{objField{"on", "enableAutomatedSnapshot", "bool", ""}, "true", `{"enableAutomatedSnapshot":true}`, false},
		{objField{"on", "enableAutomatedSnapshot", "bool", ""}, "sure", "", true},
		{objField{"tags", "fmTags", "list", ""}, "a, b,,c", `{"fmTags":["a","b","c"]}`, false},
		{objField{"tags", "fmTags", "list", ""}, "", `{"fmTags":[]}`, false},
		{objField{"tags", "cloudTags", "map", ""}, "k=v, team = data", `{"cloudTags":{"k":"v","team":"data"}}`, false},
		{objField{"tags", "cloudTags", "map", ""}, "novalue", "", true},
		{objField{"kit-path", "kit.path", "string", ""}, "/k.tgz", `{"kit":{"path":"/k.tgz"}}`, false},
	}
	for _, tc := range tests {
		obj := map[string]any{}
		err := tc.f.apply(obj, tc.text)
		if (err != nil) != tc.wantErr {
			t.Fatalf("%s %q: err %v", tc.f.flag, tc.text, err)
		}
		if tc.wantErr {
			continue
		}
		b, _ := json.Marshal(obj)
		if string(b) != tc.want {
			t.Errorf("%s %q: got %s, want %s", tc.f.flag, tc.text, b, tc.want)
		}
	}
}

func TestPrintStatus(t *testing.T) {
	var view api.Fleet
	view.Summary.Instances = 3
	view.Summary.ByState = map[string]int{"running": 2, "failed": 1}
	view.Summary.ByNodeType = map[string]int{"design": 3}
	view.Summary.ByDSSVersion = map[string]int{"14.0.0": 1, "13.4.0": 1}
	view.Summary.DSSDown, view.Summary.FailedInstances = 1, 1
	for _, tc := range []struct {
		name  string
		color bool
		want  string
	}{
		{"plain", false, "instances   3 (running 2, failed 1)\nnode types  design 3\nDSS         13.4.0 1, 14.0.0 1\n" +
			"health      0 agents not responding, 1 DSS down, 0 data volumes above 80%, 1 failed\noperations  0 running\n"},
		{"on a terminal", true, "instances   3 (running 2, failed 1)\nnode types  design 3\nDSS         13.4.0 1, 14.0.0 1\n" +
			"health      0 agents not responding, \x1b[31m1 DSS down\x1b[0m, 0 data volumes above 80%, \x1b[31m1 failed\x1b[0m\noperations  0 running\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b strings.Builder
			printStatus(&b, view, tc.color)
			if b.String() != tc.want {
				t.Fatalf("got\n%q\nwant\n%q", b.String(), tc.want)
			}
		})
	}
	var empty api.Fleet
	var b strings.Builder
	printStatus(&b, empty, false)
	if !strings.HasPrefix(b.String(), "instances   0\nnode types  none\n") {
		t.Fatalf("an empty fleet:\n%s", b.String())
	}
}

func TestPrintable(t *testing.T) {
	if got := printable("14.0.0\x1b[2J\nfake row\tx\u0085"); got != `14.0.0?[2J\nfake row?x?` {
		t.Fatalf("printable: %q", got)
	}
	if got := cellText("é ok"); got != "é ok" {
		t.Fatalf("printable text changed: %q", got)
	}
}

// TestStepPrinterShowsProgress: each new step is shown once, and a step
// rewritten in place (a download's progress) is shown again when it
// changed, not when it did not.
func TestStepPrinterShowsProgress(t *testing.T) {
	var out strings.Builder
	show := stepPrinter(Env{Stderr: &out}, "table")
	at := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	step := func(status, msg string, sec int) api.ProgressStep {
		return api.ProgressStep{Name: "fetch-kit", Status: status, Message: msg, Time: at.Add(time.Duration(sec) * time.Second)}
	}
	future := func(steps ...api.ProgressStep) api.Future {
		return api.Future{Progress: api.Progress{Steps: steps}}
	}
	show(future(step("started", "", 0)))
	show(future(step("started", "", 0), step("progress", "kit: 1 MiB of 3 MiB (33%)", 5)))
	show(future(step("started", "", 0), step("progress", "kit: 1 MiB of 3 MiB (33%)", 5))) // unchanged
	show(future(step("started", "", 0), step("progress", "kit: 2 MiB of 3 MiB (66%)", 10)))
	show(future(step("started", "", 0), step("progress", "kit: 2 MiB of 3 MiB (66%)", 10), step("ok", "kit ready", 12)))
	got := out.String()
	for _, want := range []string{"33%", "66%", "kit ready"} {
		if strings.Count(got, want) != 1 {
			t.Errorf("%q shown %d times:\n%s", want, strings.Count(got, want), got)
		}
	}
	if n := strings.Count(got, "\n"); n != 4 {
		t.Errorf("%d lines, want 4:\n%s", n, got)
	}
}

// TestStepPrinterAtTheCap: the server keeps an operation's last 200
// steps; steps that arrive once it holds 200 are shown, each once.
func TestStepPrinterAtTheCap(t *testing.T) {
	var out strings.Builder
	show := stepPrinter(Env{Stderr: &out}, "table")
	at := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	steps := func(from, to int) []api.ProgressStep {
		var s []api.ProgressStep
		for i := from; i < to; i++ {
			s = append(s, api.ProgressStep{Name: fmt.Sprintf("m%d", i), Status: "ok", Time: at.Add(time.Duration(i) * time.Second)})
		}
		return s
	}
	show(api.Future{Progress: api.Progress{Steps: steps(0, 200)}})
	out.Reset()
	show(api.Future{Progress: api.Progress{Steps: steps(3, 203)}}) // three more, the first three trimmed
	if got := out.String(); strings.Count(got, "\n") != 3 || !strings.Contains(got, " m200 ") || !strings.Contains(got, " m202 ") {
		t.Fatalf("after three more steps at the cap:\n%s", got)
	}
}
