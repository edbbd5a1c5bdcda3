package main

import (
	"context"
	"flag"
	"io"

	"github.com/fleetmanager/fm/agent"
)

// runAgent is `fm agent`: the daemon beside DSS on a machine. Its settings
// come from the config file the provisioner writes (--config), overridden by
// flags and FM_* variables.
func runAgent(ctx context.Context, args []string, stdout, stderr io.Writer) error {
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
	if err := parseRoleFlags(fs, args); err != nil {
		return err
	}
	var cfg agent.Config
	if *configFile != "" {
		var err error
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
	out := stderr
	log, err := newLogger(*logFormat, *logLevel, out)
	if err != nil {
		return err
	}
	cfg.Logger, cfg.LogOutput, cfg.Version = log, logOutput(*logFormat, out), version
	a, err := agent.New(cfg)
	if err != nil {
		return usageError{err}
	}
	defer a.Close()
	return a.Run(ctx)
}
