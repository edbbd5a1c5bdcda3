package local

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fleetmanager/fm/agent"
	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/e2e"
	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
	"github.com/rs/zerolog"
)

var (
	buildOnce sync.Once
	fmBin     string
	buildErr  error
)

func binary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "local-backend-fm-")
		if err != nil {
			buildErr = err
			return
		}
		fmBin, buildErr = e2e.Build(dir, false)
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return fmBin
}

func request(id string, action protocol.ProvisionAction, steps *[]string) provisioner.Request {
	return provisioner.Request{
		ProvisionRequest: protocol.ProvisionRequest{ID: id, Instance: "in-local1", Action: action, Generation: 1,
			Spec: &protocol.MachineSpec{Label: "l", DataVolume: protocol.VolumeSpec{SizeGB: 3}}},
		Progress: func(step, msg string) { *steps = append(*steps, step+": "+msg) },
	}
}

func TestLocalMachines(t *testing.T) {
	srv := bustest.Run(t)
	dir := t.TempDir()
	b, err := New(Config{Dir: dir, AgentBinary: binary(t), NATSURL: srv.URL(), Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	t.Cleanup(func() { b.stopMachine(ctx, "in-local1") })
	agents := func() []int { return cmdline.Find(b.configPath("in-local1"), "agent") }
	var steps []string

	st, err := b.Reprovision(ctx, request("op-1-reprovision", protocol.ProvisionReprovision, &steps), protocol.MachineState{})
	if err != nil {
		t.Fatal(err)
	}
	if st.Status != protocol.MachineRunning || st.PublicIP != "127.0.0.1" || st.VolumeSizeGB != 3 || len(agents()) != 1 {
		t.Fatalf("%+v, agents %v", st, agents())
	}
	cfg, err := agent.LoadConfigFile(b.configPath("in-local1"))
	if err != nil || cfg.Instance != "in-local1" || cfg.NATSURL != srv.URL() || cfg.DataVolumeBytes != 3<<30 || cfg.PackageManager != "none" {
		t.Fatalf("agent config %+v %v", cfg, err)
	}
	if !strings.Contains(strings.Join(steps, "|"), "data volume created") {
		t.Fatalf("steps %v", steps)
	}
	// The machine runs its own copy of the agent (upgrade-agent replaces
	// it), not FM's binary.
	mine, fms := b.machineBinary("in-local1"), binary(t)
	if exe, err := os.Readlink(filepath.Join("/proc", strconv.Itoa(agents()[0]), "exe")); err != nil || exe != mine {
		t.Fatalf("the agent runs %q (%v), not its machine's %s", exe, err, mine)
	}
	if a, b := e2e.FileSHA256(t, mine), e2e.FileSHA256(t, fms); a != b {
		t.Fatalf("the machine's agent binary differs from FM's")
	}
	st.RequestID = "op-1-reprovision"
	vol := filepath.Join(dir, "volumes", "in-local1")
	os.WriteFile(filepath.Join(vol, "kept.txt"), []byte("data"), 0o644)
	os.WriteFile(filepath.Join(b.rootDir("in-local1"), "scratch.txt"), []byte("os disk"), 0o644)

	// The same request again (a redelivery) adopts the machine.
	again, err := b.Reprovision(ctx, request("op-1-reprovision", protocol.ProvisionReprovision, &steps), st)
	if err != nil || again.MachineID != st.MachineID || len(agents()) != 1 {
		t.Fatalf("redelivery: %+v %v, agents %v", again, err, agents())
	}

	// Stop and start act on the processes.
	if st, err = b.Stop(ctx, request("op-2-stop", protocol.ProvisionStop, &steps), st); err != nil || st.Status != protocol.MachineStopped || len(agents()) != 0 {
		t.Fatalf("stop: %+v %v %v", st, err, agents())
	}
	alive := func(st protocol.MachineState) bool {
		m, err := b.Alive(ctx, []protocol.MachineState{st})
		if err != nil {
			t.Fatal(err)
		}
		return m["in-local1"]
	}
	if alive(st) {
		t.Fatal("a stopped machine is alive")
	}
	if st, err = b.Start(ctx, request("op-3-start", protocol.ProvisionStart, &steps), st); err != nil || len(agents()) != 1 {
		t.Fatalf("start: %+v %v", st, err)
	}
	// A machine whose agent dies is seen.
	syscall.Kill(agents()[0], syscall.SIGKILL)
	deadline := time.Now().Add(5 * time.Second)
	for alive(st) {
		if time.Now().After(deadline) {
			t.Fatal("a dead agent still counts as alive")
		}
		time.Sleep(20 * time.Millisecond)
	}

	// Reprovision: a new OS disk, the same volume, one machine.
	if st, err = b.Reprovision(ctx, request("op-4-reprovision", protocol.ProvisionReprovision, &steps), st); err != nil || len(agents()) != 1 {
		t.Fatalf("reprovision: %v %v", err, agents())
	}
	if _, err := os.Stat(filepath.Join(b.rootDir("in-local1"), "scratch.txt")); !os.IsNotExist(err) {
		t.Fatal("the OS disk survived a reprovision")
	}
	if b, _ := os.ReadFile(filepath.Join(vol, "kept.txt")); string(b) != "data" {
		t.Fatal("the data volume was not kept")
	}

	// Deprovision keeps the volume; delete with keepVolume too; delete
	// removes it.
	if st, err = b.Deprovision(ctx, request("op-5-deprovision", protocol.ProvisionDeprovision, &steps), st); err != nil ||
		st.Status != protocol.MachineDeprovisioned || len(agents()) != 0 {
		t.Fatalf("deprovision: %+v %v", st, err)
	}
	if _, err := os.Stat(b.machineDir("in-local1")); !os.IsNotExist(err) {
		t.Fatal("the machine is still there")
	}
	keep := request("op-6-delete", protocol.ProvisionDelete, &steps)
	keep.KeepVolume = true
	if st, err = b.Delete(ctx, keep, st); err != nil || st.Status != protocol.MachineDeleted {
		t.Fatalf("delete: %+v %v", st, err)
	}
	if _, err := os.Stat(filepath.Join(vol, "kept.txt")); err != nil {
		t.Fatal("keepVolume did not keep the volume")
	}
	if _, err := b.Delete(ctx, request("op-7-delete", protocol.ProvisionDelete, &steps), st); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(vol); !os.IsNotExist(err) {
		t.Fatal("delete left the volume")
	}
	// Start without an OS disk is refused clearly.
	if _, err := b.Start(ctx, request("op-8-start", protocol.ProvisionStart, &steps), st); protocol.CodeOf(err) != protocol.CodeFailedPrecondition {
		t.Fatalf("start of a deleted machine: %v", err)
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	if _, err := New(Config{Dir: "relative", AgentBinary: "fm", NATSURL: "nats://x"}); err == nil {
		t.Error("relative dir accepted")
	}
	if _, err := New(Config{Dir: t.TempDir()}); err == nil {
		t.Error("missing binary and URL accepted")
	}
}
