// Package agentcmd is the agent's command line: `fm agent` in the fm binary
// and the whole of the slim fm-agent binary (cmd/fm-agent), which share its
// flags, FM_* variables and exit codes. Only cmd/ imports it; it must not
// import what the agent does not need (the server, the AWS SDK,
// nats-server), or the slim binary stops being slim.
package agentcmd

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime/debug"
	"syscall"

	"github.com/fleetmanager/fm/agent"
	"github.com/fleetmanager/fm/internal/startup"
)

// Exit codes of the agent's process.
const (
	ExitOK    = 0
	ExitError = 1
	// ExitUsage is a command line or config that cannot run.
	ExitUsage = startup.ExitUsage
	// ExitJoinRefused is FM refusing the join token: fm-agent.service
	// (deploy/cloudinit) does not restart on it, since a new token takes a
	// reprovision (RestartPreventExitStatus).
	ExitJoinRefused = 3
)

// agentGCPercent is the agent's GOGC unless the environment sets one: the
// heap of an idle agent is a few MiB, and Go's default lets it double
// before a collection. At 50 the idle agent keeps about 1 MiB less
// (docs/benchmarks.md, "Idle agent"), at no CPU cost measured at rest; the
// collector works more only while the agent works (a snapshot, a log
// burst).
const agentGCPercent = 50

// Main runs the agent until ctx ends and returns the process's exit code,
// having written any error to stderr as "prog: error".
func Main(ctx context.Context, prog string, args []string, stderr io.Writer, version string) int {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(agentGCPercent)
	}
	// The binary as it started: an upgrade renames another over it.
	self, selfErr := executable()
	err := run(ctx, args, stderr, version, self)
	if errors.Is(err, agent.ErrRestart) && selfErr == nil {
		// The same process goes on as the binary now in place (a new one,
		// or the previous one put back), as a service manager expects.
		err = fmt.Errorf("execute %s: %w", self, syscall.Exec(self, os.Args, os.Environ()))
	}
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return ExitOK
	}
	fmt.Fprintln(stderr, prog+":", err)
	var u startup.UsageError
	switch {
	case errors.As(err, &u):
		return ExitUsage
	case errors.Is(err, agent.ErrJoinRefused):
		return ExitJoinRefused
	}
	return ExitError
}

// run is the daemon beside DSS on a machine. Its settings come from the
// config file the provisioner writes (--config), overridden by flags and
// FM_* variables.
func run(ctx context.Context, args []string, stderr io.Writer, version, self string) error {
	fs := flag.NewFlagSet("fm agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configFile := fs.String("config", "", "agent config file (JSON) written by the provisioner")
	instance := fs.String("instance", "", "instance id")
	machineRequest := fs.String("machine-request", "", "the provision request that made this machine: the agent acts only on desired states for it")
	natsURL := fs.String("nats-url", "", "bus URL")
	creds := fs.String("nats-creds", "", "NATS credentials file")
	root := fs.String("root", "", "the OS disk (/ on a real machine)")
	data := fs.String("data", "", "the data volume (/data on a real machine)")
	volumeBytes := fs.Uint64("data-volume-bytes", 0, "nominal data volume size when --data is not a file system of its own")
	packageManager := fs.String("package-manager", "", "auto, none, or a command the package names are appended to")
	logFormat := fs.String("log-format", "json", "console or json")
	logLevel := fs.String("log-level", "info", "trace, debug, info, warn or error")
	check := fs.Bool("check", false, "check the command line and the config, and exit (an agent upgrading itself asks its new binary)")
	if err := startup.ParseRoleFlags(fs, args); err != nil {
		return err
	}
	var (
		cfg agent.Config
		err error
	)
	if *configFile != "" {
		if cfg, err = agent.LoadConfigFile(*configFile); err != nil {
			return err
		}
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	setIf := func(name string, dst *string, v string) {
		if v != "" || given[name] {
			*dst = v
		}
	}
	setIf("instance", &cfg.Instance, *instance)
	setIf("machine-request", &cfg.MachineRequest, *machineRequest)
	setIf("nats-url", &cfg.NATSURL, *natsURL)
	setIf("nats-creds", &cfg.CredsFile, *creds)
	setIf("root", &cfg.RootDir, *root)
	setIf("data", &cfg.DataDir, *data)
	setIf("package-manager", &cfg.PackageManager, *packageManager)
	if *volumeBytes != 0 {
		cfg.DataVolumeBytes = *volumeBytes
	}
	log, err := startup.NewLogger(*logFormat, *logLevel, stderr)
	if err != nil {
		return err
	}
	if *check {
		if err := agent.CheckConfig(cfg); err != nil {
			return startup.UsageError{Err: err}
		}
		fmt.Fprintln(stderr, agent.CheckOK)
		return nil
	}
	cfg.Logger, cfg.LogOutput, cfg.Version, cfg.Binary = log, startup.LogOutput(*logFormat, stderr), version, self
	// The new binary of an upgrade is asked to check this very command
	// line before it replaces this one.
	cfg.CheckArgs = append(append([]string{"agent"}, args...), "--check")
	a, err := agent.New(cfg)
	if err != nil {
		return startup.UsageError{Err: err}
	}
	defer a.Close()
	return a.Run(ctx)
}

// executable is the running binary's path, links resolved ("" and an error
// when it cannot be told: the agent then cannot upgrade itself).
func executable() (string, error) {
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	return filepath.EvalSymlinks(self)
}
