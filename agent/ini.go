package agent

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// readINI reads install.ini as section.key values.
func (m *machine) readINI() (map[string]string, error) {
	b, err := m.readDSSFile(filepath.Join(m.dssDir, "install.ini"), maxDSSFileBytes)
	if err != nil {
		return nil, err
	}
	out, section := map[string]string{}, ""
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = strings.TrimSpace(line[1 : len(line)-1])
		default:
			if k, v, ok := strings.Cut(line, "="); ok {
				out[section+"."+strings.TrimSpace(k)] = strings.TrimSpace(v)
			}
		}
	}
	return out, sc.Err()
}

// setPort changes the base port in install.ini, keeping everything else.
func (m *machine) setPort(ctx context.Context, port int) error {
	return m.setINI(ctx, "server", map[string]string{"port": strconv.Itoa(port)}, true)
}

// setINI sets keys of a section of install.ini, keeping everything else:
// a key there is rewritten in place; one missing is added at the end of
// its section (the section at the end of the file if it has none), or,
// with mustExist, refused.
func (m *machine) setINI(ctx context.Context, section string, values map[string]string, mustExist bool) error {
	path := filepath.Join(m.dssDir, "install.ini")
	b, err := m.readFile(ctx, path)
	if err != nil {
		return err
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	done := map[string]bool{}
	current, end := "", -1 // end: the index after the section's last line
	for i, line := range lines {
		t := strings.TrimSpace(line)
		if strings.HasPrefix(t, "[") && strings.HasSuffix(t, "]") {
			current = strings.TrimSpace(t[1 : len(t)-1])
			if current == section {
				end = i + 1
			}
			continue
		}
		if current != section {
			continue
		}
		if t != "" {
			end = i + 1
		}
		if k, _, ok := strings.Cut(t, "="); ok {
			if v, set := values[strings.TrimSpace(k)]; set {
				lines[i], done[strings.TrimSpace(k)] = strings.TrimSpace(k)+" = "+v, true
			}
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
		add := make([]string, len(missing))
		for i, k := range missing {
			add[i] = k + " = " + values[k]
		}
		if end < 0 {
			lines = append(append(lines, "", "["+section+"]"), add...)
		} else {
			lines = slices.Insert(lines, end, add...)
		}
	}
	return m.writeFile(ctx, path, []byte(strings.Join(lines, "\n")+"\n"), 0o644)
}
