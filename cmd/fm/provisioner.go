package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/internal/startup"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
	"github.com/fleetmanager/fm/provisioner/archive"
	"github.com/fleetmanager/fm/provisioner/ec2"
	"github.com/fleetmanager/fm/provisioner/local"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// runProvisioner is `fm provisioner`: the provisioner on its own, against
// an FM bus.
func runProvisioner(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("fm provisioner", flag.ContinueOnError)
	fs.SetOutput(stderr)
	backendName := fs.String("backend", "local", "machine backend: local or ec2")
	natsURL := fs.String("nats-url", "", "FM's NATS URL")
	natsCreds := fs.String("nats-creds", "", "NATS credentials file (fm nats-creds --role provisioner makes one)")
	natsCA := fs.String("nats-ca", "", "CA file to verify the NATS server's TLS certificate with")
	agentURL := fs.String("agent-nats-url", "", "the NATS URL machines' agents use (default --nats-url)")
	var lc localFlags
	fs.StringVar(&lc.dir, "dir", "./.fm/local", "local backend: folder of the machines and their volumes")
	fs.StringVar(&lc.s3.Bucket, "snapshot-s3-bucket", "", "local backend: keep snapshot archives in this S3 bucket (default: the bus's object store "+protocol.ObjectStoreSnapshots+")")
	fs.StringVar(&lc.s3.Prefix, "snapshot-s3-prefix", "fm/snapshots/", "local backend: prefix of the archives' keys in the S3 bucket")
	fs.StringVar(&lc.s3.Region, "snapshot-s3-region", os.Getenv("AWS_REGION"), "local backend: region of the S3 bucket")
	fs.StringVar(&lc.s3.Endpoint, "snapshot-s3-endpoint", "", "local backend: URL of an S3-compatible store (default AWS's)")
	var ec ec2Flags
	fs.StringVar(&ec.region, "ec2-region", os.Getenv("AWS_REGION"), "ec2 backend: region of networks that name none")
	fs.StringVar(&ec.endpoint, "ec2-endpoint", "", "ec2 backend: AWS-compatible endpoint for EC2, Route53 and STS (default AWS's)")
	fs.StringVar(&ec.ingress, "ec2-ingress-cidrs", "0.0.0.0/0", "ec2 backend: comma-separated CIDRs FM's web security group opens SSH, HTTP and HTTPS to")
	fs.DurationVar(&ec.poll, "ec2-poll", 5*time.Second, "ec2 backend: how often a wait for AWS looks")
	secretKeyFile := fs.String("secret-key-file", "", "FM's secret key (fm server's DATA/secrets.key): opens new machines' join tokens and key pair cloud credentials")
	metricsAddr := fs.String("metrics-addr", "", "serve /metrics at this address, over plain HTTP and without a key (firewall it)")
	logFormat := fs.String("log-format", "json", "console or json")
	logLevel := fs.String("log-level", "info", "trace, debug, info, warn or error")
	if err := startup.ParseRoleFlags(fs, args); err != nil {
		return err
	}
	if *natsURL == "" {
		return usageError{Err: fmt.Errorf("--nats-url is required")}
	}
	log, err := startup.NewLogger(*logFormat, *logLevel, stderr)
	if err != nil {
		return err
	}
	if *agentURL == "" {
		*agentURL = *natsURL
	}
	if *secretKeyFile != "" {
		key, err := seal.LoadKey(*secretKeyFile)
		if err != nil {
			return usageError{Err: fmt.Errorf("--secret-key-file: %w", err)}
		}
		box, err := seal.New(key)
		if err != nil {
			return usageError{Err: fmt.Errorf("--secret-key-file: %w", err)}
		}
		ec.openSecret = box.Open
		lc.secretKey = key
	} else {
		log.Warn().Msg("no --secret-key-file: this provisioner cannot open new machines' join tokens nor seal snapshot archives, so reprovisions and snapshots will be refused")
	}
	b, err := externalBus(*natsURL, *natsCreds, "fm-provisioner", &security{caFile: *natsCA}, log)
	if err != nil {
		return err
	}
	defer b.close()
	backend, err := newBackend(ctx, b, *backendName, *agentURL, lc, ec, log)
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	p, err := provisioner.New(provisioner.Config{Conn: b.nc, Backend: backend, OpenSecret: ec.openSecret, Metrics: reg, Logger: log})
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "fm provisioner: %s backend, bus %s\n", backend.Name(), *natsURL)
	if *metricsAddr != "" {
		addr, err := serveMetrics(ctx, *metricsAddr, reg, log)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "  metrics    http://%s/metrics (no API key)\n", addr)
	}
	return startError(p.Run(ctx))
}

// localFlags configure the local backend.
type localFlags struct {
	dir       string
	s3        archive.S3Config // the snapshot store, if Bucket is set
	secretKey []byte           // FM's secret key, which seals snapshot archives
}

// ec2Flags configure the EC2 backend.
type ec2Flags struct {
	region, endpoint, ingress string
	poll                      time.Duration
	openSecret                func(sealed, where string) (string, error) // FM's secret key, if given
}

// newBackend builds the named backend; agentURL is the bus as its machines
// reach it.
func newBackend(ctx context.Context, b *busConn, name, agentURL string, lc localFlags, ec ec2Flags, log zerolog.Logger) (provisioner.Backend, error) {
	switch name {
	case "local":
		abs, err := filepath.Abs(lc.dir)
		if err != nil {
			return nil, err
		}
		agentBin, err := defaultAgentBinary(log)
		if err != nil {
			return nil, err
		}
		archives, err := snapshotStore(ctx, b, lc.s3)
		if err != nil {
			return nil, err
		}
		log.Info().Str("agent_binary", agentBin).Msg("local machines run this agent")
		return local.New(local.Config{Dir: abs, AgentBinary: agentBin, NATSURL: agentURL, Archives: archives, SecretKey: lc.secretKey, Logger: log})
	case "ec2":
		cfg := ec2.Config{Region: ec.region, Endpoint: ec.endpoint, AgentNATSURL: agentURL, Poll: ec.poll}
		for _, c := range strings.Split(ec.ingress, ",") {
			if c = strings.TrimSpace(c); c != "" {
				cfg.IngressCIDRs = append(cfg.IngressCIDRs, c)
			}
		}
		cfg.OpenSecret = ec.openSecret
		b, err := ec2.New(cfg)
		if err != nil {
			return nil, usageError{Err: err}
		}
		return b, nil
	}
	return nil, usageError{Err: fmt.Errorf("--backend: %q is not a backend (local, ec2)", name)}
}

// agentBinaryName is the slim agent build (cmd/fm-agent) beside the fm
// binary, where `make build` puts it.
const agentBinaryName = "fm-agent"

// defaultAgentBinary is what machines run as their agent: the slim build
// beside this binary when it is the one this binary was built with (its
// SHA-256 stamped in agentSHA256 by make and the e2e harness), else this
// binary (fm agent), which does the same with more memory. A slim build
// left by an earlier build is neither run nor served.
func defaultAgentBinary(log zerolog.Logger) (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", err
	}
	return agentBinaryBeside(exe, agentSHA256, log), nil
}

func agentBinaryBeside(exe, wantSHA256 string, log zerolog.Logger) string {
	slim := filepath.Join(filepath.Dir(exe), agentBinaryName)
	st, err := os.Stat(slim)
	if err != nil || !st.Mode().IsRegular() || st.Mode().Perm()&0o111 == 0 {
		return exe
	}
	if wantSHA256 == "" {
		log.Warn().Str("agent_binary", slim).Msg("this fm was built without the digest of its slim agent build (make build stamps it): machines run fm itself")
		return exe
	}
	got, err := fileSHA256(slim)
	if err != nil || got != wantSHA256 {
		log.Warn().Str("agent_binary", slim).Str("sha256", got).Str("want", wantSHA256).AnErr("error", err).
			Msg("the slim agent build beside fm is not the one it was built with: machines run fm itself")
		return exe
	}
	return slim
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// snapshotStore is where the local backend keeps snapshot archives: an S3
// bucket when one is given, else the bus's object store.
func snapshotStore(ctx context.Context, b *busConn, s3 archive.S3Config) (local.Archives, error) {
	if s3.Bucket != "" {
		st, err := archive.NewS3(ctx, s3)
		if err != nil {
			return nil, usageError{Err: err}
		}
		return st, nil
	}
	js, err := jetstream.New(b.nc)
	if err != nil {
		return nil, err
	}
	return archive.NewObjectStore(ctx, js)
}
