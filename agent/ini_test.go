package agent

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rs/zerolog"
)

// TestSetINI: install.ini's keys are set in place, added to their section,
// or to a new one, everything else kept; a key that must exist and does not
// is refused, the file unchanged.
func TestSetINI(t *testing.T) {
	const base = "[general]\nnodetype = design\n\n[server]\nport = 10000\n"
	tests := []struct {
		name      string
		section   string
		values    map[string]string
		mustExist bool
		want      string
		err       string
	}{
		{name: "in place", section: "server", values: map[string]string{"port": "11000"}, mustExist: true,
			want: "[general]\nnodetype = design\n\n[server]\nport = 11000\n"},
		{name: "a new section", section: "javaopts", values: map[string]string{"jek.xmx": "2g", "backend.xmx": "8g"},
			want: base + "\n[javaopts]\nbackend.xmx = 8g\njek.xmx = 2g\n"},
		{name: "added to its section, before the next", section: "general", values: map[string]string{"extra": "1"},
			want: "[general]\nnodetype = design\nextra = 1\n\n[server]\nport = 10000\n"},
		{name: "a key that must exist", section: "server", values: map[string]string{"host": "x"}, mustExist: true, want: base, err: "no [server] host"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			data := t.TempDir()
			m := newMachine(Config{RootDir: t.TempDir(), DataDir: data, ServiceManager: "none", DSSUser: currentUser(t)}, zerolog.Nop())
			if err := os.MkdirAll(m.dssDir, 0o755); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(m.dssDir, "install.ini")
			if err := os.WriteFile(path, []byte(base), 0o644); err != nil {
				t.Fatal(err)
			}
			err := m.setINI(context.Background(), tc.section, tc.values, tc.mustExist)
			if (err == nil) != (tc.err == "") || err != nil && !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("err = %v, want %q", err, tc.err)
			}
			if got, _ := os.ReadFile(path); string(got) != tc.want {
				t.Fatalf("install.ini:\n%s\nwant:\n%s", got, tc.want)
			}
		})
	}
}
