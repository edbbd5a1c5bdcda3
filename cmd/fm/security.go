package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fleetmanager/fm/internal/natsauth"
	"github.com/fleetmanager/fm/internal/pki"
	"github.com/fleetmanager/fm/internal/startup"
	"github.com/nats-io/jwt/v2"
)

// security is how a role's listeners and bus are secured: FM's NATS
// authority (operator mode: per-role and per-agent credentials) and TLS.
type security struct {
	authority *natsauth.Authority // nil: the bus takes anyone (no operator mode)
	tls       *tls.Config         // the server side of TLS; nil: plain
	caPEM     string              // what clients verify tls with
	caFile    string
}

// tlsFlags are the TLS settings of a role's listeners.
type tlsFlags struct {
	cert, key, ca string
	hosts         string
}

// openSecurity loads (or creates, on first start) the NATS authority kept
// in authorityDir (none if ""), and the TLS of the listeners when withTLS:
// the given files, or a self-signed CA and certificate under dir/tls.
func openSecurity(dir, authorityDir string, withTLS bool, tf tlsFlags) (*security, error) {
	sec := &security{}
	if authorityDir != "" {
		a, err := natsauth.Open(authorityDir)
		if err != nil {
			return nil, err
		}
		sec.authority = a
	}
	if !withTLS {
		return sec, nil
	}
	files := pki.Files{CA: tf.ca, Cert: tf.cert, Key: tf.key}
	if tf.cert == "" && tf.key == "" {
		hosts := pki.DefaultHosts()
		for _, h := range strings.Split(tf.hosts, ",") {
			if h = strings.TrimSpace(h); h != "" {
				hosts = append(hosts, h)
			}
		}
		var err error
		if files, err = pki.EnsureSelfSigned(filepath.Join(dir, "tls"), hosts); err != nil {
			return nil, err
		}
	} else if tf.cert == "" || tf.key == "" {
		return nil, usageError{Err: fmt.Errorf("--tls-cert and --tls-key go together")}
	}
	conf, err := pki.ServerConfig(files)
	if err != nil {
		return nil, err
	}
	sec.tls = conf
	if files.CA != "" {
		b, err := os.ReadFile(files.CA)
		if err != nil {
			return nil, fmt.Errorf("tls CA: %w", err)
		}
		sec.caPEM, sec.caFile = string(b), files.CA
	}
	return sec, nil
}

// scheme is the REST API's URL scheme.
func (s *security) scheme() string {
	if s.tls != nil {
		return "https"
	}
	return "http"
}

// operatorCreds makes sure dir/nats-<role>.creds holds NATS credentials for
// an operator (role readonly or admin), for the NATS CLI, and returns its
// path. An existing file is kept if its credentials are of the role's
// account and still valid (not those of before agents and read-only
// operators got NATS accounts of their own, with which JetStream's answers
// could be sent into FM's keys).
func (s *security) operatorCreds(dir, role string) (string, error) {
	path := filepath.Join(dir, "nats-"+role+".creds")
	account, mint := natsauth.AccountFM, func() ([]byte, string, error) {
		return s.authority.Creds("operator-"+role, jwt.Permissions{}, time.Time{}) // admin: everything
	}
	if role == "readonly" {
		account, mint = natsauth.AccountReaders, func() ([]byte, string, error) { return s.authority.ReaderCreds("operator-"+role, time.Time{}) }
	}
	if b, err := os.ReadFile(path); err == nil && s.authority.CredsAccount(b) == account {
		return path, nil
	}
	creds, _, err := mint()
	if err != nil {
		return "", err
	}
	return path, natsauth.CredsFile(path, creds)
}

// runNATSConfig is `fm nats-config`: the nats-server configuration that makes
// an external NATS cluster trust FM's NATS authority (creating it on first
// use), for the operator to include in every node's configuration.
func runNATSConfig(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("fm nats-config", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("nats-authority", "./.fm/nats-auth", "folder of FM's NATS operator and account keys (created if missing; keep it private)")
	if err := startup.ParseRoleFlags(fs, args); err != nil {
		return err
	}
	a, err := natsauth.Open(*dir)
	if err != nil {
		return err
	}
	conf, err := a.ServerConfig()
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(stdout, "# Fleet Manager's NATS authority (%s): include in every node's nats-server.conf,\n"+
		"# then run fm server --nats-url URL --nats-authority %s\n%s", *dir, *dir, conf)
	return err
}
