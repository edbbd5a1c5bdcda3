package agent

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/rs/zerolog"
)

// TestAKitFetchRemovesWhatAnInterruptedOneLeft: an agent killed while it
// downloaded or extracted a kit leaves a partial archive in the cache and a
// partial extraction beside the kits (each up to gigabytes); the next kit
// fetch removes them, and nothing else.
func TestAKitFetchRemovesWhatAnInterruptedOneLeft(t *testing.T) {
	m := newMachine(Config{Instance: "in-kit", RootDir: t.TempDir(), DataDir: t.TempDir()}, zerolog.Nop())
	k := &kits{m: m}
	stale := []string{
		filepath.Join(m.kitCache, ".0123abcd.tar.gz.4242"),    // a download from a URL
		filepath.Join(m.kitCache, ".object-dss-14.tar.gz.77"), // from the object store
		filepath.Join(m.kitRoot, ".extract-99", "dataiku-dss-14.0.0", "installer.sh"),
	}
	kept := []string{filepath.Join(m.kitCache, "object-dss-13.tar.gz"), filepath.Join(m.kitRoot, "other", "file")}
	for _, p := range append(stale, kept...) {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("partial"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := k.prepare(context.Background(), standinKit(t, "14.0.0")); err != nil {
		t.Fatal(err)
	}
	for _, p := range stale {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s is left (%v)", p, err)
		}
	}
	for _, p := range kept {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s was removed: %v", p, err)
		}
	}
}
