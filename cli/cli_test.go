package cli

import (
	"encoding/json"
	"flag"
	"io"
	"reflect"
	"testing"
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
