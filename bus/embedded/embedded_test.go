package embedded_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/bus/embedded"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestEmbeddedKeepsDataAcrossRestart(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "js")
	start := func() *embedded.Server {
		e, err := embedded.Start(embedded.Config{StoreDir: dir, Listen: "127.0.0.1:0", Logger: zerolog.Nop()})
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
	e := start()
	nc, err := bus.Connect(bus.ConnectConfig{InProcess: e, Name: "test", Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	js, _ := jetstream.New(nc)
	if err := bus.DefaultTopology().Declare(ctx(t), js); err != nil {
		t.Fatal(err)
	}
	kv, _ := js.KeyValue(ctx(t), protocol.BucketNetworks)
	if _, err := kv.Put(ctx(t), "vn-1", []byte("kept")); err != nil {
		t.Fatal(err)
	}
	nc.Close()
	e.Shutdown()
	e.Shutdown() // twice is fine

	e = start()
	defer e.Shutdown()
	nc, err = bus.Connect(bus.ConnectConfig{URL: e.ClientURL(), Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ = jetstream.New(nc)
	kv, err = js.KeyValue(ctx(t), protocol.BucketNetworks)
	if err != nil {
		t.Fatal(err)
	}
	ent, err := kv.Get(ctx(t), "vn-1")
	if err != nil || string(ent.Value()) != "kept" {
		t.Fatalf("after restart: %v %v", ent, err)
	}
}

func TestStartErrors(t *testing.T) {
	if _, err := embedded.Start(embedded.Config{}); err == nil {
		t.Error("no store dir accepted")
	}
	if _, err := embedded.Start(embedded.Config{StoreDir: t.TempDir(), Listen: "nope"}); err == nil {
		t.Error("bad listen address accepted")
	}
}
