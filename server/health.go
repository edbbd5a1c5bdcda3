package server

import (
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

// health is what FM knows of one instance's health at one moment, read
// from the server's copies: what the metrics show, GET /fleet sums up and
// the alerts FM sends decide on, so that the three never disagree. A
// nil flag is a question that does not apply (no agent is expected to
// answer while an operation is under way; an instance without a volume
// limit has no "at its maximum").
type health struct {
	failed    bool  // in state failed: its last operation failed, or its machine was lost
	machineUp *bool // settled running instances
	agentUp   *bool // settled running instances whose machine runs
	dssUp     *bool // settled running instances whose agent reported DSS
	// volume is the data volume's file system as the agent last measured
	// it (nil: not measured); volumeMaxBytes is dataVolumeSizeMaxGB, and
	// volumeAtMax whether the volume has reached it.
	volume         *volumeStatus
	volumeMaxBytes uint64
	volumeAtMax    *bool
	// snapshotPeriod is the period of automated snapshots, for running
	// instances that have them (the scheduler snapshots those only).
	snapshotPeriod time.Duration
	snapshots      lastSnapshots
}

// lastSnapshots is what health keeps of an instance's snapshots.
type lastSnapshots struct {
	success  time.Time // the last one that succeeded
	finished time.Time // the last one that ended
	failed   bool      // whether that one failed
}

// lastSnapshotsByInstance reads every snapshot once, not once per
// instance.
func (s *Server) lastSnapshotsByInstance() map[string]lastSnapshots {
	snaps := map[string]lastSnapshots{}
	for _, sn := range s.st.snapshots.list() {
		l := snaps[sn.InstanceID]
		switch sn.State {
		case api.SnapshotAvailable:
			l.success = later(l.success, sn.CreatedAt)
			if !sn.CreatedAt.Before(l.finished) {
				l.finished, l.failed = sn.CreatedAt, false
			}
		case api.SnapshotFailed:
			if !sn.CreatedAt.Before(l.finished) {
				l.finished, l.failed = sn.CreatedAt, true
			}
		}
		snaps[sn.InstanceID] = l
	}
	return snaps
}

// healthOf reads an instance's health from its status (statusOf) and its
// snapshots (lastSnapshotsByInstance).
func (s *Server) healthOf(in *api.Instance, st instanceStatus, snaps lastSnapshots) health {
	h := health{failed: st.State == stateFailed, volume: st.DataVolume, snapshots: snaps}
	if settledRunning(st) {
		h.machineUp = ptr(st.CloudMachineIsUp)
		if st.DSS != nil {
			h.dssUp = ptr(st.DSS.State == protocol.DSSRunning)
		}
	}
	if agentExpected(st) {
		h.agentUp = ptr(st.AgentResponding)
	}
	if h.volume != nil && h.volume.SizeBytes == 0 {
		h.volume = nil
	}
	if maxGB := in.DataVolumeSizeMaxGB; maxGB != nil && *maxGB > 0 {
		h.volumeMaxBytes = uint64(*maxGB) << 30
		// As the volume's growth decides (growVolume): by the volume's
		// size, not its file system's.
		if m, _, ok := s.st.machines.get(in.ID); ok && m.VolumeID != "" {
			h.volumeAtMax = ptr(m.VolumeSizeGB >= *maxGB)
		}
	}
	if in.EnableAutomatedSnapshot && in.AutomatedSnapshotPeriod != nil && *in.AutomatedSnapshotPeriod > 0 && st.State == stateRunning {
		h.snapshotPeriod = time.Duration(*in.AutomatedSnapshotPeriod) * s.cfg.SnapshotHour
	}
	return h
}

func ptr[T any](v T) *T { return &v }

// isFalse says whether a flag that applies is down.
func isFalse(b *bool) bool { return b != nil && !*b }

// isTrue says whether a flag that applies is up.
func isTrue(b *bool) bool { return b != nil && *b }

// volumeUsed is the used fraction of the data volume, and whether it was
// measured.
func (h health) volumeUsed() (float64, bool) {
	if h.volume == nil {
		return 0, false
	}
	return float64(h.volume.UsedBytes) / float64(h.volume.SizeBytes), true
}

// The conditions of the alerts, as deploy/prometheus/rules/fm.rules.yml
// writes them on the metrics.

// agentNotResponding: the machine runs and its agent missed three
// heartbeats.
func (h health) agentNotResponding() bool { return isFalse(h.agentUp) }

// dssDown: the agent answers and DSS does not.
func (h health) dssDown() bool { return isFalse(h.dssUp) && isTrue(h.agentUp) }

// volumeAbove80: the data volume is more than 80% full.
func (h health) volumeAbove80() bool {
	used, ok := h.volumeUsed()
	return ok && used > volumeAlertRatio
}

// volumeFullAtMax: above 80% and at the size it may grow to.
func (h health) volumeFullAtMax() bool { return h.volumeAbove80() && isTrue(h.volumeAtMax) }

// snapshotOverdue: automated snapshots are on, one succeeded, and the last
// success is older than 1.5 periods.
func (h health) snapshotOverdue(now time.Time) bool {
	return h.snapshotPeriod > 0 && !h.snapshots.success.IsZero() &&
		now.Sub(h.snapshots.success) > h.snapshotPeriod*3/2
}

// snapshotNeverTaken: automated snapshots are on and none ever succeeded.
func (h health) snapshotNeverTaken() bool {
	return h.snapshotPeriod > 0 && h.snapshots.success.IsZero()
}

// volumeAlertRatio is the used fraction above which a data volume is
// reported (and grown, up to its maximum).
const volumeAlertRatio = 0.8
