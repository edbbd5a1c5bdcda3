package local

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/fleetmanager/fm/agent"
	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/fleetmanager/fm/internal/crashpoint"
	"github.com/fleetmanager/fm/internal/crashpoint/crashtable"
	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
	"github.com/fleetmanager/fm/provisioner/archive"
	"github.com/fleetmanager/fm/provisioner/crashtest"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// TestCrashPoints is the crash-point table of the local backend
// (provisioner/crashtest): every operation, killed at every point.
// FM_CRASH_FULL=1 runs every point; by default one point in two (always
// the first and the last of each operation).
func TestCrashPoints(t *testing.T) {
	w := &localWorld{bin: binary(t), key: seal.NewKey()}
	opts := crashtest.Options{Stride: 2, Parallel: 4}
	if crashtable.Full() {
		opts.Stride = 1
	}
	crashtable.Report(t, "provisioner-local", crashtest.Run(t, w, opts))
}

type localWorld struct {
	dir, bin string
	key      []byte // FM's secret key, the same across the backend's restarts
}

func (w *localWorld) Name() string { return "local" }

// Case implements crashtest.World: each case has a machines folder of its
// own, as each has a bus (and so a lease) of its own. Shared, a case's
// provisioner taking its lease would resume (TakeOver) the machine another
// case is pausing.
func (w *localWorld) Case(t testing.TB) crashtest.Case {
	return &localWorld{dir: t.TempDir(), bin: w.bin, key: w.key}
}

func (w *localWorld) backend() *Backend {
	return &Backend{cfg: Config{Dir: w.dir}}
}

func (w *localWorld) Backend(t testing.TB, natsURL string, hook crashpoint.Hook) provisioner.Backend {
	nc, err := nats.Connect(natsURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, _ := jetstream.New(nc)
	store, err := archive.NewObjectStore(context.Background(), js)
	if err != nil {
		t.Fatal(err)
	}
	b, err := New(Config{Dir: w.dir, AgentBinary: w.bin, NATSURL: natsURL, Archives: store, SecretKey: w.key, Crash: hook, Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (w *localWorld) Spec(instance string) *protocol.MachineSpec {
	return &protocol.MachineSpec{Label: instance, DataVolume: protocol.VolumeSpec{SizeGB: crashtest.SizeGB}}
}

// WriteVolume writes a file into the instance's data volume.
func (w *localWorld) WriteVolume(instance, name, content string) error {
	return os.WriteFile(filepath.Join(w.backend().volumeDir(instance), name), []byte(content), 0o644)
}

func (w *localWorld) Cleanup(instance string) {
	b := w.backend()
	cmdline.Stop(cmdline.Find(b.configPath(instance), "agent"), 2*time.Second)
}

func (w *localWorld) Check(t testing.TB, js jetstream.JetStream, instance string, want crashtest.Want) {
	t.Helper()
	b := w.backend()
	agents := cmdline.Find(b.configPath(instance), "agent")
	_, diskErr := os.Stat(b.configPath(instance))
	switch {
	case want.Machines == 0 && (len(agents) != 0 || diskErr == nil):
		t.Errorf("%d agents and an OS disk (%v) left; want no machine", len(agents), diskErr)
	case want.Machines == 1 && want.Running && len(agents) != 1:
		t.Errorf("%d agents run for the instance, want exactly 1", len(agents))
	case want.Machines == 1 && !want.Running && (len(agents) != 0 || diskErr != nil):
		t.Errorf("a stopped machine: %d agents, OS disk %v", len(agents), diskErr)
	}
	if want.Machines == 1 {
		cfg, err := agent.LoadConfigFile(b.configPath(instance))
		if err != nil || cfg.MachineRequest != want.MadeBy {
			t.Errorf("the machine's config is for request %q (%v), want %q", cfg.MachineRequest, err, want.MadeBy)
		}
		if want.Running && len(agents) == 1 && !cmdline.Matches(agents[0], "--machine-request="+want.MadeBy) {
			t.Errorf("the running agent is not the one of the machine request %s", want.MadeBy)
		}
	}
	exists := func(p string) bool { _, err := os.Stat(p); return err == nil }
	vol := b.volumeDir(instance)
	if got := exists(vol); got != (want.Volumes == 1) {
		t.Errorf("data volume exists: %v, want %d", got, want.Volumes)
	}
	if got := exists(b.previousVolumeDir(instance)); got != (want.Kept == 1) {
		t.Errorf("a kept-aside volume exists: %v, want %d", got, want.Kept)
	}
	for _, p := range []string{b.stagingDir(instance), b.journalPath(instance)} {
		if exists(p) {
			t.Errorf("%s is left behind", filepath.Base(p))
		}
	}
	if left, _ := filepath.Glob(filepath.Join(w.dir, "snapshots", "*"+instance[3:]+"*")); len(left) > 0 {
		t.Errorf("snapshot work folders left behind: %v", left)
	}
	// Nothing of the machine (agent or DSS) stays paused by a snapshot cut
	// short, and no pause marker is left.
	for _, pid := range b.machineProcesses(instance) {
		if cmdline.WaitStopped(pid, 0) && cmdline.Matches(pid) {
			t.Errorf("process %d of the machine is still paused", pid)
		}
	}
	if exists(b.pauseMarker(instance)) {
		t.Error("a pause marker is left behind")
	}
	if want.Kept == 1 {
		// The volume replaced by a restore is the one that was in place,
		// with what was written after the snapshot; the restored one is not.
		if !exists(filepath.Join(b.previousVolumeDir(instance), "after-snapshot.txt")) {
			t.Error("the kept-aside volume is not the one the restore replaced")
		}
		if exists(filepath.Join(vol, "after-snapshot.txt")) {
			t.Error("the restored volume holds what was written after the snapshot")
		}
	}
	if want.VolumeSizeGB != 0 && diskErr == nil {
		if cfg, err := agent.LoadConfigFile(b.configPath(instance)); err != nil || cfg.DataVolumeBytes != uint64(want.VolumeSizeGB)<<30 {
			t.Errorf("the machine's nominal volume size is %d bytes (%v), want %d GB", cfg.DataVolumeBytes, err, want.VolumeSizeGB)
		}
	}
	store, err := archive.NewObjectStore(context.Background(), js)
	if err != nil {
		t.Fatal(err)
	}
	for _, ref := range want.Snapshots {
		rc, err := store.Open(context.Background(), ref.Ref)
		if err != nil {
			t.Errorf("snapshot %s: %v", ref.ID, err)
			continue
		}
		h := sha256.New()
		_, err = io.Copy(h, rc)
		rc.Close()
		if got := hex.EncodeToString(h.Sum(nil)); err != nil || got != ref.SHA256 || ref.SHA256 == "" {
			t.Errorf("snapshot %s: the archive's SHA-256 is %s (%v), %q was recorded", ref.ID, got, err, ref.SHA256)
		}
	}
	for _, ref := range want.Gone {
		if rc, err := store.Open(context.Background(), ref.Ref); !errors.Is(err, archive.ErrNotFound) {
			if rc != nil {
				rc.Close()
			}
			t.Errorf("snapshot %s: its archive is still there (%v)", ref.ID, err)
		}
	}
}
