package agent

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/fleetmanager/fm/internal/atomicfile"
	"github.com/fleetmanager/fm/protocol"
)

// marker is the agent's progress on this machine, kept on the OS disk: a new
// machine (reprovision) has none and runs the whole startup sequence.
type marker struct {
	Instance string `json:"instance"`
	// Generation is the last desired generation fully reached, Applied what
	// it asked for.
	Generation uint64  `json:"generation"`
	Applied    applied `json:"applied"`
	// DSSStopped is set by stop-dss and cleared by start-dss: the agent does
	// not start DSS, nor restart it when it does not answer.
	DSSStopped bool `json:"dssStopped"`
	// Install is the installer run of a generation not reached yet, recorded
	// before it starts: an agent that stops after the installer ended but
	// before the generation is recorded finds from it what the installer did
	// (the facts setup actions see) instead of running it again.
	Install   *installRun `json:"install,omitempty"`
	UpdatedAt time.Time   `json:"updatedAt"`
}

// installRun is one run of DSS's installer: for a generation, to a
// version, from the version the data directory held ("" for none).
type installRun struct {
	Generation uint64 `json:"generation"`
	Target     string `json:"target"`
	From       string `json:"from"`
}

// done reports whether this run, of generation gen to version target,
// installed or upgraded DSS to its end: the data directory holds the
// version it went to, and held another before (an attach, to the same
// version, cannot be told done from the version, and is run again).
func (r *installRun) done(gen uint64, target, installed string) bool {
	return r != nil && r.Generation == gen && r.Target == target && r.From != r.Target && installed == r.Target
}

// applied is what of a desired state the machine holds.
type applied struct {
	Version       string `json:"version"`
	NodeType      string `json:"nodeType"`
	Port          int    `json:"port"`
	LicenseDigest string `json:"licenseDigest"`
	ActionsDigest string `json:"actionsDigest"`
}

func appliedOf(d *protocol.DesiredState) applied {
	actions, _ := json.Marshal(d.SetupActions)
	return applied{
		Version: d.DSS.Version, NodeType: d.NodeType, Port: d.DSS.Port,
		LicenseDigest: digest([]byte(d.DSS.License)), ActionsDigest: digest(actions),
	}
}

func digest(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// commandCursor is how far the agent got in its commands, kept on the data
// volume so that a new machine of the same instance resumes after them.
type commandCursor struct {
	// Version is the cursor's format: 0 (absent) for a cursor from before
	// Verified, which is then taken to be LastSeq.
	Version int `json:"version,omitempty"`
	// LastSeq is the FM_COMMANDS sequence of the last finished command.
	LastSeq uint64 `json:"lastSeq"`
	// Verified is the sequence up to which a catch-up has seen every
	// command of the instance: commands run live after it may have
	// overtaken one lost on the way, which the next catch-up finds.
	// Unverified counts the commands finished since: a catch-up looks at
	// them again and skips them by id (Recent), so they must stay fewer
	// than Recent holds: at verifiedSaveAfter the agent catches up (which
	// moves Verified) and saves the cursor.
	Verified   uint64 `json:"verified,omitempty"`
	Unverified int    `json:"unverified,omitempty"`
	// Running is the command under way, if any: found at start, it was
	// interrupted, and is run again when it is delivered again.
	Running *runningCommand `json:"running,omitempty"`
	// Recent are the ids of the last finished commands, to run a command
	// delivered twice only once.
	Recent []string `json:"recent"`
}

type runningCommand struct {
	ID      string               `json:"id"`
	Seq     uint64               `json:"seq"`
	Kind    protocol.CommandKind `json:"kind"`
	OpID    string               `json:"opId,omitempty"`
	Started time.Time            `json:"started"`
	// Attempts counts the starts of the command: one for each agent that
	// began it.
	Attempts int `json:"attempts,omitempty"`
}

const recentCommands = 200

// cursorVersion is the format commandCursor is written in.
const cursorVersion = 1

// verifiedSaveAfter is how many commands may be finished after Verified
// before the agent catches up to move it, and saves the cursor at once;
// fewer, and Verified is saved with the next command (a fleet that catches
// up together after a bus restart does not write every cursor).
const verifiedSaveAfter = 50

func (c *commandCursor) done(id string, seq uint64) {
	c.Running = nil
	c.LastSeq = max(c.LastSeq, seq)
	if c.seen(id) {
		return
	}
	c.Unverified++
	c.Recent = append(c.Recent, id)
	if len(c.Recent) > recentCommands {
		c.Recent = c.Recent[len(c.Recent)-recentCommands:]
	}
}

func (c *commandCursor) seen(id string) bool {
	for _, r := range c.Recent {
		if r == id {
			return true
		}
	}
	return false
}

// dssSecrets are the DSS credentials the agent created, kept on the data
// volume (mode 0600) with the DSS data they open.
type dssSecrets struct {
	InitialPassword string `json:"initialPassword,omitempty"`
	AdminAPIKey     string `json:"adminApiKey,omitempty"`
	// KeyLabel is the label of FM's admin API key, recorded before the key
	// is made: a key made under it but not kept (a crash) is found by it.
	KeyLabel string `json:"keyLabel,omitempty"`
}

// loadJSON reads a JSON file into v. A missing file leaves v alone and
// returns false; an unreadable one is an error.
func loadJSON(path string, v any) (bool, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return false, fmt.Errorf("%s: %w", filepath.Base(path), err)
	}
	return true, nil
}

func saveJSON(path string, v any, perm os.FileMode) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(path, append(b, '\n'), perm)
}

func (m *machine) markerPath() string   { return filepath.Join(m.stateDir, "marker.json") }
func (m *machine) cursorPath() string   { return filepath.Join(m.agentData, "commands.json") }
func (m *machine) secretsPath() string  { return filepath.Join(m.agentData, "dss-credentials.json") }
func (m *machine) licensePath() string  { return filepath.Join(m.dssDir, "config", "license.json") }
func (m *machine) dssLogPath() string   { return filepath.Join(m.dssDir, "run", "backend.log") }
func (m *machine) agentLogPath() string { return filepath.Join(m.stateDir, "agent.log") }

// loadMarker reads the marker. An unreadable marker counts as none: the
// startup sequence is safe to run again, and running it is what a machine
// without a trustworthy record needs.
func (m *machine) loadMarker() marker {
	var mk marker
	found, err := loadJSON(m.markerPath(), &mk)
	if err != nil || (found && mk.Instance != m.cfg.Instance) {
		m.log.Warn().Err(err).Str("marker_instance", mk.Instance).Msg("progress marker ignored; running the whole startup sequence")
		return marker{}
	}
	return mk
}

func (m *machine) saveMarker(mk marker) error {
	mk.Instance, mk.UpdatedAt = m.cfg.Instance, time.Now().UTC()
	return saveJSON(m.markerPath(), mk, 0o600)
}
