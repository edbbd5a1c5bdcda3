package agent

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// DSS reads install.ini with Python's configparser.RawConfigParser, its
// defaults: what it makes of the file is what DSS runs with, so the agent
// reads and edits the file the same way, quirks included (see parseINI).

// readINI reads install.ini as section.key values, keys lower-cased, each
// section with the keys of [DEFAULT] it does not set itself, as configparser
// gives them to DSS. A file configparser refuses (a duplicate section or key,
// a line it cannot parse) is refused.
func (m *machine) readINI() (map[string]string, error) {
	b, err := m.readDSSFile(filepath.Join(m.dssDir, "install.ini"), maxDSSFileBytes)
	if err != nil {
		return nil, err
	}
	f, err := parseINI(string(b))
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for s, keys := range f.values {
		for k, v := range f.values["DEFAULT"] {
			out[s+"."+k] = v
		}
		for k, v := range keys {
			out[s+"."+k] = v
		}
	}
	return out, nil
}

// setPort changes the base port in install.ini, keeping everything else.
func (m *machine) setPort(ctx context.Context, port int) error {
	return m.setINI(ctx, "server", map[string]string{"port": strconv.Itoa(port)}, true)
}

// setINI sets keys (lower-case, as configparser has them) of a section of
// install.ini, keeping everything else, line endings included: a key there
// is rewritten in place as key = value, its continuation lines dropped; one
// missing is added after its section's last key (a new section at the end
// of the file if it has none), or, with mustExist, refused. A file
// configparser refuses is not edited, nor one whose edit configparser would
// not read back as asked (a value with a line break or surrounding spaces,
// indented lines the new key would make its continuation lines): the file
// is left unchanged.
func (m *machine) setINI(ctx context.Context, section string, values map[string]string, mustExist bool) error {
	path := filepath.Join(m.dssDir, "install.ini")
	b, err := m.readFile(ctx, path)
	if err != nil {
		return err
	}
	f, err := parseINI(string(b))
	if err != nil {
		return fmt.Errorf("install.ini not edited: %w", err)
	}
	eol := "\n"
	if len(f.lines) > 0 && f.lines[0].eol != "" {
		eol = f.lines[0].eol
	}
	var out []string // lines with their endings
	done := map[string]bool{}
	end, indent := -1, "" // where missing keys go, and their indentation
	for _, l := range f.lines {
		if l.section == section {
			if v, set := values[l.key]; set && l.key != "" {
				if l.cont {
					continue // the old value's continuation lines go with it
				}
				k := strings.TrimRightFunc(l.text[:strings.IndexAny(l.text, "=:")], pySpace)
				l.text, done[l.key] = k+" = "+v, true
			}
			// New keys are indented like the last key or header: a key
			// indented less would make the indented lines after it its
			// continuation lines.
			if l.header || l.key != "" && !l.cont {
				indent = l.text[:len(l.text)-len(strings.TrimLeftFunc(l.text, pySpace))]
			}
		}
		out = append(out, l.text+l.eol)
		if l.section == section && (l.header || l.key != "") {
			end = len(out)
		}
	}
	var missing []string
	for k := range values {
		if !done[k] {
			missing = append(missing, k)
		}
	}
	slices.Sort(missing)
	if len(missing) > 0 && mustExist {
		return fmt.Errorf("install.ini has no [%s] %s", section, strings.Join(missing, ", "))
	}
	if len(missing) > 0 {
		var add []string
		if end < 0 {
			if end = len(out); end > 0 {
				add = append(add, eol) // a blank line before the new section
			}
			add, indent = append(add, "["+section+"]"+eol), ""
		}
		for _, k := range missing {
			add = append(add, indent+k+" = "+values[k]+eol)
		}
		if end > 0 && strings.TrimRight(out[end-1], "\r\n") == out[end-1] {
			out[end-1] += eol // the last line had no line ending
		}
		out = slices.Insert(out, end, add...)
	}
	data := strings.Join(out, "")
	want := maps.Clone(f.values)
	want[section] = maps.Clone(want[section])
	if want[section] == nil {
		want[section] = map[string]string{}
	}
	maps.Copy(want[section], values)
	g, err := parseINI(data)
	if err == nil && !maps.EqualFunc(g.values, want, maps.Equal) {
		err = errors.New("other values")
	}
	if err != nil {
		return fmt.Errorf("install.ini not edited: configparser would not read the edit of [%s] back as asked: %w", section, err)
	}
	return m.writeFile(ctx, path, []byte(data), 0o644)
}

// iniFile is what configparser makes of an ini file: its values by section
// (sections without the keys of [DEFAULT]) and, for editing, its lines.
type iniFile struct {
	values map[string]map[string]string
	lines  []iniLine
}

// iniLine is a line of an ini file: the section it is in (a header's own),
// the lower-cased key of an option line or of the continuation line of one.
type iniLine struct {
	text, eol    string
	section, key string
	header, cont bool
}

// parseINI follows RawConfigParser._read with the defaults (Python 3):
//   - lines end at \n, \r\n or \r (a file read in text mode);
//   - a line whose stripped text starts with # or ; is a comment: there are
//     no inline comments, "k = 8g ; x" is "8g ; x";
//   - a line indented deeper than the last key or header line, after a key,
//     continues that key's value: values are joined by newlines, blank lines
//     inside kept, trailing whitespace dropped;
//   - a header is \[(?P<header>.+)\] matched at the line's start, not its
//     end, .+ greedy: the name runs to the last ], spaces kept ("[ a ]" is
//     " a "), what follows ignored ("[a] ; x" is a, "[a] ; [b]" is "a] ; [b");
//   - a key line is split at its first = or :, the key lower-cased;
//   - strict: a section or a key of a section twice is an error, except that
//     [DEFAULT] may come back (its keys may not);
//   - a key before any section, or a line that is neither, is an error.
func parseINI(s string) (*iniFile, error) {
	f := &iniFile{values: map[string]map[string]string{}}
	for s != "" {
		l, n := iniLine{text: s}, len(s)
		if i := strings.IndexAny(s, "\r\n"); i >= 0 {
			n = i + 1
			if strings.HasPrefix(s[i:], "\r\n") {
				n++
			}
			l.text, l.eol = s[:i], s[i:n]
		}
		f.lines, s = append(f.lines, l), s[n:]
	}
	section, key, level, inSection := "", "", 0, false
	seen := map[[2]string]bool{}
	for n := range f.lines {
		l := &f.lines[n]
		t := strings.TrimFunc(l.text, pySpace)
		// In characters, as Python counts them: lines are compared.
		indent := utf8.RuneCountInString(l.text) - utf8.RuneCountInString(strings.TrimLeftFunc(l.text, pySpace))
		comment := strings.HasPrefix(t, "#") || strings.HasPrefix(t, ";")
		switch {
		case t == "" || comment:
			if key != "" && !comment {
				f.values[section][key] += "\n"
			}
			l.section = section
			continue
		case key != "" && indent > level:
			f.values[section][key] += "\n" + t
			l.section, l.key, l.cont = section, key, true
			continue
		}
		level = indent
		if j := strings.LastIndex(t, "]"); strings.HasPrefix(t, "[") && j >= 2 {
			section, key, inSection, l.header = t[1:j], "", true, true
			if seen[[2]string{section}] {
				return nil, fmt.Errorf("install.ini line %d: section [%s] again", n+1, section)
			}
			seen[[2]string{section}] = section != "DEFAULT" // configparser lets it come back
			if f.values[section] == nil {
				f.values[section] = map[string]string{}
			}
		} else if i := strings.IndexAny(t, "=:"); !inSection || i < 1 {
			return nil, fmt.Errorf("install.ini line %d: %q is not a section header, a key or a comment", n+1, t)
		} else {
			key = strings.ToLower(strings.TrimRightFunc(t[:i], pySpace))
			if seen[[2]string{section, key}] {
				return nil, fmt.Errorf("install.ini line %d: [%s] %s again", n+1, section, key)
			}
			seen[[2]string{section, key}] = true
			f.values[section][key], l.key = strings.TrimLeftFunc(t[i+1:], pySpace), key
		}
		l.section = section
	}
	for _, keys := range f.values {
		for k, v := range keys {
			keys[k] = strings.TrimRightFunc(v, pySpace)
		}
	}
	return f, nil
}

// pySpace is Python's whitespace (str.strip, re's \s): Go's and the
// separators \x1c to \x1f.
func pySpace(r rune) bool { return unicode.IsSpace(r) || r >= 0x1c && r <= 0x1f }
