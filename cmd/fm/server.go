package main

import (
	"context"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"net/netip"
	neturl "net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/internal/startup"
	"github.com/fleetmanager/fm/server"
)

// runServer is `fm server`: the FM server on an external NATS (--nats-url)
// or on an embedded one.
func runServer(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("fm server", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dataDir := fs.String("data", "./.fm", "data folder: the embedded bus store, the admin key (env FM_DATA)")
	listen := fs.String("listen", "127.0.0.1:10000", "REST API address")
	var mf metricsFlags
	mf.register(fs)
	var af alertFlags
	af.register(fs)
	var acf acmeFlags
	acf.register(fs)
	natsURL := fs.String("nats-url", "", "external NATS URL(s); empty runs an embedded NATS")
	natsCreds := fs.String("nats-creds", "", "NATS credentials file for --nats-url")
	natsListen := fs.String("nats-listen", "127.0.0.1:4222", "embedded NATS address for agents")
	syncAlways := fs.Bool("sync-always", true, "embedded NATS: fsync every write before acknowledging it")
	replicas := fs.Int("replicas", 1, "replicas of every stream and bucket (3 on a NATS cluster)")
	heartbeat := fs.Int("heartbeat-seconds", 10, "agents' heartbeat interval; three missed ones show an agent as not responding")
	credsTTL := fs.Duration("agent-creds-ttl", 24*time.Hour, "how long agents' NATS credentials last; agents renew them after two thirds")
	vpc := fs.String("default-vpc", "", "FM's own VPC, used by networks created with useDefaultValues=True")
	subnet := fs.String("default-subnet", "", "FM's own subnet")
	region := fs.String("default-region", "", "FM's own AWS region")
	instanceType := fs.String("default-instance-type", "m5.2xlarge", "cloud instance type of instances created without one")
	keyFile := fs.String("admin-key-file", "", "where the first admin API key is written (default DATA/admin-key.json)")
	secretKeyFile := fs.String("secret-key-file", "", "key that seals the secrets FM stores (default DATA/secrets.key, created if missing); every replica needs the same")
	withTLS := fs.Bool("tls", true, "serve the REST API (and the embedded NATS) with TLS")
	var tf tlsFlags
	fs.StringVar(&tf.cert, "tls-cert", "", "TLS certificate file (PEM); default: a self-signed one under DATA/tls")
	fs.StringVar(&tf.key, "tls-key", "", "TLS key file of --tls-cert")
	fs.StringVar(&tf.ca, "tls-ca", "", "CA file of --tls-cert, given to agents to verify FM with")
	fs.StringVar(&tf.hosts, "tls-hosts", "", "more host names or addresses (comma-separated) the self-signed certificate covers")
	consoleURL := fs.String("console-url", "", "FM's URL as people's browsers reach it (e.g. https://fm.example.com behind a load balancer that ends TLS): "+
		"the web console's SSO callback is made from it, and its https makes the session cookie Secure (default: the request's host, TLS as served)")
	advertise := fs.String("advertise-url", "", "FM's URL as machines reach it, for their join and agent download (default: the REST API's listen address)")
	agentBinary := fs.String("agent-binary", "", "the binary cloud machines download and run as their agent (default: fm-agent beside this one, else this one; \"none\" serves none)")
	authorityDir := fs.String("nats-authority", "", "folder of FM's NATS operator and account keys (default DATA/nats-auth with the embedded NATS; "+
		"with --nats-url, the folder whose keys the cluster trusts: see fm nats-config)")
	natsCA := fs.String("nats-ca", "", "CA file to verify an external NATS's TLS certificate with")
	identityCerts := fs.String("ec2-identity-certs", "", "AWS's RSA certificates for EC2 instance identity documents (PEM, one per region, from AWS's documentation): "+
		"a machine the EC2 backend launched then joins only from that machine (docs/security.md)")
	trusted := fs.String("trusted-proxies", "", "load balancers (addresses or CIDR networks, comma-separated) whose X-Forwarded-For names the client")
	startTimeout := fs.Duration("start-timeout", 2*time.Minute, "how long to wait at start for the bus to take FM's streams and buckets (a cluster just formed elects its leaders first)")
	drain := fs.Duration("drain", 0, "on stop, keep serving this long while /healthz answers 503, so that a load balancer stops sending calls first (e.g. 10s)")
	pprofAddr := fs.String("pprof-addr", "", "serve Go's profiles (/debug/pprof/) at this loopback address")
	logFormat := fs.String("log-format", "json", "console or json")
	logLevel := fs.String("log-level", "info", "trace, debug, info, warn or error")
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
	var ec2Certs []*x509.Certificate
	if *identityCerts != "" {
		if ec2Certs, err = server.LoadEC2IdentityCerts(*identityCerts); err != nil {
			return usageError{Err: fmt.Errorf("--ec2-identity-certs: %w", err)}
		}
	}
	proxies, err := parsePrefixes(*trusted)
	if err != nil {
		return usageError{Err: fmt.Errorf("--trusted-proxies: %w", err)}
	}
	if *drain < 0 || *drain > 5*time.Minute {
		return usageError{Err: fmt.Errorf("--drain must be 0 to 5m, not %s", *drain)}
	}
	if *replicas < 1 || *replicas > 5 {
		return usageError{Err: fmt.Errorf("--replicas must be 1 to 5, not %d", *replicas)}
	}
	log, err := startup.NewLogger(*logFormat, *logLevel, stderr)
	if err != nil {
		return err
	}
	for _, c := range ec2Certs {
		log.Info().Str("subject", c.Subject.String()).Time("expires", c.NotAfter).Msg("EC2 machines join with an identity document this certificate verifies")
	}
	if *pprofAddr != "" {
		stop, err := servePprof(*pprofAddr, log)
		if err != nil {
			return err
		}
		defer stop()
	}
	dir, err := filepath.Abs(*dataDir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("data folder: %w", err)
	}
	secretKey, err := loadSecretKey(*secretKeyFile, dir)
	if err != nil {
		return err
	}
	if *advertise != "" {
		u, err := neturl.Parse(*advertise)
		if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
			return usageError{Err: fmt.Errorf("--advertise-url: %q is not an http(s) URL", *advertise)}
		}
		tf.hosts += "," + u.Hostname()
	}
	if *startTimeout < time.Second {
		return usageError{Err: fmt.Errorf("--start-timeout must be at least 1s, not %s", *startTimeout)}
	}
	if *authorityDir == "" && *natsURL == "" {
		*authorityDir = filepath.Join(dir, "nats-auth")
	}
	sec, err := openSecurity(dir, *authorityDir, *withTLS, tf)
	if err != nil {
		return err
	}
	var b *busConn
	if *natsURL != "" {
		if sec.authority == nil {
			log.Warn().Msg("no --nats-authority: agents cannot get credentials of their own, so they cannot join; see docs/security.md")
		}
		busSec := &security{authority: sec.authority, caFile: *natsCA}
		b, err = externalBus(*natsURL, *natsCreds, "fm-server", busSec, log)
		if err == nil && *natsCA != "" {
			// Agents verify both the REST API and the bus.
			ca, rerr := os.ReadFile(*natsCA)
			if rerr != nil {
				return rerr
			}
			sec.caPEM += string(ca)
		}
	} else {
		b, err = embeddedBus(dir, *natsListen, "fm-server", *syncAlways, sec, log)
	}
	if err != nil {
		return err
	}
	defer b.close()
	switch *agentBinary {
	case "none":
		*agentBinary = ""
	case "":
		if *agentBinary, err = defaultAgentBinary(log); err != nil {
			return err
		}
	}
	joinURL := ""
	if *advertise != "" {
		joinURL = strings.TrimRight(*advertise, "/") + server.JoinPath
	}
	topo := bus.DefaultTopology()
	topo.Replicas = *replicas
	srv, err := server.New(server.Config{
		Conn: b.nc, Listen: *listen, Topology: topo, Logger: log, DefaultInstanceType: *instanceType, SecretKey: secretKey,
		AgentCredsTTL: *credsTTL, HeartbeatSeconds: *heartbeat, AlertInterval: af.interval, AlertHoldFor: af.hold,
		Network:   server.NetworkDefaults{VpcID: *vpc, SubnetID: *subnet, Region: *region},
		Authority: sec.authority, SystemConn: b.sys, JoinURL: joinURL, ConsoleURL: *consoleURL, TLS: sec.tls, CAPEM: sec.caPEM,
		AgentBinary: *agentBinary, MetricsAddr: mf.addr, MetricsPublic: mf.public, DrainTime: *drain, StartTimeout: *startTimeout,
		TrustedProxies: proxies, ACME: acmeConf, EC2IdentityCerts: ec2Certs,
	})
	if err != nil {
		return startError(err)
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
	fmt.Fprintf(stdout, "fm server: REST API %s://%s, NATS %s\n", sec.scheme(), srv.Addr(), b.clientURL)
	if a := srv.MetricsAddr(); a != nil {
		fmt.Fprintf(stdout, "metrics: %s://%s/metrics (no API key: let only Prometheus reach it)\n", sec.scheme(), a)
	}
	if sec.caFile != "" {
		fmt.Fprintf(stdout, "TLS CA: %s (clients: export FM_CA_FILE=%s)\n", sec.caFile, sec.caFile)
	}
	return srv.Run(ctx)
}

// parsePrefixes reads a comma-separated list of addresses and CIDR
// networks.
func parsePrefixes(list string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, item := range strings.Split(list, ",") {
		if item = strings.TrimSpace(item); item == "" {
			continue
		}
		p, err := netip.ParsePrefix(item)
		if err != nil {
			a, aerr := netip.ParseAddr(item)
			if aerr != nil {
				return nil, fmt.Errorf("%q is neither an address nor a CIDR network", item)
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		if p.Bits() == 0 {
			return nil, fmt.Errorf("%q trusts every address: list the load balancers' own", item)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

// metricsFlags say where /metrics is served and who may read it.
type metricsFlags struct {
	addr   string
	public bool
}

func (f *metricsFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.addr, "metrics-addr", "", "also serve /metrics at this address, without an API key (firewall it: its series name instances)")
	fs.BoolVar(&f.public, "metrics-public", false, "serve /metrics on the REST API's address without an API key (by default it needs one, of any role)")
}

// acmeFlags are the ACME flags fm server and fm dev share: where machines
// of networks with httpsStrategy LETSENCRYPT obtain their certificates.
type acmeFlags struct {
	directory, caFile string
}

func (f *acmeFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.directory, "acme-directory", server.LetsEncryptDirectory, "the ACME directory LETSENCRYPT networks' machines obtain certificates from (an organisation's own ACME CA, or Let's Encrypt's staging)")
	fs.StringVar(&f.caFile, "acme-ca-file", "", "PEM file of the CA the ACME directory's own HTTPS is verified with (default: the machines' system roots)")
}

// config checks the flags and reads the CA file.
func (f *acmeFlags) config() (server.ACMEConfig, error) {
	u, err := neturl.Parse(f.directory)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return server.ACMEConfig{}, usageError{Err: fmt.Errorf("--acme-directory: %q is not an https URL", f.directory)}
	}
	c := server.ACMEConfig{DirectoryURL: f.directory}
	if f.caFile != "" {
		b, err := os.ReadFile(f.caFile)
		if err != nil {
			return c, usageError{Err: fmt.Errorf("--acme-ca-file: %w", err)}
		}
		if !x509.NewCertPool().AppendCertsFromPEM(b) {
			return c, usageError{Err: fmt.Errorf("--acme-ca-file: %s holds no PEM certificate", f.caFile)}
		}
		c.CAPEM = string(b)
	}
	return c, nil
}

// alertFlags are the alerting flags fm server and fm dev share.
type alertFlags struct {
	interval, hold time.Duration
}

func (f *alertFlags) register(fs *flag.FlagSet) {
	fs.DurationVar(&f.interval, "alert-interval", 15*time.Second, "how often the alerts (GET /alerts, the webhook of PUT /alerting) are evaluated")
	fs.DurationVar(&f.hold, "alert-hold", 0, "at most this long a condition must hold before its alert fires (default: each rule's own, as deploy/prometheus's rules say)")
}

func (f *alertFlags) check() error {
	if f.interval < time.Second || f.interval > 10*time.Minute {
		return usageError{Err: fmt.Errorf("--alert-interval must be 1s to 10m, not %s", f.interval)}
	}
	if f.hold < 0 || f.hold > 24*time.Hour {
		return usageError{Err: fmt.Errorf("--alert-hold must be 0 to 24h, not %s", f.hold)}
	}
	return nil
}
