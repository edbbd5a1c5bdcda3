package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fleetmanager/fm/internal/atomicfile"
)

// dssUnitName is the systemd unit DSS runs in on a machine with systemd,
// as Dataiku's own boot service does: out of fm-agent.service, so that a
// restart or a crash of the agent (whose unit kills what is left in its
// cgroup) leaves DSS serving, and the next agent adopts it.
const dssUnitName = "dataiku-dss.service"

// useSystemd reports whether DSS is started and stopped through its unit.
func (m *machine) useSystemd() bool {
	switch m.cfg.ServiceManager {
	case "systemd":
		return true
	case "none":
		return false
	}
	if !m.isRealRoot() || os.Geteuid() != 0 {
		return false
	}
	_, err := os.Stat("/run/systemd/system")
	return err == nil
}

func (m *machine) unitPath() string { return m.rooted("etc", "systemd", "system", dssUnitName) }

// dssUnit is the unit's text: bin/dss start and stop, as the DSS account.
func (m *machine) dssUnit(acc *account) string {
	var b strings.Builder
	fmt.Fprintf(&b, `# Dataiku DSS of instance %s, started and stopped by the Fleet Manager agent
# (fm-agent.service), which writes this file. DSS runs here rather than in
# the agent's unit, so that it outlives a restart or a crash of the agent.
[Unit]
Description=Dataiku DSS (run by the Fleet Manager agent)
Documentation=https://github.com/fleetmanager/fm/blob/main/docs/agent.md
Wants=network-online.target
After=network-online.target
RequiresMountsFor=%s

[Service]
Type=forking
`, m.cfg.Instance, m.cfg.DataDir)
	if acc != nil {
		fmt.Fprintf(&b, "User=%s\nGroup=%d\nEnvironment=HOME=%s\n", acc.name, acc.gid, acc.home)
	}
	fmt.Fprintf(&b, `ExecStart=%s start
ExecStop=%s stop
TimeoutStartSec=%d
TimeoutStopSec=%d
# The agent's watchdog restarts DSS when it stops answering, and the agent
# starts it at boot unless it was stopped on purpose.
Restart=no
LimitNOFILE=65536
`, filepath.Join(m.dssDir, "bin", "dss"), filepath.Join(m.dssDir, "bin", "dss"),
		int(m.cfg.DSSStartTimeout/time.Second), int(m.cfg.DSSStopTimeout/time.Second))
	return b.String()
}

// ensureUnit writes DSS's unit if it is not as it should be, and has systemd
// read it: when it was written, and once per agent start, since an agent
// killed between writing the unit and daemon-reload leaves the file as
// wanted but systemd unaware of it.
func (m *machine) ensureUnit(ctx context.Context) (string, error) {
	acc, err := m.dssAccount(ctx)
	if err != nil {
		return "", err
	}
	want := m.dssUnit(acc)
	if have, err := os.ReadFile(m.unitPath()); err != nil || string(have) != want {
		if err := os.MkdirAll(filepath.Dir(m.unitPath()), 0o755); err != nil {
			return "", err
		}
		if err := atomicfile.WriteFile(m.unitPath(), []byte(want), 0o644); err != nil {
			return "", fmt.Errorf("write %s: %w", dssUnitName, err)
		}
		m.unitLoaded.Store(false)
	}
	if m.unitLoaded.Load() {
		return "", nil
	}
	out, err := m.systemctl(ctx, "daemon-reload")
	if err == nil {
		m.unitLoaded.Store(true)
	}
	return out, err
}

// systemctl runs systemctl (as the agent).
func (m *machine) systemctl(ctx context.Context, args ...string) (string, error) {
	return m.run(ctx, "systemctl", args...)
}

// dssByUnit is dss for a machine with systemd: start and stop go through the
// unit; status asks bin/dss.
func (m *machine) dssByUnit(ctx context.Context, action string) (string, error) {
	switch action {
	case "start":
		out, err := m.ensureUnit(ctx)
		if err != nil {
			return out, err
		}
		more, err := m.systemctl(ctx, "start", dssUnitName)
		return out + more, err
	case "stop":
		return m.systemctl(ctx, "stop", dssUnitName)
	case "restart":
		out, err := m.ensureUnit(ctx)
		if err != nil {
			return out, err
		}
		more, err := m.systemctl(ctx, "restart", dssUnitName)
		return out + more, err
	}
	return m.run(ctx, filepath.Join(m.dssDir, "bin", "dss"), action)
}
