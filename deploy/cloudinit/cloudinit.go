// Package cloudinit renders the user data that bootstraps a cloud machine:
// it mounts the data volume, installs the fm binary from FM (checked against
// its digest), writes the agent's config with its single-use join token and
// starts the agent as a systemd unit (fm-agent.service, beside this file).
//
// The EC2 backend imports it; tests read a machine's agent config back out
// of its user data with AgentConfig. It imports only the standard library.
package cloudinit

import (
	"bytes"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"text/template"
)

//go:embed user-data.sh.tmpl
var script string

// Unit is the agent's systemd unit.
//
//go:embed fm-agent.service
var Unit string

var tmpl = template.Must(template.New("user-data").Parse(script))

// MaxSize is EC2's limit on user data (before base64).
const MaxSize = 16 << 10

// Params are what a machine's bootstrap needs.
type Params struct {
	Instance string
	// VolumeID is the data volume's id (vol-…) and DeviceName where it is
	// attached (/dev/sdf).
	VolumeID   string
	DeviceName string
	// DownloadURL and DownloadSHA256 (hex) are the fm binary.
	DownloadURL    string
	DownloadSHA256 string
	// CACert is the PEM of FM's CA ("" when FM serves plain HTTP).
	CACert string
	// AgentConfig is the agent's config file (JSON).
	AgentConfig []byte
}

const (
	configBegin = "cat >/etc/fm/agent.json <<'FM_AGENT_CONFIG'\n"
	configEnd   = "\nFM_AGENT_CONFIG\n"
)

// UserData renders the bootstrap script.
func UserData(p Params) ([]byte, error) {
	if err := p.check(); err != nil {
		return nil, fmt.Errorf("user data: %w", err)
	}
	var buf bytes.Buffer
	err := tmpl.Execute(&buf, map[string]string{
		"Instance": p.Instance, "VolumeID": p.VolumeID, "VolumeSerial": strings.ReplaceAll(p.VolumeID, "-", ""),
		"DeviceName": p.DeviceName, "XenDeviceName": strings.Replace(p.DeviceName, "/dev/sd", "/dev/xvd", 1),
		"DownloadURL": p.DownloadURL, "DownloadSHA256": strings.ToLower(p.DownloadSHA256),
		"CACert": strings.TrimSpace(p.CACert), "AgentConfig": strings.TrimSpace(string(p.AgentConfig)), "Unit": Unit,
	})
	if err != nil {
		return nil, fmt.Errorf("user data: %w", err)
	}
	if buf.Len() > MaxSize {
		return nil, fmt.Errorf("user data: %d bytes, more than EC2's %d", buf.Len(), MaxSize)
	}
	return buf.Bytes(), nil
}

// check refuses what would break out of the script's quoting.
func (p Params) check() error {
	u, err := url.Parse(p.DownloadURL)
	switch {
	case err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https"):
		return fmt.Errorf("download url %q is not an http(s) URL", p.DownloadURL)
	case strings.ContainsAny(p.DownloadURL, "'\n\\"):
		return fmt.Errorf("download url %q has a quote, a backslash or a newline", p.DownloadURL)
	}
	if b, err := hex.DecodeString(p.DownloadSHA256); err != nil || len(b) != 32 {
		return fmt.Errorf("download sha256 %q is not 64 hex characters", p.DownloadSHA256)
	}
	if !json.Valid(p.AgentConfig) {
		return errors.New("the agent config is not JSON")
	}
	for _, f := range []struct{ name, v string }{{"instance", p.Instance}, {"volume id", p.VolumeID}, {"device name", p.DeviceName}} {
		if f.v == "" || strings.ContainsFunc(f.v, func(r rune) bool {
			return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '/' || r == '_')
		}) {
			return fmt.Errorf("%s %q is empty or has characters a shell would read", f.name, f.v)
		}
	}
	if strings.Contains(p.CACert, "FM_CA_PEM") || bytes.Contains(p.AgentConfig, []byte("FM_AGENT_CONFIG")) {
		return errors.New("the CA or the agent config contains a here-document marker")
	}
	return nil
}

// AgentConfig reads the agent config back out of user data: what a machine
// was given, for tests and for an operator checking a machine.
func AgentConfig(userData []byte) ([]byte, error) {
	s := string(userData)
	i := strings.Index(s, configBegin)
	if i < 0 {
		return nil, errors.New("user data: no agent config (not FM's bootstrap)")
	}
	rest := s[i+len(configBegin):]
	j := strings.Index(rest, configEnd)
	if j < 0 {
		return nil, errors.New("user data: the agent config is not terminated")
	}
	return []byte(rest[:j]), nil
}
