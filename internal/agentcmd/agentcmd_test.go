package agentcmd

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"
)

func TestMainExitCodes(t *testing.T) {
	tests := []struct {
		name     string
		args     []string
		env      map[string]string
		wantCode int
		wantErr  string
	}{
		{name: "help", args: []string{"-h"}, wantCode: ExitOK, wantErr: "-nats-url"},
		{name: "an unknown flag", args: []string{"--nope"}, wantCode: ExitUsage, wantErr: "not defined"},
		{name: "a stray argument", args: []string{"stray"}, wantCode: ExitUsage, wantErr: `takes no arguments (got "stray")`},
		{name: "a bad log level", args: []string{"--instance", "in-a", "--nats-url", "nats://127.0.0.1:1", "--root", "/", "--data", "/tmp", "--log-level", "loud"}, wantCode: ExitUsage, wantErr: "--log-level"},
		{name: "a bad config", args: []string{"--instance", "bad.id", "--nats-url", "nats://127.0.0.1:1", "--root", "relative", "--data", "/tmp"}, wantCode: ExitUsage, wantErr: "not a valid instance id"},
		{name: "a bad variable", env: map[string]string{"FM_DATA_VOLUME_BYTES": "lots"}, wantCode: ExitUsage, wantErr: "FM_DATA_VOLUME_BYTES"},
		{name: "a missing config file", args: []string{"--config", "/nonexistent/fm-agent.json"}, wantCode: ExitError, wantErr: "fm-agent.json"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			clearFMEnv(t)
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			var stderr bytes.Buffer
			code := Main(context.Background(), "fm-agent", tc.args, &stderr, "test")
			if code != tc.wantCode || !strings.Contains(stderr.String(), tc.wantErr) {
				t.Fatalf("exit %d (want %d), stderr:\n%s", code, tc.wantCode, stderr.String())
			}
		})
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
