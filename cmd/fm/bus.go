package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/bus/embedded"
	"github.com/fleetmanager/fm/internal/natsauth"
	"github.com/fleetmanager/fm/internal/pki"
	"github.com/fleetmanager/fm/internal/seal"
	"github.com/nats-io/jwt/v2"
	natsserver "github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// busConn is the bus a role runs on: an embedded server (owned) or an
// external one.
type busConn struct {
	nc        *nats.Conn
	sys       *nats.Conn // as the system account, when FM holds the NATS authority
	embedded  *embedded.Server
	clientURL string // what agents connect to
}

// close drains the connections and stops an embedded server.
func (b *busConn) close() {
	for _, nc := range []*nats.Conn{b.nc, b.sys} {
		if nc != nil {
			_ = nc.Drain()
			nc.Close()
		}
	}
	if b.embedded != nil {
		b.embedded.Shutdown()
	}
}

// embeddedBus starts an embedded nats-server with its store under dataDir,
// in operator mode and with TLS as sec says. An empty listen reuses the
// address of the previous start (remembered in dataDir/nats.addr), so that
// agents find the bus again after a restart, or picks a free loopback port
// the first time.
func embeddedBus(dataDir, listen, name string, syncAlways bool, sec *security, log zerolog.Logger) (*busConn, error) {
	addrFile := filepath.Join(dataDir, "nats.addr")
	remember := listen == ""
	if remember {
		if b, err := os.ReadFile(addrFile); err == nil && strings.TrimSpace(string(b)) != "" {
			listen = strings.TrimSpace(string(b))
		} else {
			listen = "127.0.0.1:0"
		}
	}
	b, err := startEmbeddedBus(dataDir, listen, name, syncAlways, sec, log)
	if err != nil {
		return nil, err
	}
	if remember {
		_, hostPort, _ := strings.Cut(b.clientURL, "://") // nats:// or tls://
		if err := os.WriteFile(addrFile, []byte(hostPort+"\n"), 0o600); err != nil {
			b.close()
			return nil, fmt.Errorf("remember the nats address: %w", err)
		}
	}
	return b, nil
}

// startEmbeddedBus starts the data folder's embedded nats-server on listen
// ("" listens nowhere: in-process connections only) and connects to it.
func startEmbeddedBus(dataDir, listen, name string, syncAlways bool, sec *security, log zerolog.Logger) (*busConn, error) {
	cfg := embedded.Config{
		StoreDir:   filepath.Join(dataDir, "jetstream"),
		Listen:     listen,
		ServerName: name,
		SyncAlways: syncAlways,
		TLS:        sec.tls,
		Logger:     log.With().Str("component", "nats").Logger(),
	}
	if sec.authority != nil {
		cfg.Configure = func(o *natsserver.Options) error {
			return sec.authority.ConfigureEmbedded(o, filepath.Join(dataDir, "nats-resolver"))
		}
	}
	emb, err := embedded.Start(cfg)
	if err != nil {
		return nil, err
	}
	b := &busConn{embedded: emb}
	if listen != "" {
		b.clientURL = emb.ClientURL()
	}
	if err := b.connect(bus.ConnectConfig{InProcess: emb}, name, sec, log); err != nil {
		b.close()
		return nil, err
	}
	// In operator mode the account's JetStream comes up just after the
	// server: wait for it rather than have every role retry.
	if err := waitJetStream(b.nc, 20*time.Second); err != nil {
		b.close()
		return nil, err
	}
	return b, nil
}

// externalBus connects to an existing NATS, with the credentials file given
// or, when FM holds the cluster's NATS authority, credentials it mints.
func externalBus(url, creds, name string, sec *security, log zerolog.Logger) (*busConn, error) {
	if url == "" {
		return nil, errors.New("no NATS url")
	}
	b := &busConn{clientURL: url}
	cc := bus.ConnectConfig{URL: url, CredsFile: creds}
	if sec.caFile != "" {
		conf, err := pki.ClientConfig(sec.caFile)
		if err != nil {
			return nil, err
		}
		cc.TLS = conf
	}
	if err := b.connect(cc, name, sec, log); err != nil {
		b.close()
		return nil, err
	}
	return b, nil
}

// connect opens the role's connection (and, with the authority, the system
// account's, which pushes revocations).
func (b *busConn) connect(cc bus.ConnectConfig, name string, sec *security, log zerolog.Logger) error {
	cc.Name, cc.Logger = name, log.With().Str("component", "bus").Logger()
	if sec.authority != nil && cc.CredsFile != "" {
		// Credentials of the FM account signed before agents and readers
		// had accounts of their own are refused by NATS once this FM
		// pushes its account: say so now, not when the bus drops us.
		b, err := os.ReadFile(cc.CredsFile)
		if err != nil {
			return fmt.Errorf("--nats-creds: %w", err)
		}
		if sec.authority.CredsAccount(b) != natsauth.AccountFM {
			return usageError{Err: fmt.Errorf("--nats-creds %s: these credentials are not valid with the NATS authority in --nats-authority "+
				"(made before FM gave agents and read-only operators NATS accounts of their own?): make new ones with fm nats-creds --role admin", cc.CredsFile)}
		}
	}
	if sec.authority != nil && cc.CredsFile == "" {
		creds, _, err := sec.authority.Creds(name, jwt.Permissions{}, time.Time{})
		if err != nil {
			return err
		}
		cc.Creds = creds
	}
	nc, err := bus.Connect(cc)
	if err != nil {
		return err
	}
	b.nc = nc
	if sec.authority == nil {
		return nil
	}
	sysCreds, _, err := sec.authority.SystemCreds()
	if err != nil {
		return err
	}
	cc.CredsFile, cc.Creds, cc.Name = "", sysCreds, name+"-system"
	b.sys, err = bus.Connect(cc)
	return err
}

// loadSecretKey reads the key that seals FM's stored secrets from path
// (default dataDir/secrets.key), creating it on first start.
func loadSecretKey(path, dataDir string) ([]byte, error) {
	if path == "" {
		path = filepath.Join(dataDir, "secrets.key")
	}
	return seal.LoadOrCreateKey(path)
}

// waitJetStream waits until JetStream answers on nc.
func waitJetStream(nc *nats.Conn, timeout time.Duration) error {
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := js.AccountInfo(ctx)
		cancel()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("jetstream is not available: %w", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
