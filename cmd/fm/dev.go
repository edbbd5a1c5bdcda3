package main

import (
	"context"
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/internal/startup"
	"github.com/fleetmanager/fm/provisioner"
	"github.com/fleetmanager/fm/server"
	"github.com/prometheus/client_golang/prometheus"
)

// runDev is `fm dev`: the embedded default. One process holds an embedded
// NATS server with JetStream (file storage under --data) and the FM server.
func runDev(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("fm dev", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dataDir := fs.String("data", "./.fm", "data folder: the bus store, the admin key (env FM_DATA)")
	listen := fs.String("listen", "127.0.0.1:10000", "REST API address (env FM_LISTEN)")
	var mf metricsFlags
	mf.register(fs)
	var af alertFlags
	af.register(fs)
	var acf acmeFlags
	acf.register(fs)
	natsListen := fs.String("nats-listen", "", "NATS address for agents (default: a loopback port, kept across restarts)")
	logFormat := fs.String("log-format", "console", "console or json")
	logLevel := fs.String("log-level", "info", "trace, debug, info, warn or error")
	kitsDir := fs.String("kits", defaultKitsDir(), "folder of DSS kit archives (dataiku-dss-<version>[-<flavour>].tar.gz) to register as images")
	imagesFile := fs.String("images", "", "JSON file listing more images to register (an array of image objects)")
	heartbeat := fs.Int("heartbeat-seconds", 10, "agents' heartbeat interval; three missed ones show an agent as not responding")
	credsTTL := fs.Duration("agent-creds-ttl", 24*time.Hour, "how long agents' NATS credentials last; agents renew them after two thirds")
	secretKeyFile := fs.String("secret-key-file", "", "key that seals the secrets FM stores (default DATA/secrets.key, created if missing)")
	withTLS := fs.Bool("tls", false, "serve the REST API and NATS with TLS (a self-signed CA and certificate under DATA/tls)")
	if err := startup.ParseRoleFlags(fs, args); err != nil {
		return err
	}
	if err := checkHeartbeat(*heartbeat); err != nil {
		return err
	}
	acmeConf, err := acf.config()
	if err != nil {
		return err
	}
	if err := af.check(); err != nil {
		return err
	}
	log, err := startup.NewLogger(*logFormat, *logLevel, stderr)
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
	lock, err := lockDataDir(dir)
	if err != nil {
		return err
	}
	defer lock.Close()
	secretKey, err := loadSecretKey(*secretKeyFile, dir)
	if err != nil {
		return err
	}
	// The bus is always in operator mode: each agent gets its own
	// credentials, even on one host.
	sec, err := openSecurity(dir, filepath.Join(dir, "nats-auth"), *withTLS, tlsFlags{})
	if err != nil {
		return err
	}
	b, err := embeddedBus(dir, *natsListen, "fm-dev", false, sec, log)
	if err != nil {
		return err
	}
	defer b.close()
	var natsCreds []string
	for _, role := range []string{"readonly", "admin"} {
		path, err := sec.operatorCreds(dir, role)
		if err != nil {
			return err
		}
		natsCreds = append(natsCreds, path)
	}

	// The server serves the agent its machines run, for upgrade-agent.
	agentBin, err := defaultAgentBinary(log)
	if err != nil {
		return err
	}
	// One registry: the server serves the provisioner's metrics too.
	reg := prometheus.NewRegistry()
	srv, err := server.New(server.Config{
		Conn:   b.nc,
		Listen: *listen,
		// The local backend has one network: the machine FM runs on.
		Network:          server.NetworkDefaults{VpcID: "vpc-local", SubnetID: "subnet-local", Region: "local"},
		LocalBackend:     true,
		AgentBinary:      agentBin,
		SecretKey:        secretKey,
		HeartbeatSeconds: *heartbeat,
		AlertInterval:    af.interval,
		AlertHoldFor:     af.hold,
		ACME:             acmeConf,
		AgentCredsTTL:    *credsTTL,
		Authority:        sec.authority,
		SystemConn:       b.sys,
		TLS:              sec.tls,
		CAPEM:            sec.caPEM,
		Logger:           log,
		MetricsAddr:      mf.addr,
		MetricsPublic:    mf.public,
		Metrics:          reg,
	})
	if err != nil {
		return startError(err)
	}
	defer srv.Close()
	backend, err := newBackend(ctx, b, "local", b.clientURL, localFlags{dir: filepath.Join(dir, "local"), secretKey: secretKey}, ec2Flags{}, log)
	if err != nil {
		return err
	}
	// Named after its data folder, fm dev's provisioner takes its lease
	// back at once when fm dev starts again after a crash, rather than
	// waiting for the lease of its previous life to expire.
	box, err := seal.New(secretKey)
	if err != nil {
		return err
	}
	prov, err := provisioner.New(provisioner.Config{Conn: b.nc, Backend: backend, Holder: devHolder(dir), OpenSecret: box.Open, Metrics: reg, Logger: log})
	if err != nil {
		return err
	}
	keyFile := filepath.Join(dir, "admin-key.json")
	created, err := srv.EnsureAdminKey(ctx, keyFile)
	if err != nil {
		return err
	}
	var images []string
	if *kitsDir != "" {
		ids, err := srv.RegisterKits(ctx, *kitsDir)
		if err != nil && !(errors.Is(err, os.ErrNotExist) && !flagGiven(fs, "kits")) {
			return err
		}
		images = append(images, ids...)
	}
	if *imagesFile != "" {
		ids, err := srv.RegisterImages(ctx, *imagesFile)
		if err != nil {
			return err
		}
		images = append(images, ids...)
	}
	if len(images) == 0 {
		return errors.New("no image to deploy: build the stand-in kits (make kits) or pass --kits or --images")
	}
	state := "existing"
	if created {
		state = "created"
	}
	fmt.Fprintf(stdout, "fm dev is running\n  console    %s://%s/ (sign in with the admin key's id and secret)\n  REST API   %s://%s\n  NATS       %s (nats --creds %s)\n  data       %s\n  machines   %s\n  admin key  %s (%s; export FM_KEY_FILE=%s)\n",
		sec.scheme(), srv.Addr(), sec.scheme(), srv.Addr(), b.clientURL, natsCreds[0], dir, filepath.Join(dir, "local"), keyFile, state, keyFile)
	if sec.caFile != "" {
		fmt.Fprintf(stdout, "  TLS CA     %s (export FM_CA_FILE=%s; nats --tlsca %s)\n", sec.caFile, sec.caFile, sec.caFile)
	}
	if a := srv.MetricsAddr(); a != nil {
		fmt.Fprintf(stdout, "  metrics    %s://%s/metrics (no API key)\n", sec.scheme(), a)
	}
	fmt.Fprintf(stdout, "  images     %s\nPress Ctrl-C to stop (machines keep running and are adopted at the next start).\n", strings.Join(images, ", "))
	provDone := make(chan error, 1)
	go func() { provDone <- prov.Run(ctx) }()
	err = srv.Run(ctx)
	if perr := <-provDone; err == nil {
		err = perr
	}
	return err
}

// lockDataDir makes sure one fm dev at a time uses a data folder: the lock
// is held while the process lives, released by its end however it ends.
func lockDataDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, "fm-dev.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("data folder: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("data folder %s is in use by another fm dev (%v)", dir, err)
	}
	return f, nil
}

// devHolder names fm dev's provisioner in its lease: one data folder holds
// one fm dev at a time (lockDataDir), so the name is its own.
func devHolder(dir string) string {
	host, _ := os.Hostname()
	sum := sha256.Sum256([]byte(dir))
	return fmt.Sprintf("fm-dev-%s-%x", host, sum[:6])
}

// defaultKitsDir is bin/kits beside bin/fm, where `make` puts the stand-in
// kits.
func defaultKitsDir() string {
	exe, err := os.Executable()
	if err != nil {
		return ""
	}
	return filepath.Join(filepath.Dir(exe), "kits")
}

func flagGiven(fs *flag.FlagSet, name string) bool {
	given := false
	fs.Visit(func(f *flag.Flag) { given = given || f.Name == name })
	return given || os.Getenv(startup.EnvName(name)) != ""
}
