package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/fleetmanager/fm/bus"
	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
)

// busConn is the bus a role runs on: an embedded server (owned) or an
// external one.
type busConn struct {
	nc        *nats.Conn
	embedded  *bus.Embedded
	clientURL string // what agents connect to
}

// close drains the connection and stops an embedded server.
func (b *busConn) close() {
	if b.nc != nil {
		_ = b.nc.Drain()
		b.nc.Close()
	}
	if b.embedded != nil {
		b.embedded.Shutdown()
	}
}

// embeddedBus starts an embedded nats-server with its store under dataDir.
// An empty listen reuses the address of the previous start (remembered in
// dataDir/nats.addr), so that agents find the bus again after a restart, or
// picks a free loopback port the first time.
func embeddedBus(dataDir, listen, name string, syncAlways bool, log zerolog.Logger) (*busConn, error) {
	addrFile := filepath.Join(dataDir, "nats.addr")
	remember := listen == ""
	if remember {
		if b, err := os.ReadFile(addrFile); err == nil && strings.TrimSpace(string(b)) != "" {
			listen = strings.TrimSpace(string(b))
		} else {
			listen = "127.0.0.1:0"
		}
	}
	emb, err := bus.StartEmbedded(bus.EmbeddedConfig{
		StoreDir:   filepath.Join(dataDir, "jetstream"),
		Listen:     listen,
		ServerName: name,
		SyncAlways: syncAlways,
		Logger:     log.With().Str("component", "nats").Logger(),
	})
	if err != nil {
		return nil, err
	}
	url := emb.ClientURL()
	if remember {
		if err := os.WriteFile(addrFile, []byte(strings.TrimPrefix(url, "nats://")+"\n"), 0o600); err != nil {
			emb.Shutdown()
			return nil, fmt.Errorf("remember the nats address: %w", err)
		}
	}
	nc, err := bus.Connect(bus.ConnectConfig{InProcess: emb, Name: name, Logger: log.With().Str("component", "bus").Logger()})
	if err != nil {
		emb.Shutdown()
		return nil, err
	}
	return &busConn{nc: nc, embedded: emb, clientURL: url}, nil
}

// externalBus connects to an existing NATS.
func externalBus(url, creds, name string, log zerolog.Logger) (*busConn, error) {
	if url == "" {
		return nil, errors.New("no NATS url")
	}
	nc, err := bus.Connect(bus.ConnectConfig{URL: url, CredsFile: creds, Name: name, Logger: log.With().Str("component", "bus").Logger()})
	if err != nil {
		return nil, err
	}
	return &busConn{nc: nc, clientURL: url}, nil
}
