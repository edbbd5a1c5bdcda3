package ec2

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
)

// TagSnapshot carries FM's snapshot id on an EBS snapshot, which is how a
// retry after a crash finds the one it made.
const TagSnapshot = "fm:snapshot"

// rolePreviousData marks a data volume a restore replaced: kept, no longer
// the instance's, deleted with the instance.
const rolePreviousData = "previous-data"

// snapshotTimeout bounds the wait for an EBS snapshot to complete: large
// volumes take long the first time (later ones are incremental).
const snapshotTimeout = 2 * time.Hour

// Snapshot implements provisioner.Backend: an EBS snapshot of the data
// volume, tagged with FM's tags, complete before it is reported (the volume
// keeps serving meanwhile).
func (b *Backend) Snapshot(ctx context.Context, req provisioner.Request, cur protocol.MachineState, snap protocol.SnapshotRef) (protocol.SnapshotRef, error) {
	c, region, err := b.clientsFor(ctx, req, cur)
	if err != nil {
		return snap, err
	}
	found, err := findSnapshots(ctx, c, snap.ID)
	if err != nil {
		return snap, err
	}
	id := ""
	if len(found) > 0 {
		// Two (a create whose answer was lost and one the retry's look-up
		// could not see yet, as EC2's eventual consistency allows) are
		// both kept: either may be the one a first report named. They go
		// together when the snapshot is deleted (DeleteSnapshot).
		id = aws.ToString(found[0].SnapshotId)
		req.Progress("snapshot", fmt.Sprintf("EBS snapshot %s of this request exists", id))
	} else {
		// CreateSnapshot takes no client token: a call whose answer was
		// lost, made again by the SDK, would take a second snapshot. It is
		// made once; a failure goes back to the provisioner, whose next try
		// looks for the snapshot first.
		out, err := c.ec2.CreateSnapshot(ctx, &ec2.CreateSnapshotInput{
			VolumeId:    aws.String(cur.VolumeID),
			Description: aws.String(fmt.Sprintf("FM snapshot %s of instance %s", snap.ID, req.Instance)),
			TagSpecifications: tagSpec(types.ResourceTypeSnapshot, []types.Tag{
				{Key: aws.String("Name"), Value: aws.String(req.Instance + " " + snap.ID)},
				{Key: aws.String(TagInstance), Value: aws.String(req.Instance)},
				{Key: aws.String(TagSnapshot), Value: aws.String(snap.ID)},
				{Key: aws.String(TagRequest), Value: aws.String(req.ID)},
			}),
		}, once)
		if err != nil {
			return snap, cloudError("snapshot the data volume", err)
		}
		id = aws.ToString(out.SnapshotId)
		req.Progress("snapshot", fmt.Sprintf("EBS snapshot %s of volume %s started", id, cur.VolumeID))
	}
	var size int32
	lastProgress, lastState := "", types.SnapshotState("")
	err = b.waitWithin(ctx, req, "snapshot", "snapshot "+id, snapshotTimeout, func() (bool, string, error) {
		s, err := describeSnapshot(ctx, c, id)
		if err != nil {
			return false, "", err
		}
		if s == nil {
			return false, "", protocol.Errorf(protocol.CodeNotFound, "EBS snapshot %s disappeared", id)
		}
		if s.State == types.SnapshotStateError {
			return false, "", protocol.Errorf(protocol.CodeUnavailable, "EBS snapshot %s failed: %s", id, aws.ToString(s.StateMessage))
		}
		size = aws.ToInt32(s.VolumeSize)
		// EBS says how far a pending snapshot got ("45%"): shown in place,
		// after the step that says it is pending (waitWithin reports a new
		// state once this returns).
		if pct := aws.ToString(s.Progress); s.State == types.SnapshotStatePending && lastState == s.State && pct != "" && pct != lastProgress {
			lastProgress = pct
			req.Advance("snapshot", fmt.Sprintf("EBS snapshot %s: %s", id, pct))
		}
		lastState = s.State
		return s.State == types.SnapshotStateCompleted, string(s.State), nil
	})
	if err != nil {
		return snap, err
	}
	return protocol.SnapshotRef{ID: snap.ID, Store: "ebs", Ref: id, Region: region, VolumeSizeGB: int(size)}, nil
}

// once makes an AWS call without the SDK's retries, for a call that is not
// idempotent (no client token): made again after its answer was lost, it
// would make a second resource.
func once(o *ec2.Options) { o.RetryMaxAttempts = 1 }

// DeleteSnapshot implements provisioner.Backend. Every EBS snapshot that
// carries the snapshot's id goes, the one reported and any other a retry
// made (or one made when no report came: its Ref is empty).
func (b *Backend) DeleteSnapshot(ctx context.Context, req provisioner.Request, snap protocol.SnapshotRef) error {
	if snap.Store != "" && snap.Store != "ebs" {
		return protocol.Errorf(protocol.CodeFailedPrecondition, "snapshot %s is kept in %q, not in EBS", snap.ID, snap.Store)
	}
	region := snap.Region
	if region == "" {
		region = b.cfg.Region
	}
	c, _, err := b.connectTo(ctx, region, req.Cloud)
	if err != nil {
		return err
	}
	found, err := taggedSnapshots(ctx, c, snap.ID)
	if err != nil {
		return err
	}
	ids := []string{}
	if snap.Ref != "" {
		ids = append(ids, snap.Ref)
	}
	for _, s := range found {
		if id := aws.ToString(s.SnapshotId); id != snap.Ref {
			ids = append(ids, id)
		}
	}
	for _, id := range ids {
		if _, err := c.ec2.DeleteSnapshot(ctx, &ec2.DeleteSnapshotInput{SnapshotId: aws.String(id)}); err != nil && !isNotFound(err) {
			return cloudError("delete EBS snapshot "+id, err)
		}
		req.Progress("delete-snapshot", "EBS snapshot "+id+" deleted")
	}
	return nil
}

// checkSnapshot is a restore's check before anything changes: the EBS
// snapshot exists and is complete.
func checkSnapshot(ctx context.Context, c clients, snap protocol.SnapshotRef) (*types.Snapshot, error) {
	if snap.Store != "ebs" || snap.Ref == "" {
		return nil, protocol.Errorf(protocol.CodeFailedPrecondition, "snapshot %s is not an EBS snapshot (%q)", snap.ID, snap.Store)
	}
	s, err := describeSnapshot(ctx, c, snap.Ref)
	if err != nil {
		return nil, err
	}
	if s == nil {
		return nil, protocol.Errorf(protocol.CodeDataLoss, "EBS snapshot %s of FM snapshot %s no longer exists", snap.Ref, snap.ID)
	}
	if s.State != types.SnapshotStateCompleted {
		return nil, protocol.Errorf(protocol.CodeFailedPrecondition, "EBS snapshot %s is %s, not completed", snap.Ref, s.State)
	}
	return s, nil
}

// taggedSnapshots gives every EBS snapshot of FM's snapshot fmID, failed
// ones too.
func taggedSnapshots(ctx context.Context, c clients, fmID string) ([]types.Snapshot, error) {
	out, err := c.ec2.DescribeSnapshots(ctx, &ec2.DescribeSnapshotsInput{OwnerIds: []string{"self"},
		Filters: []types.Filter{tagFilter(TagSnapshot, fmID)}})
	if err != nil {
		return nil, cloudError("look up the snapshot", err)
	}
	return out.Snapshots, nil
}

// findSnapshots gives the EBS snapshots of FM's snapshot fmID that have not
// failed, the first taken first (ties by id), so that every try that sees
// the same ones reports the same.
func findSnapshots(ctx context.Context, c clients, fmID string) ([]types.Snapshot, error) {
	all, err := taggedSnapshots(ctx, c, fmID)
	if err != nil {
		return nil, err
	}
	var found []types.Snapshot
	for _, s := range all {
		if s.State != types.SnapshotStateError {
			found = append(found, s)
		}
	}
	slices.SortFunc(found, func(a, b types.Snapshot) int {
		if c := aws.ToTime(a.StartTime).Compare(aws.ToTime(b.StartTime)); c != 0 {
			return c
		}
		return strings.Compare(aws.ToString(a.SnapshotId), aws.ToString(b.SnapshotId))
	})
	return found, nil
}

func describeSnapshot(ctx context.Context, c clients, id string) (*types.Snapshot, error) {
	out, err := c.ec2.DescribeSnapshots(ctx, &ec2.DescribeSnapshotsInput{SnapshotIds: []string{id}})
	if isNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, cloudError("look at snapshot "+id, err)
	}
	if len(out.Snapshots) == 0 {
		return nil, nil
	}
	return &out.Snapshots[0], nil
}

// TagKeptBy names, on a data volume a restore kept aside, the request that
// kept it there.
const TagKeptBy = "fm:kept-by"

// roleRestoring marks the volume a restore made from the snapshot until
// the restore puts it in place (tags it data): a restore killed before
// that, and never finished (its request refused past its deadline, or
// superseded), leaves it to be deleted by the next request
// (abandonRestores), never put in place by a request that is not the
// restore.
const roleRestoring = "restoring"

// restoredVolume is the data volume of a restore. One an earlier restore
// kept aside goes first (a volume kept by this request, found after a
// crash, is the one this restore replaced, and stays). The volume is made
// from the snapshot as restoring (or found again after a crash), the
// instance's current data volume is then kept aside, tagged previous-data
// and kept-by this request, and last the restored volume is put in place
// (tagged data). Each step shows in the tags, so that a retry after a crash
// goes on from where it was, and a restore that never finishes can be
// undone (abandonRestores).
func (b *Backend) restoredVolume(ctx context.Context, c clients, req provisioner.Request, az string, snap *types.Snapshot) (*types.Volume, error) {
	kept, err := b.findVolumes(ctx, c, req.Instance, rolePreviousData)
	if err != nil {
		return nil, err
	}
	for _, v := range kept {
		if tagValue(v.Tags, TagKeptBy) == req.ID {
			continue
		}
		id := aws.ToString(v.VolumeId)
		if err := b.deleteVolume(ctx, c, req, id); err != nil {
			return nil, err
		}
		req.Progress("data-volume", fmt.Sprintf("the volume an earlier restore kept aside, %s, is deleted", id))
	}
	vols, err := b.findVolumes(ctx, c, req.Instance)
	if err != nil {
		return nil, err
	}
	for i, v := range vols {
		if tagValue(v.Tags, TagRequest) == req.ID {
			return &vols[i], nil // put in place already
		}
	}
	var restored *types.Volume
	restoring, err := b.findVolumes(ctx, c, req.Instance, roleRestoring)
	if err != nil {
		return nil, err
	}
	for _, v := range restoring {
		if tagValue(v.Tags, TagRequest) == req.ID {
			// Made before a crash: it may still be being created.
			if restored, err = b.waitAvailable(ctx, c, req, aws.ToString(v.VolumeId)); err != nil {
				return nil, err
			}
			break
		}
	}
	if restored == nil {
		if restored, err = b.createVolume(ctx, c, req, az, snap, roleRestoring); err != nil {
			return nil, err
		}
	}
	for _, v := range vols {
		id := aws.ToString(v.VolumeId)
		if _, err := c.ec2.CreateTags(ctx, &ec2.CreateTagsInput{Resources: []string{id},
			Tags: []types.Tag{{Key: aws.String(TagRole), Value: aws.String(rolePreviousData)}, {Key: aws.String(TagKeptBy), Value: aws.String(req.ID)}}}); err != nil {
			return nil, cloudError("keep the current data volume aside", err)
		}
		req.Progress("data-volume", fmt.Sprintf("the current data volume %s is kept aside (tag %s=%s)", id, TagRole, rolePreviousData))
	}
	id := aws.ToString(restored.VolumeId)
	if _, err := c.ec2.CreateTags(ctx, &ec2.CreateTagsInput{Resources: []string{id},
		Tags: []types.Tag{{Key: aws.String(TagRole), Value: aws.String(roleData)}}}); err != nil {
		return nil, cloudError("put the restored data volume in place", err)
	}
	req.Progress("data-volume", fmt.Sprintf("the volume restored from the snapshot, %s, is the data volume", id))
	return restored, nil
}

// abandonRestores undoes what a restore of another request left
// unfinished: the instance's data volume it kept aside is put back in
// place (when no other is), then the volume it made from the snapshot is
// deleted. A later request never puts in place a volume it did not make
// (a restore whose operation failed would otherwise replace the data
// silently), and a later restore never deletes, as an earlier restore's
// leftover, the volume that was in place. The order makes a retry after a
// crash go on from where it was.
func (b *Backend) abandonRestores(ctx context.Context, c clients, req provisioner.Request) error {
	restoring, err := b.findVolumes(ctx, c, req.Instance, roleRestoring)
	if err != nil {
		return err
	}
	var others []types.Volume
	for _, v := range restoring {
		if tagValue(v.Tags, TagRequest) != req.ID {
			others = append(others, v)
		}
	}
	if len(others) == 0 {
		return nil
	}
	data, err := b.findVolumes(ctx, c, req.Instance)
	if err != nil {
		return err
	}
	if len(data) == 0 {
		kept, err := b.findVolumes(ctx, c, req.Instance, rolePreviousData)
		if err != nil {
			return err
		}
		for _, v := range kept {
			by := tagValue(v.Tags, TagKeptBy)
			if by == req.ID {
				continue
			}
			id := aws.ToString(v.VolumeId)
			if _, err := c.ec2.CreateTags(ctx, &ec2.CreateTagsInput{Resources: []string{id},
				Tags: []types.Tag{{Key: aws.String(TagRole), Value: aws.String(roleData)}}}); err != nil {
				return cloudError("put the data volume back in place", err)
			}
			req.Progress("abandon-restore", fmt.Sprintf("the data volume %s, kept aside by the unfinished restore %s, is in place again", id, by))
		}
	}
	for _, v := range others {
		id := aws.ToString(v.VolumeId)
		if err := b.deleteVolume(ctx, c, req, id); err != nil {
			return err
		}
		req.Progress("abandon-restore", fmt.Sprintf("the volume %s of the unfinished restore %s is deleted", id, tagValue(v.Tags, TagRequest)))
	}
	return nil
}
