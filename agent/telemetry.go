package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/fleetmanager/fm/protocol"
)

// refreshDSSState measures DSS and puts it in the status. Callers hold the
// machine (or accept a racy view, as the agent does at start). DSS is
// installing while an installer holds the install lock: one left running by
// an agent that stopped or died, or the agent's own.
func (a *Agent) refreshDSSState(ctx context.Context) protocol.DSSState {
	st := protocol.DSSStatus{State: protocol.DSSAbsent}
	if v, err := a.m.installedVersion(); err == nil && v != "" {
		st.Version = v
		st.Port, _ = a.m.port()
		if ini, err := a.m.readINI(); err == nil {
			st.NodeType = ini["general.nodetype"]
		}
		switch {
		case a.m.answers(ctx):
			st.State = protocol.DSSRunning
		case len(a.m.installerProcesses()) > 0:
			st.State = protocol.DSSInstalling
		case len(a.m.dssProcesses()) > 0:
			st.State = protocol.DSSUnresponsive
		default:
			st.State = protocol.DSSStopped
		}
	} else if len(a.m.installerProcesses()) > 0 {
		st.State = protocol.DSSInstalling
	}
	st.HTTPS = a.front.status()
	a.rep.updateStatus(func(s *protocol.AgentStatus) { s.DSS = st })
	return st.State
}

func (a *Agent) setDSSStopped(stopped bool) {
	mk := a.m.loadMarker()
	if mk.Generation == 0 || mk.DSSStopped == stopped {
		return
	}
	mk.DSSStopped = stopped
	if err := a.m.saveMarker(mk); err != nil {
		a.log.Error().Err(err).Msg("progress marker not saved")
	}
}

// Watchdog bounds: after this many failed checks in a row DSS is restarted,
// at most this many times per window; then the agent gives up and says so.
const (
	unansweredChecks = 3
	maxRestarts      = 3
	restartWindow    = 15 * time.Minute
)

// watchState is what the watchdog keeps from one check to the next.
type watchState struct {
	misses   int
	restarts []time.Time
	gaveUp   bool
	// pids are DSS's processes, looked up once when it answers: while one
	// of them lives, DSS has not died (dssExited).
	pids []int
}

// watchdog checks DSS every HealthInterval, and at once when the processes
// it had when it last answered are all gone (every ExitInterval), and
// restarts it when it stops answering, unless it was stopped on purpose or
// the machine is busy.
func (a *Agent) watchdog(ctx context.Context) {
	tick := time.NewTicker(a.cfg.HealthInterval)
	defer tick.Stop()
	exits := time.NewTicker(a.cfg.ExitInterval)
	defer exits.Stop()
	var w watchState
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-exits.C:
			if !dssExited(w.pids, a.m.dssDir) {
				continue
			}
			// Said at once, not counted as a check: the watchdog's pace
			// of restarts stays its checks'.
			w.pids = nil
			if a.machineMu.TryLock() {
				a.refreshDSSState(ctx)
				a.machineMu.Unlock()
			}
			continue
		}
		if !a.machineMu.TryLock() {
			continue // converging or running a command
		}
		a.checkDSS(ctx, &w)
		a.machineMu.Unlock()
	}
}

// dssExited says whether every one of pids (some) is gone: no longer a
// process of DSS's data directory dir (a zombie, or a pid used again by
// another program, is gone too).
func dssExited(pids []int, dir string) bool {
	if len(pids) == 0 {
		return false
	}
	for _, pid := range pids {
		if cmdline.Matches(pid, dir) {
			return false
		}
	}
	return true
}

// checkDSS is one check of the watchdog, with the machine held.
func (a *Agent) checkDSS(ctx context.Context, w *watchState) {
	// An installer at work (one an agent that stopped or died mid-upgrade
	// left running, holding the install lock) has DSS stopped, and names
	// the data directory on its command line: "restarting DSS" would kill
	// it and start DSS on a half-upgraded data directory. The watchdog
	// keeps away until it has ended, and holds the lock while it acts, so
	// that no installer starts meanwhile.
	lock, err := a.m.tryLockInstall()
	if err != nil {
		if errors.Is(err, errInstallerRuns) {
			a.refreshDSSState(ctx)
		} else {
			a.log.Debug().Err(err).Msg("the watchdog could not check the install lock")
		}
		w.misses = 0
		return
	}
	a.installLock.Store(lock)
	defer func() { a.installLock.Store(nil); lock.Close() }()
	mk := a.m.loadMarker()
	state := a.refreshDSSState(ctx)
	switch {
	case state != protocol.DSSRunning:
		w.pids = nil
	case len(w.pids) == 0:
		w.pids = a.m.dssProcesses()
	}
	if mk.Generation == 0 || mk.DSSStopped || state == protocol.DSSAbsent || state == protocol.DSSRunning {
		if state == protocol.DSSRunning && (w.misses > 0 || w.gaveUp) {
			a.log.Info().Msg("DSS answers again")
		}
		w.misses, w.gaveUp = 0, false
		return
	}
	w.misses++
	if w.misses < unansweredChecks || w.gaveUp {
		return
	}
	now := time.Now()
	for len(w.restarts) > 0 && now.Sub(w.restarts[0]) > restartWindow {
		w.restarts = w.restarts[1:]
	}
	if len(w.restarts) >= maxRestarts {
		w.gaveUp = true
		a.alert("dss-restart-gave-up", protocol.CodeUnavailable,
			fmt.Sprintf("DSS still does not answer after %d restarts in %s; the agent stops restarting it until it answers again or is restarted by a command", maxRestarts, restartWindow))
		return
	}
	w.restarts = append(w.restarts, now)
	a.alert("dss-unresponsive", protocol.CodeUnavailable,
		fmt.Sprintf("DSS is %s: it did not answer %d checks in a row; restarting it (%d of %d in %s)", state, w.misses, len(w.restarts), maxRestarts, restartWindow))
	out, err := a.m.restartDSS(ctx)
	if err != nil {
		a.rep.event(protocol.Event{Kind: protocol.EventAlert, Step: "dss-restarted", Status: protocol.StatusFailed,
			Message: err.Error(), Output: lastBytes(out, 8<<10), Error: protocol.Errorf(protocol.CodeUnavailable, "restart failed: %v", err)})
	} else {
		w.misses = 0
		a.rep.event(protocol.Event{Kind: protocol.EventAlert, Step: "dss-restarted", Status: protocol.StatusOK, Message: "DSS answers again after a restart"})
	}
	a.refreshDSSState(ctx)
}

func (a *Agent) alert(step string, code protocol.Code, msg string) {
	a.log.Warn().Str("alert", step).Msg(msg)
	a.rep.event(protocol.Event{Kind: protocol.EventAlert, Step: step, Status: protocol.StatusFailed, Message: msg,
		Error: &protocol.Error{Code: code, Message: msg}})
}

// Data volume thresholds: above high the agent asks for growth; it asks again
// only after use fell below rearm.
const (
	volumeHigh  = 0.80
	volumeRearm = 0.75
)

// measure refreshes the machine facts every FactsInterval and asks for a
// bigger data volume when it passes 80%.
func (a *Agent) measure(ctx context.Context) {
	started := time.Now()
	armed := true
	for {
		f := a.machineFacts(started)
		a.rep.setFacts(f)
		if f.DataVolumeBytes > 0 {
			used := float64(f.DataVolumeUsedBytes) / float64(f.DataVolumeBytes)
			switch {
			case armed && used >= volumeHigh:
				armed = false
				a.alert("data-volume-high", protocol.CodeResourceExhausted, fmt.Sprintf(
					"the data volume is %.0f%% full (%d of %d bytes); it should grow", used*100, f.DataVolumeUsedBytes, f.DataVolumeBytes))
			case !armed && used < volumeRearm:
				armed = true
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(a.cfg.FactsInterval):
		}
	}
}

func (a *Agent) machineFacts(started time.Time) protocol.MachineFacts {
	var f protocol.MachineFacts
	if nominal := a.nominalVolume.Load(); nominal > 0 {
		f.DataVolumeBytes, f.DataVolumeUsedBytes = nominal, diskUsage(a.cfg.DataDir)
	} else {
		var st syscall.Statfs_t
		if syscall.Statfs(a.cfg.DataDir, &st) == nil {
			f.DataVolumeBytes = st.Blocks * uint64(st.Bsize)
			f.DataVolumeUsedBytes = (st.Blocks - st.Bfree) * uint64(st.Bsize)
		}
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		if fields := strings.Fields(string(b)); len(fields) > 0 {
			f.Load1, _ = strconv.ParseFloat(fields[0], 64)
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			fields := strings.Fields(line)
			if len(fields) < 2 {
				continue
			}
			kb, _ := strconv.ParseUint(fields[1], 10, 64)
			switch fields[0] {
			case "MemTotal:":
				f.MemTotalBytes = kb << 10
			case "MemAvailable:":
				f.MemAvailableBytes = kb << 10
			}
		}
	}
	if a.m.isRealRoot() {
		if b, err := os.ReadFile("/proc/uptime"); err == nil {
			if fields := strings.Fields(string(b)); len(fields) > 0 {
				up, _ := strconv.ParseFloat(fields[0], 64)
				f.UptimeSeconds = int64(up)
			}
		}
	} else {
		// A folder standing for a machine is up as long as its agent.
		f.UptimeSeconds = int64(time.Since(started).Seconds())
	}
	return f
}

// diskUsage is the space the files under dir take.
func diskUsage(dir string) uint64 {
	var total uint64
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return nil
		}
		if st, ok := info.Sys().(*syscall.Stat_t); ok {
			total += uint64(st.Blocks) * 512
		} else {
			total += uint64(info.Size())
		}
		return nil
	})
	return total
}
