package ec2

import (
	"context"
	"fmt"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
)

// findVolumes returns the instance's volumes of the roles (default: its
// data volume) that are not being deleted.
func (b *Backend) findVolumes(ctx context.Context, c clients, instance string, roles ...string) ([]types.Volume, error) {
	if len(roles) == 0 {
		roles = []string{roleData}
	}
	out, err := c.ec2.DescribeVolumes(ctx, &ec2.DescribeVolumesInput{Filters: []types.Filter{
		tagFilter(TagInstance, instance), {Name: aws.String("tag:" + TagRole), Values: roles},
		{Name: aws.String("status"), Values: []string{"creating", "available", "in-use"}},
	}})
	if err != nil {
		return nil, cloudError("look up the data volume", err)
	}
	return out.Volumes, nil
}

// applyEncryption sets a volume's encryption from the instance's
// volumesEncryption: NONE leaves it off (the account's default may still
// encrypt), DEFAULT_KEY uses the account's EBS key, TENANT and CUSTOM a
// given KMS key.
func applyEncryption(v protocol.VolumeSpec, encrypted **bool, kmsKey **string) {
	switch v.Encryption {
	case "DEFAULT_KEY":
		*encrypted = aws.Bool(true)
	case "TENANT", "CUSTOM":
		*encrypted, *kmsKey = aws.Bool(true), aws.String(v.KMSKeyID)
	}
}

// createVolume makes the instance's data volume in the zone, with FM's
// role tag role (data, or restoring for a restore's until it is put in
// place), and waits until it can be attached. Its client token and FM tags
// make a retry after a crash find it.
func (b *Backend) createVolume(ctx context.Context, c clients, req provisioner.Request, az string, from *types.Snapshot, role string) (*types.Volume, error) {
	v := req.Spec.DataVolume
	in := &ec2.CreateVolumeInput{
		AvailabilityZone: aws.String(az), Size: aws.Int32(int32(max(v.SizeGB, 1))), ClientToken: aws.String(req.ID + "-data"),
		TagSpecifications: tagSpec(types.ResourceTypeVolume, tagsFor(req.Spec, req.Spec.Label+" (data)",
			map[string]string{TagInstance: req.Instance, TagRole: role, TagRequest: req.ID})),
	}
	if from != nil {
		// A volume is at least as large as the snapshot it is made from.
		in.SnapshotId = from.SnapshotId
		in.Size = aws.Int32(max(aws.ToInt32(in.Size), aws.ToInt32(from.VolumeSize)))
	}
	if v.Type != "" {
		in.VolumeType = types.VolumeType(v.Type)
	}
	if v.IOPS != 0 {
		in.Iops = aws.Int32(int32(v.IOPS))
	}
	if v.ThroughputMiBps != 0 {
		in.Throughput = aws.Int32(int32(v.ThroughputMiBps))
	}
	applyEncryption(v, &in.Encrypted, &in.KmsKeyId)
	out, err := c.ec2.CreateVolume(ctx, in)
	if err != nil {
		return nil, cloudError("create the data volume", err)
	}
	id := aws.ToString(out.VolumeId)
	req.Progress("data-volume", fmt.Sprintf("data volume %s created (%d GB %s, encryption %s)", id, aws.ToInt32(out.Size), out.VolumeType, firstSet(v.Encryption, "NONE")))
	return b.waitAvailable(ctx, c, req, id)
}

// waitAvailable waits until a volume just made can be attached.
func (b *Backend) waitAvailable(ctx context.Context, c clients, req provisioner.Request, id string) (*types.Volume, error) {
	var vol *types.Volume
	err := b.waitFor(ctx, req, "data-volume", "volume "+id, func() (bool, string, error) {
		var err error
		if vol, err = describeVolume(ctx, c, id); err != nil {
			return false, "", err
		}
		if vol == nil {
			return false, "unknown", nil
		}
		if vol.State == types.VolumeStateError {
			return false, "", protocol.Errorf(protocol.CodeUnavailable, "volume %s failed to be created", id)
		}
		return vol.State == types.VolumeStateAvailable, string(vol.State), nil
	})
	return vol, err
}

func describeVolume(ctx context.Context, c clients, id string) (*types.Volume, error) {
	out, err := c.ec2.DescribeVolumes(ctx, &ec2.DescribeVolumesInput{VolumeIds: []string{id}})
	if isNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, cloudError("look at volume "+id, err)
	}
	if len(out.Volumes) == 0 {
		return nil, nil
	}
	return &out.Volumes[0], nil
}

// attachVolume attaches the data volume to the machine (unless it already
// is) and waits until it is.
func (b *Backend) attachVolume(ctx context.Context, c clients, req provisioner.Request, volumeID, machineID string) error {
	vol, err := describeVolume(ctx, c, volumeID)
	if err != nil {
		return err
	}
	if vol == nil {
		return protocol.Errorf(protocol.CodeNotFound, "the data volume %s is gone", volumeID)
	}
	// A volume has at most one attachment (no multi-attach here).
	attached := func(v *types.Volume) (bool, string) {
		if len(v.Attachments) == 0 {
			return false, string(v.State)
		}
		a := v.Attachments[0]
		if aws.ToString(a.InstanceId) != machineID {
			return false, "attached to " + aws.ToString(a.InstanceId)
		}
		return a.State == types.VolumeAttachmentStateAttached, string(a.State)
	}
	if ok, _ := attached(vol); !ok && len(vol.Attachments) == 0 {
		if _, err := c.ec2.AttachVolume(ctx, &ec2.AttachVolumeInput{Device: aws.String(dataDevice),
			InstanceId: aws.String(machineID), VolumeId: aws.String(volumeID)}); err != nil {
			return cloudError("attach the data volume", err)
		}
	}
	return b.waitFor(ctx, req, "data-volume", fmt.Sprintf("volume %s on %s", volumeID, machineID), func() (bool, string, error) {
		v, err := describeVolume(ctx, c, volumeID)
		if err != nil || v == nil {
			return false, "", fmt.Errorf("look at volume %s: %w", volumeID, err)
		}
		ok, status := attached(v)
		return ok, status, nil
	})
}

// deleteVolume deletes a data volume once it is detached.
func (b *Backend) deleteVolume(ctx context.Context, c clients, req provisioner.Request, id string) error {
	err := b.waitFor(ctx, req, "data-volume", "volume "+id, func() (bool, string, error) {
		v, err := describeVolume(ctx, c, id)
		if err != nil {
			return false, "", err
		}
		if v == nil {
			return true, "gone", nil
		}
		return v.State == types.VolumeStateAvailable, string(v.State), nil
	})
	if err != nil {
		return err
	}
	if _, err := c.ec2.DeleteVolume(ctx, &ec2.DeleteVolumeInput{VolumeId: aws.String(id)}); err != nil && !isNotFound(err) {
		return cloudError("delete the data volume", err)
	}
	return nil
}

// GrowVolume implements provisioner.Backend: ModifyVolume, then a wait
// until EBS reports the new size (the volume serves throughout; the
// modification goes on optimizing in the background). A modification to
// the size asked already under way or done (a retry after a crash) is
// waited for, not asked again: EBS refuses a second modification of a
// volume within six hours.
func (b *Backend) GrowVolume(ctx context.Context, req provisioner.Request, cur protocol.MachineState, sizeGB int) (protocol.MachineState, error) {
	c, _, err := b.clientsFor(ctx, req, cur)
	if err != nil {
		return cur, err
	}
	asked, err := modificationUnderWay(ctx, c, cur.VolumeID, sizeGB)
	if err != nil {
		return cur, err
	}
	if asked {
		req.Progress("modify-volume", fmt.Sprintf("volume %s: a modification to %d GB is under way or done", cur.VolumeID, sizeGB))
	} else {
		if _, err := c.ec2.ModifyVolume(ctx, &ec2.ModifyVolumeInput{VolumeId: aws.String(cur.VolumeID), Size: aws.Int32(int32(sizeGB))}); err != nil {
			return cur, cloudError("grow the data volume", err)
		}
		req.Progress("modify-volume", fmt.Sprintf("volume %s: modification to %d GB asked", cur.VolumeID, sizeGB))
	}
	err = b.waitFor(ctx, req, "modify-volume", "volume "+cur.VolumeID, func() (bool, string, error) {
		v, err := describeVolume(ctx, c, cur.VolumeID)
		if err != nil {
			return false, "", err
		}
		if v == nil {
			return false, "", protocol.Errorf(protocol.CodeNotFound, "the data volume %s is gone", cur.VolumeID)
		}
		return int(aws.ToInt32(v.Size)) >= sizeGB, fmt.Sprintf("%d GB", aws.ToInt32(v.Size)), nil
	})
	if err != nil {
		return cur, err
	}
	next := cur
	next.VolumeSizeGB = sizeGB
	return next, nil
}

// modificationUnderWay reports whether the volume is at least sizeGB, or a
// modification to at least that size is under way or done.
func modificationUnderWay(ctx context.Context, c clients, volumeID string, sizeGB int) (bool, error) {
	v, err := describeVolume(ctx, c, volumeID)
	if err != nil {
		return false, err
	}
	if v == nil {
		return false, protocol.Errorf(protocol.CodeNotFound, "the data volume %s is gone", volumeID)
	}
	if int(aws.ToInt32(v.Size)) >= sizeGB {
		return true, nil
	}
	// A filter, not VolumeIds: AWS answers a volume never modified with
	// InvalidVolumeModification.NotFound when it is asked by id.
	out, err := c.ec2.DescribeVolumesModifications(ctx, &ec2.DescribeVolumesModificationsInput{Filters: []types.Filter{
		{Name: aws.String("volume-id"), Values: []string{volumeID}}}})
	if isNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, cloudError("look at the data volume's modifications", err)
	}
	for _, m := range out.VolumesModifications {
		if int(aws.ToInt32(m.TargetSize)) >= sizeGB && m.ModificationState != types.VolumeModificationStateFailed {
			return true, nil
		}
	}
	return false, nil
}
