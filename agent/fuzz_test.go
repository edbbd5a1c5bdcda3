package agent

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fleetmanager/fm/protocol"
	"github.com/rs/zerolog"
)

func FuzzDesiredOffer(f *testing.F) {
	good, _ := protocol.Encode(&protocol.DesiredState{Instance: "in-x", Generation: 1, NodeType: "design",
		DSS: protocol.DSSTarget{Version: "14.0.0", Port: 10000, Kit: protocol.KitSource{Object: "k"}}})
	f.Add(good, uint64(3), false)
	f.Add([]byte(`{"v":1,"instance":"in-y"}`), uint64(4), false)
	f.Add([]byte(``), uint64(5), true)
	f.Fuzz(func(t *testing.T, data []byte, rev uint64, deleted bool) {
		rejected := 0
		w := newDesiredWatch("in-x", nil, zerolog.Nop(), func(error, uint64) { rejected++ })
		w.offer(data, rev, deleted)
		if d := w.latest(); d != nil {
			if d.Instance != "in-x" || d.Validate() != nil {
				t.Fatalf("accepted a desired state that is not valid for this instance: %+v", d)
			}
		}
	})
}

func FuzzUntar(f *testing.F) {
	mk := func(entries map[string]string) []byte {
		var buf bytes.Buffer
		gz := gzip.NewWriter(&buf)
		tw := tar.NewWriter(gz)
		for name, body := range entries {
			tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(body)), Typeflag: tar.TypeReg})
			tw.Write([]byte(body))
		}
		tw.Close()
		gz.Close()
		return buf.Bytes()
	}
	f.Add(mk(map[string]string{"kit/installer.sh": "#!/bin/sh"}))
	f.Add(mk(map[string]string{"../escape": "x"}))
	f.Add([]byte("not gzip"))
	f.Fuzz(func(t *testing.T, data []byte) {
		base := t.TempDir()
		dir := filepath.Join(base, "in")
		os.MkdirAll(dir, 0o755)
		archive := filepath.Join(base, "a.tar.gz")
		os.WriteFile(archive, data, 0o644)
		_ = untar(archive, dir)
		// Whatever the archive, nothing lands beside the target folder.
		entries, _ := os.ReadDir(base)
		for _, e := range entries {
			if e.Name() != "in" && e.Name() != "a.tar.gz" {
				t.Fatalf("an archive wrote %s outside its folder", e.Name())
			}
		}
	})
}

func FuzzOpenSSHKeyType(f *testing.F) {
	f.Add([]byte("openssh-key-v1\x00\x00\x00\x00\x04none"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, blob []byte) {
		key := string(pem.EncodeToMemory(&pem.Block{Type: "OPENSSH PRIVATE KEY", Bytes: blob}))
		name := defaultKeyName(key)
		if name != "id_rsa" && name != "id_ecdsa" && name != "id_ed25519" {
			t.Fatalf("key name %q", name)
		}
	})
}

func FuzzParseAPIKey(f *testing.F) {
	f.Add(`[{"id":"a","key":"secret"}]`)
	f.Add(`{"key":"secret"}`)
	f.Add(`[]`)
	f.Fuzz(func(t *testing.T, out string) {
		k, err := parseAPIKey(out)
		if err == nil && k == "" {
			t.Fatal("an empty key was accepted")
		}
	})
}

func FuzzStateFiles(f *testing.F) {
	mk, _ := json.Marshal(marker{Instance: "in-x", Generation: 3})
	cur, _ := json.Marshal(commandCursor{LastSeq: 9, Recent: []string{"a"}})
	f.Add(mk)
	f.Add(cur)
	f.Add([]byte(`{"generation":"x"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		m := newMachine(Config{Instance: "in-x", RootDir: dir, DataDir: dir}, zerolog.Nop())
		os.MkdirAll(m.stateDir, 0o700)
		os.WriteFile(m.markerPath(), data, 0o600)
		got := m.loadMarker()
		if got.Generation != 0 && got.Instance != "in-x" {
			t.Fatalf("a marker of another instance was used: %+v", got)
		}
		var c commandCursor
		if _, err := loadJSON(m.markerPath(), &c); err == nil {
			c.done("x", 1)
			if !c.seen("x") || len(c.Recent) > recentCommands {
				t.Fatal("cursor bookkeeping broken")
			}
		}
	})
}

func TestUntarRefusesEscapes(t *testing.T) {
	for _, name := range []string{"../evil", "/abs/evil", "a/../../evil"} {
		var buf bytes.Buffer
		gz := gzip.NewWriter(&buf)
		tw := tar.NewWriter(gz)
		tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: 1, Typeflag: tar.TypeReg})
		tw.Write([]byte("x"))
		tw.Close()
		gz.Close()
		p := filepath.Join(t.TempDir(), "k.tar.gz")
		os.WriteFile(p, buf.Bytes(), 0o644)
		if err := untar(p, t.TempDir()); err == nil || !strings.Contains(err.Error(), "leaves the kit folder") {
			t.Errorf("%s: %v", name, err)
		}
	}
}
