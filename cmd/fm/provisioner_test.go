package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rs/zerolog"
)

// TestAgentBinaryBeside: the slim build beside fm is used only if it is the
// one whose digest fm carries; otherwise fm itself, with a warning.
func TestAgentBinaryBeside(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "fm")
	slim := filepath.Join(dir, agentBinaryName)
	if err := os.WriteFile(slim, []byte("the slim build"), 0o755); err != nil {
		t.Fatal(err)
	}
	digest, err := fileSHA256(slim)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, want, stamp string
		setup             func()
		warns             bool
	}{
		{"the one built with fm", slim, digest, func() {}, false},
		{"another build", exe, strings.Repeat("0", 64), func() {}, true},
		{"fm built without a digest", exe, "", func() {}, true},
		{"not executable", exe, digest, func() { os.Chmod(slim, 0o644) }, false},
		{"none beside fm", exe, digest, func() { os.Remove(slim) }, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.setup()
			var logs bytes.Buffer
			if got := agentBinaryBeside(exe, tc.stamp, zerolog.New(&logs)); got != tc.want {
				t.Fatalf("got %s, want %s", got, tc.want)
			}
			if warned := strings.Contains(logs.String(), `"level":"warn"`); warned != tc.warns {
				t.Fatalf("warned %v, want %v: %s", warned, tc.warns, logs.String())
			}
		})
	}
}
