package server

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/protocol"
)

// schedulerLease is the fm_leases key the snapshot scheduler holds: one
// server of the fleet schedules at a time.
const schedulerLease = "snapshot-scheduler"

// runSnapshotScheduler takes automated snapshots and applies their
// retention while this server holds the scheduler's lease, until ctx ends.
// It keeps no state of its own: what is due is read from the snapshot
// records, so that a restart, or another server taking over, neither skips
// a snapshot nor takes one twice (a due snapshot's id derives from its due
// time, and a record is created only once).
func (s *Server) runSnapshotScheduler(ctx context.Context) {
	s.runLeased(ctx, schedulerLease, "snapshot scheduler", s.cfg.SchedulerInterval, func() tickFunc { return s.scheduleSnapshots })
}

// tickFunc is the work done at each tick while a lease is held, given
// held (bus.Lease.Held) to ask before each thing it does; its context ends
// at once when the lease is lost.
type tickFunc func(ctx context.Context, now time.Time, held func() bool)

// runLeased does the work newTick makes, once at each taking of the lease
// key of fm_leases (one server of the fleet at a time), every period while
// the lease is held, until ctx ends.
func (s *Server) runLeased(ctx context.Context, key, what string, every time.Duration, newTick func() tickFunc) {
	host, _ := os.Hostname()
	holder := fmt.Sprintf("%s-%d-%s", host, os.Getpid(), newID("srv"))
	for ctx.Err() == nil {
		if err := s.whileLeased(ctx, key, what, holder, every, newTick); err != nil && ctx.Err() == nil {
			s.log.Warn().Err(err).Msgf("%s paused; retrying", what)
			select {
			case <-ctx.Done():
			case <-time.After(2 * time.Second):
			}
		}
	}
}

func (s *Server) whileLeased(ctx context.Context, key, what, holder string, every time.Duration, newTick func() tickFunc) error {
	kv, err := s.js.KeyValue(ctx, protocol.BucketLeases)
	if err != nil {
		return fmt.Errorf("lease bucket: %w", err)
	}
	l := &bus.Lease{KV: kv, Key: key, Holder: holder, TTL: s.cfg.Topology.LeaseTTL}
	return l.Run(ctx, func(held context.Context) error {
		s.log.Info().Str("holder", holder).Msgf("holding the %s lease", what)
		// The work stops with ctx, or at once when the lease is lost.
		work, stop := context.WithCancel(held)
		defer stop()
		go func() {
			select {
			case <-ctx.Done():
				stop()
			case <-work.Done():
			}
		}()
		tick := newTick()
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			tick(work, time.Now(), l.Held)
			select {
			case <-work.Done():
				return nil
			case <-t.C:
			}
		}
	})
}

// scheduleSnapshots does, for every instance with automated snapshots, the
// one thing due first: wait for a snapshot under way, delete an expired
// automated one (see expiring), or take one when the period has passed since
// the last.
//
// held says whether the scheduler's lease can still be proven (bus.Lease.Held):
// asked before each snapshot is taken or deleted, so that a scheduler frozen
// and resumed, before its lease keeper stops it, does neither beside its
// successor (the first snapshot's id comes from its own clock, not from a
// record).
func (s *Server) scheduleSnapshots(ctx context.Context, now time.Time, held func() bool) {
	for _, in := range s.st.instances.list() {
		if !held() {
			return
		}
		if !in.EnableAutomatedSnapshot || in.AutomatedSnapshotPeriod == nil {
			continue
		}
		if lc, _, _ := s.st.lifecycle.get(in.ID); lc.State != stateRunning {
			continue // a volume that does not change needs no new snapshot
		}
		auto := s.automatedSnapshotsOf(in.ID)
		if slices.ContainsFunc(auto, func(sn api.Snapshot) bool {
			return sn.State == api.SnapshotCreating || sn.State == api.SnapshotDeleting
		}) {
			continue
		}
		period := time.Duration(*in.AutomatedSnapshotPeriod) * s.cfg.SnapshotHour
		if old, ok := expiring(auto, derefInt(in.AutomatedSnapshotRetention)); ok && !s.deleteFailedWithin(old, now, period) {
			s.expireSnapshot(ctx, old)
			continue
		}
		due := now
		if len(auto) > 0 {
			due = auto[len(auto)-1].CreatedAt.Add(period)
		}
		if now.Before(due) {
			continue
		}
		id := "snap-" + in.ID + "-" + strconv.FormatInt(due.UnixMilli(), 36)
		_, err := s.startSnapshot(ctx, in.ID, id, "automated", true)
		if errors.Is(err, errExists) {
			continue // taken already, by this scheduler before a restart or another
		}
		if err != nil {
			s.log.Warn().Err(err).Str("instance", in.ID).Msg("automated snapshot not started")
		}
		s.recordByFM(ctx, "snapshot.scheduled", auditSnapshots, id, err)
	}
}

// automatedSnapshotsOf lists an instance's automated snapshots, oldest
// first.
func (s *Server) automatedSnapshotsOf(instance string) []api.Snapshot {
	return slices.DeleteFunc(s.snapshotsOf(instance), func(sn api.Snapshot) bool { return !sn.Automated })
}

// expiring picks the automated snapshot (of auto, oldest first) to delete:
// the oldest available one past the retention (keep; 0 keeps all), else the
// oldest failed one taken before one that succeeded. Only snapshots that can
// be restored count toward the retention, so that failing ones never push a
// good one out.
func expiring(auto []api.Snapshot, keep int) (api.Snapshot, bool) {
	var available []api.Snapshot
	for _, sn := range auto {
		if sn.State == api.SnapshotAvailable {
			available = append(available, sn)
		}
	}
	if keep > 0 && len(available) > keep {
		return available[0], true
	}
	if len(available) == 0 {
		return api.Snapshot{}, false
	}
	latest := available[len(available)-1].CreatedAt
	for _, sn := range auto {
		if sn.State == api.SnapshotFailed && sn.CreatedAt.Before(latest) {
			return sn, true
		}
	}
	return api.Snapshot{}, false
}

// deleteFailedWithin says whether the last operation on sn is a deletion
// that failed less than d before now: it is tried again a period later, not
// at every tick.
func (s *Server) deleteFailedWithin(sn api.Snapshot, now time.Time, d time.Duration) bool {
	op, _, ok := s.st.ops.get(sn.FutureID)
	return ok && op.Kind == opDeleteSnapshot && op.State == api.OpFailed && op.EndedAt != nil && now.Sub(*op.EndedAt) < d
}

// expireSnapshot deletes an automated snapshot past the retention, or a
// failed one superseded by a later success.
func (s *Server) expireSnapshot(ctx context.Context, sn api.Snapshot) {
	cur, rev, ok := s.st.snapshots.get(sn.ID)
	if !ok {
		return
	}
	_, err := s.startSnapshotDelete(ctx, cur, rev)
	s.recordByFM(ctx, "snapshot.expired", auditSnapshots, sn.ID, err)
	if err != nil {
		s.log.Warn().Err(err).Str("snapshot", sn.ID).Msg("expired automated snapshot not deleted")
		return
	}
	s.log.Info().Str("instance", sn.InstanceID).Str("snapshot", sn.ID).Str("state", sn.State).Msg("automated snapshot expired")
}

func derefInt(p *int) int {
	if p == nil {
		return 0
	}
	return *p
}

// sortedByCreation sorts snapshots oldest first (by id when taken at the
// same instant, so that the order does not depend on the table's).
func sortedByCreation(list []api.Snapshot) {
	slices.SortFunc(list, func(a, b api.Snapshot) int {
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
}
