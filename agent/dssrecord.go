package agent

import (
	"context"
	"path/filepath"
	"slices"
)

// dssRecord is what the agent did to DSS that no file of DSS's shows it
// the way dssInputs reads files: the DSS version each once-per-version
// command last ran for, and the settings given through DSS's admin API
// that DSS takes only when it starts. It lives with the machine (the base
// images a command builds are the machine's), and a new machine runs the
// commands again, which is harmless: they are DSS's own and idempotent.
type dssRecord struct {
	// Commands maps a command (install-graphics-export,
	// build-base-image container-exec, …) to the DSS version it ran for.
	Commands map[string]string `json:"commands,omitempty"`
	// AtStart maps a setting DSS reads at start to a digest of its value:
	// part of dssInputs, so that a change restarts DSS.
	AtStart map[string]string `json:"atStart,omitempty"`
}

func (m *machine) recordPath() string { return filepath.Join(m.stateDir, "dss-record.json") }

// loadRecord reads the record; an unreadable one counts as empty: every
// command then runs again, as on a new machine.
func (m *machine) loadRecord() dssRecord {
	var r dssRecord
	if _, err := loadJSON(m.recordPath(), &r); err != nil {
		m.log.Warn().Err(err).Msg("the record of DSS commands is unreadable; they run again")
		r = dssRecord{}
	}
	if r.Commands == nil {
		r.Commands = map[string]string{}
	}
	if r.AtStart == nil {
		r.AtStart = map[string]string{}
	}
	return r
}

func (m *machine) saveRecord(r dssRecord) error { return saveJSON(m.recordPath(), r, 0o600) }

// startedPath keeps dssInputs as it was when the agent last started DSS:
// what DSS runs with. A replay compares with it, not with what it saw when
// it began, so that a change a killed agent made but never restarted DSS
// for still restarts it.
func (m *machine) startedPath() string { return filepath.Join(m.stateDir, "dss-started.json") }

// started is what DSS was last started with.
type started struct {
	Inputs string `json:"inputs"`
	// Files are the digests dssInputFiles gave then: a restart says which
	// changed.
	Files map[string]string `json:"files,omitempty"`
	// Port is the base port it listens on: until it restarts, a replay
	// that changed install.ini's talks to it there.
	Port int `json:"port,omitempty"`
}

// startedInputs is dssInputs when DSS last started, "" when unknown (an
// agent from before this record, or DSS never started by this one).
func (m *machine) startedInputs() string {
	var s started
	if _, err := loadJSON(m.startedPath(), &s); err != nil {
		return ""
	}
	return s.Inputs
}

// listeningPort is the base port DSS listens on: the one it was started
// with, or install.ini's when that is not known, or when DSS answers there
// and not at the one noted (a start the agent did not make).
func (m *machine) listeningPort(ctx context.Context) (int, error) {
	ini, err := m.port()
	var s started
	if found, lerr := loadJSON(m.startedPath(), &s); lerr != nil || !found || s.Port <= 0 || s.Port == ini {
		return ini, err
	}
	if err == nil && !m.answersOn(ctx, s.Port) && m.answersOn(ctx, ini) {
		return ini, nil
	}
	return s.Port, nil
}

// noteStarted keeps inputs and port as what DSS started with. Not kept (a
// crash, a full disk), the next replay restarts DSS once more, which is
// harmless.
func (m *machine) noteStarted(files map[string]string, port int) {
	if err := saveJSON(m.startedPath(), started{Inputs: inputsDigest(files), Files: files, Port: port}, 0o600); err != nil {
		m.log.Warn().Err(err).Msg("what DSS started with is not kept; the next replay restarts it")
	}
}

// changedInputs names what DSS reads at start that is not as it was when
// DSS last started, sorted; nil when that is not known.
func (m *machine) changedInputs() []string {
	var s started
	if found, err := loadJSON(m.startedPath(), &s); err != nil || !found || s.Files == nil {
		return nil
	}
	now := m.dssInputFiles()
	var out []string
	for k, v := range now {
		if s.Files[k] != v {
			out = append(out, k)
		}
	}
	for k := range s.Files {
		if _, ok := now[k]; !ok {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}
