// Package agent is FM's agent role: the daemon beside DSS on every machine.
// It dials out to the bus, follows its own desired state (fm_desired, its
// republish subject), pulls its own commands (FM_COMMANDS), installs,
// upgrades and runs DSS through the DSS kit's interface, carries out the
// template's setup actions, and reports progress, status, heartbeats and
// logs. It holds no state the bus does not hold, except its progress marker
// on the machine.
//
// cmd/fm and tests import it. It imports protocol and bus, never server or
// the AWS SDK.
package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fleetmanager/fm/internal/crashpoint"
	"github.com/fleetmanager/fm/protocol"
	"github.com/rs/zerolog"
)

// Config configures an Agent.
type Config struct {
	// Instance is the id of the instance this machine runs.
	Instance string `json:"instance"`
	// MachineRequest is the id of the provision request that made this
	// machine; the agent acts only on desired states for it (or for none).
	MachineRequest string `json:"machineRequest,omitempty"`
	// NATSURL is the bus, CredsFile the agent's NATS credentials (if the bus
	// requires them).
	NATSURL   string `json:"natsUrl"`
	CredsFile string `json:"credsFile,omitempty"`
	// Join, if set, is how the agent gets its credentials on its first
	// start: it exchanges the single-use token at Join.URL for its NATS
	// credentials and the instance key, kept in identity.json in its state
	// folder on the OS disk (CredsFile is then not used). Join.CACert, or
	// CAFile, is the CA that FM's HTTPS and NATS certificates are verified
	// with; with one, the bus is reached over TLS.
	Join   *protocol.JoinSpec `json:"join,omitempty"`
	CAFile string             `json:"caFile,omitempty"`
	// RootDir is the machine's OS disk ("/" on a real machine): it holds the
	// progress marker, the kit cache, the installed kits and the files setup
	// actions write outside DSS. It is new on every reprovision.
	RootDir string `json:"rootDir"`
	// DataDir is the data volume (/data on a real machine): it holds the DSS
	// data directory (DataDir/dataiku/dss_data) and outlives reprovisions.
	DataDir string `json:"dataDir"`
	// DataVolumeBytes is the nominal size of the data volume when DataDir is
	// not a file system of its own (the local backend); 0 measures it.
	DataVolumeBytes uint64 `json:"dataVolumeBytes,omitempty"`
	// PackageManager installs system packages: "auto" finds dnf, yum or
	// apt-get; "none" answers INSTALL_SYSTEM_PACKAGES as unsupported (the
	// local backend's machines share the FM host); anything else is a command
	// the package names are appended to.
	PackageManager string `json:"packageManager,omitempty"`
	// LoginUser is the user whose authorized_keys ADD_AUTHORIZED_KEY extends;
	// DSSUser runs DSS (its installer too) and owns the keys of
	// ADD_SSH_KEY: never root on a real machine (made if missing).
	LoginUser string `json:"loginUser,omitempty"`
	DSSUser   string `json:"dssUser,omitempty"`
	// ServiceManager is how DSS is started and stopped: "systemd" runs it in
	// a unit of its own (dataiku-dss.service), out of the agent's, so that
	// it lives on when the agent is restarted or killed; "none" runs bin/dss
	// directly (DSS still leaves the agent's process group); "auto" (the
	// default) is systemd on a real machine that has it.
	ServiceManager string `json:"serviceManager,omitempty"`
	// Hostnames are the machine's DNS names, as its provisioner made them
	// (the records of the network's DNS zones, the public zone's first):
	// the HTTPS front's certificates name them, and LETSENCRYPT obtains
	// one for the first. The machine's own host name, localhost and its
	// addresses are added to self-signed certificates. A name that is not
	// one (a zone's escaped characters) is left out with a warning rather
	// than keeping the agent from starting.
	Hostnames []string `json:"hostnames,omitempty"`
	// HTTPSAddress is the address the HTTPS front listens on: every
	// interface when empty (tests give the loopback address).
	HTTPSAddress string `json:"httpsAddress,omitempty"`
	// IMDSURL is the EC2 instance metadata service's address
	// (http://169.254.169.254), which the EC2 backend gives: the agent
	// sends its instance identity document with its join, which FM may
	// require (protocol.EC2Identity). Empty elsewhere.
	IMDSURL string `json:"imdsUrl,omitempty"`
	// SecretsManagerEndpoint replaces AWS Secrets Manager's regional
	// endpoint, where a template keeps DSS's AWS key (tests).
	SecretsManagerEndpoint string `json:"secretsManagerEndpoint,omitempty"`

	// Timings; zero values take the defaults.
	HealthInterval time.Duration `json:"-"` // how often DSS is checked (10s)
	// ExitInterval is how often the agent looks whether DSS's processes,
	// seen when it last answered, still exist (1s): a DSS that died is
	// checked at once, not at the next HealthInterval. It costs a kill(pid,
	// 0) per process, not a look at every process.
	ExitInterval    time.Duration `json:"-"`
	StatusRefresh   time.Duration `json:"-"` // rewrite an unchanged status this often, within fm_agents' TTL (20m)
	DSSStartTimeout time.Duration `json:"-"` // how long DSS may take to answer (10m)
	DSSStopTimeout  time.Duration `json:"-"` // after this, DSS is killed (60s)
	FactsInterval   time.Duration `json:"-"` // how often the machine is measured (30s)
	// InstallTimeout bounds a run of DSS's installer (install or upgrade,
	// 2h): past it the installer is killed and the step fails.
	InstallTimeout time.Duration `json:"-"`

	// Crash is passed every crash point of the agent's work (tests).
	Crash crashpoint.Hook `json:"-"`

	// Simulated makes an agent of a fleet simulator (fm bench fleet): it
	// joins, follows its desired state, pulls and answers its commands,
	// reports status, events and heartbeats and renews its credentials like
	// any agent, but touches no machine. Every generation is reached at
	// once with DSS reported running, the commands that only change DSS's
	// run state succeed without doing anything, the simulated DSS's
	// credentials are made at random and answered, and what needs a real
	// DSS (a password reset, a diagnosis) fails as unimplemented. It
	// measures its folders as a machine, keeps no log file and ships no DSS
	// log.
	Simulated bool `json:"-"`

	// Version is the agent's version, reported in status and heartbeats.
	Version string `json:"-"`
	// Binary is the agent's own executable (its command line sets it): an
	// upgrade-agent command replaces it, and only on the machine's disk
	// (RootDir). Empty, the agent cannot upgrade itself.
	Binary string `json:"-"`
	// CheckArgs is the command line that makes a binary check this agent's
	// command line and config and exit (`agent … --check`): an upgrade
	// runs the new binary with it before the swap. Empty, only its
	// `version` is run.
	CheckArgs []string `json:"-"`
	// Logger is the agent's logger. When LogOutput is set too (where Logger
	// writes), the agent also keeps its log in a rotating file on the
	// machine and ships it to FM_LOGS.
	Logger    zerolog.Logger `json:"-"`
	LogOutput io.Writer      `json:"-"`
}

// LoadConfigFile reads the JSON config file the provisioner writes.
func LoadConfigFile(path string) (Config, error) {
	var c Config
	b, err := os.ReadFile(path)
	if err != nil {
		return c, fmt.Errorf("agent config: %w", err)
	}
	if err := json.Unmarshal(b, &c); err != nil {
		return c, fmt.Errorf("agent config %s: %w", path, err)
	}
	return c, nil
}

// WriteConfigFile writes c as the agent's config file (mode 0600).
func WriteConfigFile(path string, c Config) error {
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o600)
}

func (c *Config) setDefaults() {
	if c.PackageManager == "" {
		c.PackageManager = "auto"
	}
	if c.LoginUser == "" {
		c.LoginUser = "ec2-user"
	}
	if c.DSSUser == "" {
		c.DSSUser = "dataiku"
	}
	if c.ServiceManager == "" {
		c.ServiceManager = "auto"
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.HealthInterval, 10*time.Second)
	def(&c.ExitInterval, time.Second)
	def(&c.StatusRefresh, 20*time.Minute)
	def(&c.DSSStartTimeout, 10*time.Minute)
	def(&c.DSSStopTimeout, 60*time.Second)
	def(&c.FactsInterval, 30*time.Second)
	def(&c.InstallTimeout, 2*time.Hour)
	if c.Version == "" {
		c.Version = "dev"
	}
}

// CheckConfig checks cfg as New would, without preparing anything.
func CheckConfig(cfg Config) error {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	return nil
}

func (c *Config) validate() error {
	var problems []error
	if !protocol.ValidToken(c.Instance) {
		problems = append(problems, fmt.Errorf("instance %q is not a valid instance id", c.Instance))
	}
	if c.NATSURL == "" {
		problems = append(problems, errors.New("a NATS url is required"))
	}
	switch c.ServiceManager {
	case "auto", "systemd", "none":
	default:
		problems = append(problems, fmt.Errorf("serviceManager %q is not auto, systemd or none", c.ServiceManager))
	}
	if c.HTTPSAddress != "" && net.ParseIP(c.HTTPSAddress) == nil && c.HTTPSAddress != "localhost" {
		problems = append(problems, fmt.Errorf("httpsAddress %q is not an IP address (the HTTPS front's port comes from the desired state)", c.HTTPSAddress))
	}
	for name, dir := range map[string]string{"root": c.RootDir, "data": c.DataDir} {
		if dir == "" || !filepath.IsAbs(dir) {
			problems = append(problems, fmt.Errorf("the %s folder must be an absolute path (got %q)", name, dir))
		}
	}
	return errors.Join(problems...)
}

// validHostname reports whether h is a DNS name: dot-separated labels of
// letters, digits and hyphens (no IP address, no trailing dot).
func validHostname(h string) bool {
	if h == "" || len(h) > 253 || net.ParseIP(h) != nil {
		return false
	}
	for _, label := range strings.Split(h, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, c := range label {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}
