package agent

import (
	"context"
	"encoding/json"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/rs/zerolog"
)

// iniMachine is a machine whose install.ini holds file.
func iniMachine(t *testing.T, file string) (*machine, string) {
	t.Helper()
	m := newMachine(Config{RootDir: t.TempDir(), DataDir: t.TempDir(), ServiceManager: "none", DSSUser: currentUser(t)}, zerolog.Nop())
	if err := os.MkdirAll(m.dssDir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(m.dssDir, "install.ini")
	if err := os.WriteFile(path, []byte(file), 0o644); err != nil {
		t.Fatal(err)
	}
	return m, path
}

// TestSetINI: install.ini's keys are set in place, added to their section,
// or to a new one, everything else kept, as Python's configparser (which DSS
// reads the file with) sees the file: key: value, keys in any case, a header
// with a comment after it, spaces inside brackets, CRLF, continuation lines.
// A key that must exist and does not is refused, as is a file configparser
// refuses or an edit it would not read back as asked, the file unchanged.
func TestSetINI(t *testing.T) {
	const base = "[general]\nnodetype = design\n\n[server]\nport = 10000\n"
	tests := []struct {
		name      string
		file      string // base if empty
		section   string
		values    map[string]string
		mustExist bool
		want      string // the file unchanged if empty
		err       string
	}{
		{name: "in place", section: "server", values: map[string]string{"port": "11000"}, mustExist: true,
			want: "[general]\nnodetype = design\n\n[server]\nport = 11000\n"},
		{name: "a new section", section: "javaopts", values: map[string]string{"jek.xmx": "2g", "backend.xmx": "8g"},
			want: base + "\n[javaopts]\nbackend.xmx = 8g\njek.xmx = 2g\n"},
		{name: "added to its section, before the next", section: "general", values: map[string]string{"extra": "1"},
			want: "[general]\nnodetype = design\nextra = 1\n\n[server]\nport = 10000\n"},
		{name: "a key that must exist", section: "server", values: map[string]string{"host": "x"}, mustExist: true, err: "no [server] host"},

		{name: "key: value, rewritten key = value", file: "[server]\nport: 10000\nhost:x\n", section: "server", values: map[string]string{"port": "11000"}, mustExist: true,
			want: "[server]\nport = 11000\nhost:x\n"},
		{name: "split at the first = or :", file: "[server]\nport : 1 = 2\n", section: "server", values: map[string]string{"port": "3"}, mustExist: true,
			want: "[server]\nport = 3\n"},
		{name: "a key in another case", file: "[server]\nPort = 10000\n", section: "server", values: map[string]string{"port": "11000"}, mustExist: true,
			want: "[server]\nPort = 11000\n"},
		{name: "a header with a comment", file: "[javaopts] ; heaps\nbackend.xmx = 4g\n", section: "javaopts", values: map[string]string{"backend.xmx": "8g"},
			want: "[javaopts] ; heaps\nbackend.xmx = 8g\n"},
		{name: "a header is up to the last ]", file: "[server] ; [x]\nport = 1\n", section: "server", values: map[string]string{"port": "2"}, mustExist: true,
			err: "no [server] port"},
		{name: "spaces in brackets are another section", file: "[ javaopts ]\nbackend.xmx = 4g\n", section: "javaopts", values: map[string]string{"backend.xmx": "8g"},
			want: "[ javaopts ]\nbackend.xmx = 4g\n\n[javaopts]\nbackend.xmx = 8g\n"},
		{name: "CRLF in place", file: "[general]\r\nnodetype = design\r\n\r\n[server]\r\nport = 10000\r\n", section: "server", values: map[string]string{"port": "11000"}, mustExist: true,
			want: "[general]\r\nnodetype = design\r\n\r\n[server]\r\nport = 11000\r\n"},
		{name: "CRLF added", file: "[general]\r\nnodetype = design\r\n", section: "general", values: map[string]string{"extra": "1"},
			want: "[general]\r\nnodetype = design\r\nextra = 1\r\n"},
		{name: "CRLF new section", file: "[general]\r\nnodetype = design\r\n", section: "javaopts", values: map[string]string{"jek.xmx": "2g"},
			want: "[general]\r\nnodetype = design\r\n\r\n[javaopts]\r\njek.xmx = 2g\r\n"},
		{name: "continuation lines dropped", file: "[javaopts]\nbackend.xmx = 4g\n  -Xss1m\n\n  # kept\n  more\njek.xmx = 1g\n", section: "javaopts", values: map[string]string{"backend.xmx": "8g"},
			want: "[javaopts]\nbackend.xmx = 8g\n\n  # kept\njek.xmx = 1g\n"},
		{name: "added after a value's continuation line", file: "[javaopts]\nbackend.xmx = 4g\n  -Xss1m\n\n[server]\n", section: "javaopts", values: map[string]string{"jek.xmx": "1g"},
			want: "[javaopts]\nbackend.xmx = 4g\n  -Xss1m\njek.xmx = 1g\n\n[server]\n"},
		{name: "indentation kept", file: "[javaopts]\n  backend.xmx = 4g\n  jek.xmx = 1g\n", section: "javaopts", values: map[string]string{"backend.xmx": "8g", "fek.xmx": "2g"},
			want: "[javaopts]\n  backend.xmx = 8g\n  jek.xmx = 1g\n  fek.xmx = 2g\n"},
		{name: "no inline comments", file: "[server]\nport = 10000 ; base\n", section: "server", values: map[string]string{"port": "11000"}, mustExist: true,
			want: "[server]\nport = 11000\n"},
		{name: "added before the section's trailing comment", file: "[server]\nport = 1\n# heaps below\n\n[javaopts]\n", section: "server", values: map[string]string{"host": "x"},
			want: "[server]\nport = 1\nhost = x\n# heaps below\n\n[javaopts]\n"},
		{name: "no final line ending", file: "[server]\nport = 10000", section: "server", values: map[string]string{"host": "x"},
			want: "[server]\nport = 10000\nhost = x\n"},
		{name: "a duplicate key", file: "[server]\nport = 1\nPORT = 2\n", section: "server", values: map[string]string{"port": "3"}, mustExist: true,
			err: "[server] port again"},
		{name: "a duplicate section", file: "[server]\nport = 1\n[javaopts]\n[server]\nhost = x\n", section: "javaopts", values: map[string]string{"jek.xmx": "1g"},
			err: "section [server] again"},
		{name: "a line configparser cannot parse", file: "[server]\nport = 1\nbogus\n", section: "server", values: map[string]string{"port": "2"}, mustExist: true,
			err: "line 3"},
		{name: "a value with a line break", section: "server", values: map[string]string{"port": "1\n2"}, mustExist: true,
			err: "would not read"},
		// [server] follows a header: a key before it would make it the
		// key's continuation line.
		{name: "a new key would swallow an indented header", file: "[javaopts]\n  [server]\nport = 1\n", section: "javaopts", values: map[string]string{"jek.xmx": "1g"},
			err: "would not read"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			file := tc.file
			if file == "" {
				file = base
			}
			m, path := iniMachine(t, file)
			err := m.setINI(context.Background(), tc.section, tc.values, tc.mustExist)
			if (err == nil) != (tc.err == "") || err != nil && !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("err = %v, want %q", err, tc.err)
			}
			want := tc.want
			if want == "" {
				want = file
			}
			if got, _ := os.ReadFile(path); string(got) != want {
				t.Fatalf("install.ini:\n%q\nwant:\n%q", got, want)
			}
		})
	}
}

// readINITests are install.ini files and what configparser makes of them
// (checked against Python's by TestReadINIAsPython): their values, or an
// error of configparser's strict mode or of its parsing.
var readINITests = []struct {
	name, file string
	want       map[string]string
	err        string
}{
	{name: "key = value", file: "[general]\nnodetype = design\n\n[server]\nport = 10000\n",
		want: map[string]string{"general.nodetype": "design", "server.port": "10000"}},
	{name: "key: value", file: "[server]\nport: 10000\nhost:x = y\n",
		want: map[string]string{"server.port": "10000", "server.host": "x = y"}},
	{name: "keys lower-cased, sections not", file: "[Server]\nPORT = 1\n",
		want: map[string]string{"Server.port": "1"}},
	{name: "a header with a comment", file: "[javaopts] ; heaps\nbackend.xmx = 4g\n",
		want: map[string]string{"javaopts.backend.xmx": "4g"}},
	{name: "a header is up to the last ]", file: "[a] ; [b]\nx = 1\n[]]\ny = 2\n",
		want: map[string]string{"a] ; [b.x": "1", "].y": "2"}},
	{name: "spaces in brackets kept", file: "[ javaopts ]\nbackend.xmx = 4g\n",
		want: map[string]string{" javaopts .backend.xmx": "4g"}},
	{name: "CRLF and CR", file: "[server]\r\nport = 1\r\nhost = x\rname = y\r\n",
		want: map[string]string{"server.port": "1", "server.host": "x", "server.name": "y"}},
	{name: "comments, no inline ones", file: "# top\n; top\n[server]\n  # indented\nport = 8 ; note\nhost = a # b\n",
		want: map[string]string{"server.port": "8 ; note", "server.host": "a # b"}},
	{name: "continuation lines", file: "[j]\nk = a\n  b\n\n  # c\n\tc  \n\nl =\n  d\n",
		want: map[string]string{"j.k": "a\nb\n\nc", "j.l": "\nd"}},
	{name: "an indented header after a key continues it", file: "[a]\nx = 1\n  [b]\ny = 2\n",
		want: map[string]string{"a.x": "1\n[b]", "a.y": "2"}},
	{name: "an indented header after a header", file: "[a]\n  [b]\n  y = 2\n",
		want: map[string]string{"b.y": "2"}},
	{name: "indented keys", file: "[a]\n  x = 1\n  y = 2\n   z\n w = 3\n",
		want: map[string]string{"a.x": "1", "a.y": "2\nz", "a.w": "3"}},
	{name: "Python whitespace", file: "[a]\n\x1fx = 1\x1f\n",
		want: map[string]string{"a.x": "1"}},
	{name: "DEFAULT, twice", file: "[DEFAULT]\nx = 1\n[a]\ny = 2\n[b]\nx = 3\n[DEFAULT]\nz = 4\n",
		want: map[string]string{"DEFAULT.x": "1", "DEFAULT.z": "4", "a.x": "1", "a.y": "2", "a.z": "4", "b.x": "3", "b.z": "4"}},
	{name: "a duplicate key", file: "[server]\nport = 1\nPort = 2\n", err: "[server] port again"},
	{name: "a duplicate section", file: "[server]\n[a]\n[server]\n", err: "section [server] again"},
	{name: "a duplicate DEFAULT key", file: "[DEFAULT]\nx = 1\n[DEFAULT]\nx = 2\n", err: "[DEFAULT] x again"},
	{name: "a key before any section", file: "# c\nport = 1\n[server]\n", err: "line 2"},
	{name: "no key", file: "[server]\n= 1\n", err: "line 2"},
	{name: "not a key", file: "[server]\n[]\n", err: "line 2"},
}

// TestReadINI: install.ini's values are what configparser makes of them.
func TestReadINI(t *testing.T) {
	for _, tc := range readINITests {
		t.Run(tc.name, func(t *testing.T) {
			m, _ := iniMachine(t, tc.file)
			got, err := m.readINI()
			if (err == nil) != (tc.err == "") || err != nil && !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("err = %v, want %q", err, tc.err)
			}
			if err == nil && !maps.Equal(got, tc.want) {
				t.Fatalf("readINI = %q, want %q", got, tc.want)
			}
		})
	}
}

// TestReadINIAsPython: readINITests are what Python's configparser makes of
// the files (one python3 for them all). Skipped without python3.
func TestReadINIAsPython(t *testing.T) {
	python, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("no python3")
	}
	const script = `
import configparser, json, sys
out = []
for path in sys.argv[1:]:
    p = configparser.RawConfigParser()
    try:
        p.read(path, encoding="utf-8")
        out.append({"values": {s + "." + k: v for s in ["DEFAULT"] + p.sections() for k, v in p[s].items()}})
    except configparser.Error as e:
        out.append({"error": str(e)})
print(json.dumps(out))
`
	dir, args := t.TempDir(), []string{"-c", script}
	for i, tc := range readINITests {
		path := filepath.Join(dir, strconv.Itoa(i)+".ini")
		if err := os.WriteFile(path, []byte(tc.file), 0o644); err != nil {
			t.Fatal(err)
		}
		args = append(args, path)
	}
	out, err := exec.Command(python, args...).Output()
	if err != nil {
		t.Fatalf("python3: %v", err)
	}
	var py []struct {
		Values map[string]string
		Error  string
	}
	if err := json.Unmarshal(out, &py); err != nil || len(py) != len(readINITests) {
		t.Fatalf("python3: %v: %s", err, out)
	}
	for i, tc := range readINITests {
		if (py[i].Error == "") != (tc.err == "") || py[i].Error == "" && !maps.Equal(py[i].Values, tc.want) {
			t.Errorf("%s: configparser: %q %q, want %q %q", tc.name, py[i].Values, py[i].Error, tc.want, tc.err)
		}
	}
}
