package startup

import (
	"bytes"
	"errors"
	"flag"
	"io"
	"os"
	"slices"
	"strings"
	"testing"
)

func TestParseFlags(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		wantPos []string
		wantOut string
		wantN   int
		wantErr string
	}{
		{name: "flags after positional arguments", args: []string{"a", "--out", "x", "b"}, wantPos: []string{"a", "b"}, wantOut: "x"},
		{name: "a double dash ends the flags", args: []string{"--", "--out", "x"}, wantPos: []string{"--out", "x"}},
		{name: "the environment sets what the line does not", env: map[string]string{"FM_OUT": "env", "FM_MAX_N": "7"}, wantOut: "env", wantN: 7},
		{name: "the line wins over the environment", args: []string{"--out", "line"}, env: map[string]string{"FM_OUT": "env"}, wantOut: "line"},
		{name: "a bad variable names itself", env: map[string]string{"FM_MAX_N": "many"}, wantErr: `FM_MAX_N="many"`},
		{name: "a bad flag", args: []string{"--nope"}, wantErr: "not defined"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			clearFMEnv(t)
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			fs := flag.NewFlagSet("test", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			out := fs.String("out", "", "")
			n := fs.Int("max-n", 0, "")
			pos, err := ParseFlags(fs, tc.args)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
				if _, isEnv := tc.env["FM_MAX_N"]; isEnv {
					var envErr *EnvError
					if !errors.As(err, &envErr) || envErr.Name != "FM_MAX_N" {
						t.Fatalf("%v is not an EnvError naming FM_MAX_N", err)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(pos, tc.wantPos) || *out != tc.wantOut || *n != tc.wantN {
				t.Fatalf("got %q, out %q, n %d", pos, *out, *n)
			}
		})
	}
}

func TestNewLogger(t *testing.T) {
	for _, tc := range []struct{ format, level, wantErr string }{
		{"json", "info", ""},
		{"console", "debug", ""},
		{"xml", "info", "--log-format"},
		{"json", "loud", "--log-level"},
		{"json", "", "--log-level"},
	} {
		var buf bytes.Buffer
		log, err := NewLogger(tc.format, tc.level, &buf)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%s/%s: error %v, want %q", tc.format, tc.level, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s/%s: %v", tc.format, tc.level, err)
		}
		log.Info().Msg("hello")
		if !strings.Contains(buf.String(), "hello") {
			t.Errorf("%s/%s: the logger wrote %q", tc.format, tc.level, buf.String())
		}
	}
}

// clearFMEnv unsets every FM_* variable for the test, so that the shell's
// do not change what the test sees.
func clearFMEnv(t *testing.T) {
	for _, kv := range os.Environ() {
		if name, _, _ := strings.Cut(kv, "="); strings.HasPrefix(name, "FM_") {
			t.Setenv(name, "")
			os.Unsetenv(name)
		}
	}
}
