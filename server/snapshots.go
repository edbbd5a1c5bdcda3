package server

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

// Snapshot operations. They need only the instance's data volume, so they
// do not claim the instance (nor does a volume's growth): DSS keeps serving
// and other actions may run (the provisioner takes one instance's requests
// in order).
const (
	opSnapshot       = "snapshot"
	opDeleteSnapshot = "delete-snapshot"
	kindSnapshot     = "snapshot"

	snapshotDeadline = 3 * time.Hour
)

// recordBesideOp records an operation that runs beside the instance's
// lifecycle and sends req to the provisioner, aimed at targetKind/targetID.
// The caller publishes it (publishOp) once what it refers to is written.
func (s *Server) recordBesideOp(ctx context.Context, kind, instance string, deadline time.Duration, targetKind, targetID string,
	req protocol.ProvisionRequest) (opRecord, error) {
	return s.recordBesideOpAs(ctx, newRunningOp(ctx, kind, instance, deadline), targetKind, targetID, req)
}

// recordBesideOpAs is recordBesideOp for an operation made by the caller
// (one whose id derives from what asked for it); errExists if one of that
// id is on record.
func (s *Server) recordBesideOpAs(ctx context.Context, op opRecord, targetKind, targetID string, req protocol.ProvisionRequest) (opRecord, error) {
	op.TargetKind, op.TargetID = targetKind, targetID
	if err := s.attachRequest(&op, req); err != nil {
		return op, err
	}
	if _, err := s.st.ops.create(ctx, op.JobID, op); errors.Is(err, errExists) {
		return op, err
	} else if err != nil {
		return op, unavailable(err, "the operation could not be recorded")
	}
	return op, nil
}

// lifecycleFree reports whether an operation runs beside the instance's
// lifecycle rather than claiming it.
func (op opRecord) lifecycleFree() bool {
	return op.Kind == opSnapshot || op.Kind == opDeleteSnapshot || op.Kind == opGrowVolume
}

// createSnapshot serves POST …/instances/{id}/snapshots?reasonForSnapshot=:
// it answers the snapshot object (state CREATING, with its futureId), not a
// future, as Dataiku's does.
func (s *Server) createSnapshot(r *http.Request) (any, error) {
	in, ok := s.st.instances.view(r.PathValue("id"))
	if !ok {
		return nil, notFound(kindInstance, r.PathValue("id"))
	}
	return s.startSnapshot(r.Context(), in.ID, newID("snap"), r.URL.Query().Get("reasonForSnapshot"), false)
}

// startSnapshot records a snapshot and asks the provisioner to take it. An
// id already used is refused with errExists (wrapped).
func (s *Server) startSnapshot(ctx context.Context, instance, id, reason string, automated bool) (api.Snapshot, error) {
	m, err := s.machineOf(ctx, instance)
	if err != nil {
		return api.Snapshot{}, unavailable(err, "the instance's machine could not be read")
	}
	if m.VolumeID == "" {
		return api.Snapshot{}, precondition("instance %s has no data volume yet: provision it first", instance)
	}
	lc, _, err := s.lifecycleOf(ctx, instance)
	if err != nil {
		return api.Snapshot{}, unavailable(err, "the instance's state could not be read")
	}
	if lc.State == stateDeleting {
		return api.Snapshot{}, precondition("instance %s is being deleted", instance)
	}
	sn := s.newSnapshot(instance, id, reason, automated, lc, m)
	op, err := s.recordBesideOp(ctx, opSnapshot, instance, snapshotDeadline, kindSnapshot, sn.ID,
		protocol.ProvisionRequest{Action: protocol.ProvisionSnapshot, Snapshot: &protocol.SnapshotRef{ID: sn.ID}})
	if err != nil {
		return api.Snapshot{}, err
	}
	sn.FutureID = op.JobID
	if _, err := s.st.snapshots.create(ctx, sn.ID, sn); err != nil {
		_ = s.st.ops.kv.Purge(ctx, op.JobID)
		if errors.Is(err, errExists) {
			return api.Snapshot{}, fmt.Errorf("snapshot %s: %w", sn.ID, err)
		}
		return api.Snapshot{}, unavailable(err, "the snapshot could not be recorded")
	}
	s.log.Info().Str("instance", instance).Str("snapshot", sn.ID).Str("op", op.JobID).Bool("automated", automated).Msg("snapshot started")
	s.publishOp(ctx, op)
	return sn, nil
}

func (s *Server) newSnapshot(instance, id, reason string, automated bool, lc lifecycle, m protocol.MachineState) api.Snapshot {
	in, _, _ := s.st.instances.get(instance)
	return api.Snapshot{ID: id, InstanceID: instance, Reason: reason, Automated: automated, State: api.SnapshotCreating,
		DSSVersion: lc.DSSVersion, ImageID: lc.ImageID, VolumeSizeGB: m.VolumeSizeGB, VirtualNetworkID: in.VirtualNetworkID,
		CreatedAt: time.Now().UTC()}
}

// listInstanceSnapshots serves GET …/instances/{id}/snapshots, oldest
// first. The snapshots of a deleted instance are kept, and listed.
func (s *Server) listInstanceSnapshots(r *http.Request) (any, error) {
	id := r.PathValue("id")
	list := s.snapshotsOf(id)
	if _, _, ok := s.st.instances.get(id); !ok && len(list) == 0 {
		return nil, notFound(kindInstance, id)
	}
	return list, nil
}

// The groups of the snapshots table (groupsOf): by instance and by state.
const (
	snapshotsOfInstance = "instance:"
	snapshotsInState    = "state:"
)

func (s *Server) snapshotsOf(instance string) []api.Snapshot {
	rows := s.st.snapshots.rowsOf(snapshotsOfInstance + instance)
	list := make([]api.Snapshot, 0, len(rows))
	for _, r := range rows {
		list = append(list, r.val)
	}
	sortedByCreation(list)
	return list
}

// snapshotOf finds a snapshot of an instance.
func (s *Server) snapshotOf(r *http.Request) (api.Snapshot, uint64, error) {
	sn, rev, ok := s.st.snapshots.get(r.PathValue("snapshotId"))
	if !ok || sn.InstanceID != r.PathValue("id") {
		return sn, 0, notFound(kindSnapshot, r.PathValue("snapshotId"))
	}
	return sn, rev, nil
}

func (s *Server) getSnapshot(r *http.Request) (any, error) {
	sn, _, err := s.snapshotOf(r)
	return sn, err
}

// deleteSnapshot serves DELETE …/snapshots/{snapshotId}: a future that ends
// once the provisioner deleted what the snapshot is kept as.
func (s *Server) deleteSnapshot(r *http.Request) (any, error) {
	sn, rev, err := s.snapshotOf(r)
	if err != nil {
		return nil, err
	}
	return s.startSnapshotDelete(r.Context(), sn, rev)
}

func (s *Server) startSnapshotDelete(ctx context.Context, sn api.Snapshot, rev uint64) (api.Future, error) {
	if sn.State == api.SnapshotCreating || sn.State == api.SnapshotDeleting {
		return api.Future{}, precondition("snapshot %s is %s (operation %s); wait for it to end", sn.ID, sn.State, sn.FutureID)
	}
	op, err := s.recordBesideOp(ctx, opDeleteSnapshot, sn.InstanceID, snapshotDeadline, kindSnapshot, sn.ID,
		protocol.ProvisionRequest{Action: protocol.ProvisionDeleteSnapshot, Snapshot: snapshotRef(sn)})
	if err != nil {
		return api.Future{}, err
	}
	next := sn
	next.State, next.FutureID, next.Error = api.SnapshotDeleting, op.JobID, nil
	if _, err := s.st.snapshots.update(ctx, sn.ID, next, rev); err != nil {
		_ = s.st.ops.kv.Purge(ctx, op.JobID)
		if errors.Is(err, errConflict) {
			return api.Future{}, conflict("snapshot %s changed meanwhile; retry", sn.ID)
		}
		return api.Future{}, unavailable(err, "the snapshot could not be written")
	}
	s.publishOp(ctx, op)
	return op.Future, nil
}

func snapshotRef(sn api.Snapshot) *protocol.SnapshotRef {
	return &protocol.SnapshotRef{ID: sn.ID, Store: sn.Store, Ref: sn.StoreRef, SHA256: sn.SHA256, SizeBytes: sn.SizeBytes,
		VolumeSizeGB: sn.VolumeSizeGB, Region: sn.Region}
}

type fromSnapshotKey struct{}

// reprovisionFromSnapshot serves POST …/snapshots/{snapshotId}/reprovision:
// the instance is reprovisioned on a data volume made from the snapshot.
func (s *Server) reprovisionFromSnapshot(r *http.Request) (any, error) {
	allow, err := queryBool(r, "allowDowngrade", false)
	if err != nil {
		return nil, err
	}
	sn, _, err := s.snapshotOf(r)
	if err != nil {
		return nil, err
	}
	in, ok := s.st.instances.view(sn.InstanceID)
	if !ok {
		return nil, precondition("instance %s of snapshot %s no longer exists", sn.InstanceID, sn.ID)
	}
	if sn.State != api.SnapshotAvailable {
		return nil, precondition("snapshot %s is %s, not AVAILABLE: it cannot be restored", sn.ID, sn.State)
	}
	ctx := context.WithValue(context.WithValue(r.Context(), allowDowngradeKey{}, allow), fromSnapshotKey{}, sn)
	return s.act(ctx, in, s.actions()[opReprovision])
}

// foldSnapshotStep adds a provisioner's step (the volume frozen, the
// archive's upload and how far it got) to the snapshot operation it names,
// if it names a running one of its instance, and says whether it did:
// snapshot operations hold no lifecycle, and their outcome is a snapshot
// event (foldSnapshot).
func (s *Server) foldSnapshotStep(ctx context.Context, e protocol.Event) (bool, error) {
	op, _, ok := s.st.ops.get(e.OpID)
	if !ok {
		// The copy may lag behind an operation another replica began.
		var err error
		if op, _, err = s.st.ops.fetch(ctx, e.OpID); errors.Is(err, errNotFound) {
			return false, nil
		} else if err != nil {
			return false, err
		}
	}
	if op.Kind != opSnapshot && op.Kind != opDeleteSnapshot || op.State != api.OpRunning || op.Instance != e.Instance {
		return false, nil
	}
	return true, s.addStep(ctx, op.JobID, "machine: "+e.Step, e)
}

// foldSnapshot folds the provisioner's report on a snapshot into its record
// and, for a snapshot operation, into the operation. Folding it twice
// changes nothing more. An error means it may fold if tried again.
func (s *Server) foldSnapshot(ctx context.Context, e protocol.Event) error {
	ref := e.Snapshot
	if ref == nil || e.OpID == "" {
		return nil
	}
	op, _, found := s.st.ops.get(e.OpID)
	if found && op.Instance != e.Instance {
		s.log.Warn().Str("instance", e.Instance).Str("op", e.OpID).Msg("a snapshot event names another instance's operation; skipped")
		return nil
	}
	if e.Status == protocol.StatusStarted {
		if !found {
			return nil
		}
		return s.addStep(ctx, e.OpID, "machine: "+e.Step, e)
	}
	var failure *api.Error
	if e.Status == protocol.StatusFailed {
		failure = apiErrorOf(e.Error, "The snapshot operation failed")
	}
	deleted := e.Step == string(protocol.ProvisionDeleteSnapshot)
	// Only the snapshot of the event's instance, taken or deleted by the
	// event's operation, is changed: an event cannot repoint or drop any
	// other record.
	owned := false
	sn, err := s.st.snapshots.change(ctx, ref.ID, func(sn *api.Snapshot) bool {
		owned = sn.InstanceID == e.Instance && sn.FutureID == e.OpID
		switch {
		case !owned:
			return false
		case deleted && failure == nil:
			return false // purged below
		case deleted:
			sn.State, sn.Error = stateBeforeDelete(*sn), failure
		case sn.State != api.SnapshotCreating:
			return false // deleted meanwhile, or folded already
		case failure != nil:
			sn.State, sn.Error = api.SnapshotFailed, failure
		default:
			sn.State, sn.Error = api.SnapshotAvailable, nil
			sn.Store, sn.StoreRef, sn.SHA256, sn.SizeBytes, sn.Region = ref.Store, ref.Ref, ref.SHA256, ref.SizeBytes, ref.Region
			if ref.VolumeSizeGB != 0 {
				sn.VolumeSizeGB = ref.VolumeSizeGB
			}
		}
		return true
	})
	if err != nil && !errors.Is(err, errNotFound) {
		return fmt.Errorf("snapshot record %s: %w", ref.ID, err)
	}
	if err == nil && !owned {
		s.log.Warn().Str("instance", e.Instance).Str("snapshot", ref.ID).Str("op", e.OpID).
			Msg("a snapshot event names a snapshot of another instance or operation; skipped")
		return nil
	}
	if deleted && failure == nil && err == nil {
		if err := s.st.snapshots.kv.Purge(ctx, ref.ID); err != nil {
			return fmt.Errorf("purge the record of deleted snapshot %s: %w", ref.ID, err)
		}
	}
	if !op.lifecycleFree() || op.State != api.OpRunning {
		return nil
	}
	var result any = sn
	if deleted {
		result = map[string]string{"id": ref.ID, "instanceId": e.Instance}
	}
	if _, err := s.endOp(ctx, op.JobID, result, failure); err != nil {
		return fmt.Errorf("end operation %s: %w", op.JobID, err)
	}
	return nil
}

// settleSnapshots ends what an operation left behind when it ended without
// a report (it timed out, was aborted, or expired from fm_ops): a snapshot
// being taken is failed, one being deleted goes back to its state.
func (s *Server) settleSnapshots(ctx context.Context) {
	busy := append(s.st.snapshots.rowsOf(snapshotsInState+api.SnapshotCreating), s.st.snapshots.rowsOf(snapshotsInState+api.SnapshotDeleting)...)
	for _, row := range busy {
		sn := row.val
		// From the bucket: the copy may not have the operation yet.
		op, _, err := s.st.ops.fetch(ctx, sn.FutureID)
		found := err == nil
		if found && op.State == api.OpRunning || err != nil && !errors.Is(err, errNotFound) {
			continue
		}
		failure := &api.Error{ErrorType: string(protocol.CodeAborted), Message: "Operation lost",
			DetailedMessage: "the operation " + sn.FutureID + " ended without a report from the provisioner"}
		if found && op.Error != nil {
			failure = op.Error
		}
		_, _ = s.st.snapshots.change(ctx, sn.ID, func(cur *api.Snapshot) bool {
			if cur.FutureID != sn.FutureID || cur.State != sn.State {
				return false
			}
			cur.Error = failure
			cur.State = api.SnapshotFailed
			if sn.State == api.SnapshotDeleting {
				cur.State = stateBeforeDelete(*cur)
			}
			return true
		})
	}
}

// stateBeforeDelete is the state a snapshot goes back to when its deletion
// fails: available if it was taken (it has a place in a store), failed if
// it never was.
func stateBeforeDelete(sn api.Snapshot) string {
	if sn.StoreRef == "" {
		return api.SnapshotFailed
	}
	return api.SnapshotAvailable
}
