package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	"github.com/fleetmanager/fm/internal/buildinfo"
	"github.com/fleetmanager/fm/protocol"
)

// DownloadPath serves the binary cloud machines install as /usr/local/bin/fm
// and run as their agent: the slim fm-agent build (cmd/fm-agent), or fm
// itself, which takes the same `fm agent` command line.
// Like the join endpoint it needs no API key: the binary is no secret, and
// a new machine has no key (its user data checks the binary's digest).
const DownloadPath = "/download/fm"

// agentBinary is the binary cloud machines download, with its digest.
type agentBinary struct {
	path   string
	sha256 string
	// version is what its `version` says ("fm 1.2.0 (…)" gives 1.2.0),
	// "unknown" if it says nothing of the kind: asked once, when a rollout
	// first names it (not at start: it runs the binary).
	version func() string
}

// openAgentBinary hashes the binary once, at start: machines check what
// they download against this digest, so replacing the file under a running
// server makes their bootstrap fail loudly rather than run something else.
func openAgentBinary(path string) (*agentBinary, error) {
	if path == "" {
		return nil, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("agent binary: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return nil, fmt.Errorf("agent binary: %w", err)
	}
	return &agentBinary{path: path, sha256: hex.EncodeToString(h.Sum(nil)), version: sync.OnceValue(func() string { return binaryVersion(path) })}, nil
}

// binaryVersion runs `path version` for the version an upgrade names.
func binaryVersion(path string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "version").Output()
	if v, ok := buildinfo.VersionOf(string(out)); err == nil && ok {
		return v
	}
	return "unknown"
}

// agentDownload is the spec's download for a cloud machine: nil on the
// local backend (machines run FM's own binary) or without a binary to serve.
func (s *Server) agentDownload() *protocol.AgentDownload {
	if s.cfg.LocalBackend || s.agent == nil {
		return nil
	}
	return &protocol.AgentDownload{URL: s.downloadURL(), SHA256: s.agent.sha256}
}

// downloadURL is where machines download the agent binary: DownloadPath at
// the join endpoint's host.
func (s *Server) downloadURL() string {
	return strings.TrimSuffix(s.cfg.JoinURL, JoinPath) + DownloadPath
}

// agentReportWithin is how long an upgraded agent has to report before
// its machine goes back to the previous binary.
const agentReportWithin = 5 * time.Minute

// upgradeAgentParams are the params of an upgrade-agent command: the
// binary FM serves, on every backend (a local machine has a binary of its
// own to replace too).
func (s *Server) upgradeAgentParams() (json.RawMessage, error) {
	if s.agent == nil {
		return nil, precondition("this Fleet Manager serves no agent binary to upgrade agents to (fm server --agent-binary)")
	}
	return json.Marshal(protocol.UpgradeAgentParams{URL: s.downloadURL(),
		SHA256: s.agent.sha256, ReportWithinSeconds: int(agentReportWithin.Seconds())})
}

func (s *Server) serveAgentBinary(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		s.writeError(w, r, methodNotAllowed(w, r, http.MethodGet, http.MethodHead))
		return
	}
	if s.agent == nil {
		s.writeError(w, r, newAPIError(protocol.CodeNotFound, "No agent binary",
			"this Fleet Manager serves no agent binary (fm server --agent-binary)"))
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("X-Checksum-Sha256", s.agent.sha256)
	http.ServeFile(w, r, s.agent.path)
}
