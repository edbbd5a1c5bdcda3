package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/server"
)

// runServer is `fm server`: the FM server on an external NATS (--nats-url)
// or on an embedded one.
func runServer(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("fm server", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dataDir := fs.String("data", "./.fm", "data folder: the embedded bus store, the admin key (env FM_DATA)")
	listen := fs.String("listen", "127.0.0.1:10000", "REST API address")
	natsURL := fs.String("nats-url", "", "external NATS URL(s); empty runs an embedded NATS")
	natsCreds := fs.String("nats-creds", "", "NATS credentials file for --nats-url")
	natsListen := fs.String("nats-listen", "127.0.0.1:4222", "embedded NATS address for agents")
	syncAlways := fs.Bool("sync-always", true, "embedded NATS: fsync every write before acknowledging it")
	replicas := fs.Int("replicas", 1, "replicas of every stream and bucket (3 on a NATS cluster)")
	vpc := fs.String("default-vpc", "", "FM's own VPC, used by networks created with useDefaultValues=True")
	subnet := fs.String("default-subnet", "", "FM's own subnet")
	region := fs.String("default-region", "", "FM's own AWS region")
	instanceType := fs.String("default-instance-type", "m5.2xlarge", "cloud instance type of instances created without one")
	keyFile := fs.String("admin-key-file", "", "where the first admin API key is written (default DATA/admin-key.json)")
	logFormat := fs.String("log-format", "json", "console or json")
	logLevel := fs.String("log-level", "info", "trace, debug, info, warn or error")
	if err := parseRoleFlags(fs, args); err != nil {
		return err
	}
	if *replicas < 1 || *replicas > 5 {
		return usageError{fmt.Errorf("--replicas must be 1 to 5, not %d", *replicas)}
	}
	log, err := newLogger(*logFormat, *logLevel, stderr)
	if err != nil {
		return err
	}
	dir, err := filepath.Abs(*dataDir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("data folder: %w", err)
	}
	var b *busConn
	if *natsURL != "" {
		b, err = externalBus(*natsURL, *natsCreds, "fm-server", log)
	} else {
		b, err = embeddedBus(dir, *natsListen, "fm-server", *syncAlways, log)
	}
	if err != nil {
		return err
	}
	defer b.close()
	topo := bus.DefaultTopology()
	topo.Replicas = *replicas
	srv, err := server.New(server.Config{
		Conn: b.nc, Listen: *listen, Topology: topo, Logger: log, DefaultInstanceType: *instanceType,
		Network: server.NetworkDefaults{VpcID: *vpc, SubnetID: *subnet, Region: *region},
	})
	if err != nil {
		return err
	}
	defer srv.Close()
	if *keyFile == "" {
		*keyFile = filepath.Join(dir, "admin-key.json")
	}
	created, err := srv.EnsureAdminKey(ctx, *keyFile)
	if err != nil {
		return err
	}
	if created {
		fmt.Fprintf(stdout, "created the admin API key in %s\n", *keyFile)
	}
	fmt.Fprintf(stdout, "fm server: REST API http://%s, NATS %s\n", srv.Addr(), b.clientURL)
	return srv.Run(ctx)
}
