package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/fleetmanager/fm/provisioner"
	"github.com/fleetmanager/fm/provisioner/local"
	"github.com/rs/zerolog"
)

// runProvisioner is `fm provisioner`: the provisioner on its own, against
// an FM bus.
func runProvisioner(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("fm provisioner", flag.ContinueOnError)
	fs.SetOutput(stderr)
	backendName := fs.String("backend", "local", "machine backend: local")
	natsURL := fs.String("nats-url", "", "FM's NATS URL")
	natsCreds := fs.String("nats-creds", "", "NATS credentials file (fm nats-creds --role provisioner makes one)")
	natsCA := fs.String("nats-ca", "", "CA file to verify the NATS server's TLS certificate with")
	dir := fs.String("dir", "./.fm/local", "local backend: folder of the machines and their volumes")
	agentURL := fs.String("agent-nats-url", "", "local backend: the NATS URL agents use (default --nats-url)")
	logFormat := fs.String("log-format", "json", "console or json")
	logLevel := fs.String("log-level", "info", "trace, debug, info, warn or error")
	if err := parseRoleFlags(fs, args); err != nil {
		return err
	}
	if *natsURL == "" {
		return usageError{fmt.Errorf("--nats-url is required")}
	}
	log, err := newLogger(*logFormat, *logLevel, stderr)
	if err != nil {
		return err
	}
	b, err := externalBus(*natsURL, *natsCreds, "fm-provisioner", &security{caFile: *natsCA}, log)
	if err != nil {
		return err
	}
	defer b.close()
	if *agentURL == "" {
		*agentURL = *natsURL
	}
	backend, err := newBackend(*backendName, *dir, *agentURL, log)
	if err != nil {
		return err
	}
	p, err := provisioner.New(provisioner.Config{Conn: b.nc, Backend: backend, Logger: log})
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "fm provisioner: %s backend, bus %s\n", backend.Name(), *natsURL)
	return p.Run(ctx)
}

// newBackend builds the named backend.
func newBackend(name, dir, agentURL string, log zerolog.Logger) (provisioner.Backend, error) {
	switch name {
	case "local":
		abs, err := filepath.Abs(dir)
		if err != nil {
			return nil, err
		}
		exe, err := os.Executable()
		if err != nil {
			return nil, err
		}
		return local.New(local.Config{Dir: abs, AgentBinary: exe, NATSURL: agentURL, Logger: log})
	}
	return nil, usageError{fmt.Errorf("--backend: %q is not a backend (local)", name)}
}
