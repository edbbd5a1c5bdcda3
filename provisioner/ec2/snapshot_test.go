package ec2

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
)

func (w *world) snapshots(t *testing.T) []types.Snapshot {
	t.Helper()
	out, err := w.ec2.DescribeSnapshots(context.Background(), &ec2.DescribeSnapshotsInput{OwnerIds: []string{"self"},
		Filters: []types.Filter{tagFilter(TagInstance, "in-analytics")}})
	if err != nil {
		t.Fatal(err)
	}
	return out.Snapshots
}

func (w *world) volumes(t *testing.T) []types.Volume {
	t.Helper()
	out, err := w.ec2.DescribeVolumes(context.Background(), &ec2.DescribeVolumesInput{Filters: []types.Filter{tagFilter(TagInstance, "in-analytics"),
		{Name: aws.String("tag:" + TagRole), Values: []string{roleData, rolePreviousData}}}})
	if err != nil {
		t.Fatal(err)
	}
	return out.Volumes
}

// TestSnapshotsOnMoto: an EBS snapshot of the data volume, found again by
// its tag; a restore checks it, makes a volume from it and attaches it,
// keeping the old volume aside; a missing snapshot changes nothing.
func TestSnapshotsOnMoto(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	spec, st, ref := w.snapshotted(t)
	first := st.VolumeID
	if ref.Store != "ebs" || !strings.HasPrefix(ref.Ref, "snap-") || ref.Region != "us-east-1" || ref.VolumeSizeGB != 50 {
		t.Fatalf("snapshot ref %+v", ref)
	}
	// Taken again (a redelivery): the same EBS snapshot, not a second.
	again, err := w.backend.Snapshot(ctx, w.request("rq-2", protocol.ProvisionSnapshot, nil), st, protocol.SnapshotRef{ID: "snap-1"})
	if err != nil || again.Ref != ref.Ref {
		t.Fatalf("snapshot again: %+v %v", again, err)
	}
	snaps := w.snapshots(t)
	if len(snaps) != 1 || aws.ToString(snaps[0].VolumeId) != first || tagValue(snaps[0].Tags, TagSnapshot) != "snap-1" {
		t.Fatalf("EBS snapshots %+v", snaps)
	}

	restore := func(id string, snap protocol.SnapshotRef) (protocol.MachineState, error) {
		req := w.request(id, protocol.ProvisionReprovision, spec)
		req.FromSnapshot = &snap
		return w.backend.Reprovision(ctx, req, st)
	}
	missing := ref
	missing.Ref = "snap-0123456789abcdef0"
	_, err = restore("rq-3", missing)
	var pe *protocol.Error
	if !provisioner.IsUntouched(err) || !errors.As(err, &pe) || pe.Code != protocol.CodeDataLoss {
		t.Fatalf("restore of a missing snapshot: %v", err)
	}
	if vols := w.volumes(t); len(vols) != 1 || len(w.fmInstances(t)) != 1 {
		t.Fatalf("a refused restore changed something: %d volumes", len(vols))
	}

	st, err = restore("rq-4", ref)
	if err != nil {
		t.Fatalf("restore: %v\n%s", err, strings.Join(w.progress, "\n"))
	}
	restored := w.volume(t, st.VolumeID)
	if st.VolumeID == first || aws.ToString(restored.SnapshotId) != ref.Ref || len(restored.Attachments) != 1 ||
		aws.ToString(restored.Attachments[0].InstanceId) != st.MachineID {
		t.Fatalf("restored volume %+v for machine %s", restored, st.MachineID)
	}
	if old := w.volume(t, first); tagValue(old.Tags, TagRole) != rolePreviousData {
		t.Fatalf("the replaced volume was not kept aside: %+v", old.Tags)
	}
	if machines := w.fmInstances(t); len(machines) != 1 {
		t.Fatalf("%d machines after the restore", len(machines))
	}

	// Growth: ModifyVolume on the restored volume.
	grown, err := w.backend.GrowVolume(ctx, w.request("rq-4b", protocol.ProvisionGrowVolume, nil), st, 80)
	if err != nil || grown.VolumeSizeGB != 80 || aws.ToInt32(w.volume(t, st.VolumeID).Size) != 80 {
		t.Fatalf("grow: %+v %v", grown, err)
	}

	if err := w.backend.DeleteSnapshot(ctx, w.request("rq-5", protocol.ProvisionDeleteSnapshot, nil), ref); err != nil {
		t.Fatal(err)
	}
	if snaps := w.snapshots(t); len(snaps) != 0 {
		t.Fatalf("EBS snapshots left: %+v", snaps)
	}
	// Deleting the instance deletes the volume kept aside too.
	st.RequestID = "rq-4"
	if _, err := w.backend.Delete(ctx, w.request("rq-6", protocol.ProvisionDelete, nil), st); err != nil {
		t.Fatal(err)
	}
	for _, v := range w.volumes(t) {
		if v.State != types.VolumeStateDeleting && v.State != types.VolumeStateDeleted {
			t.Fatalf("volume %s left: %s", aws.ToString(v.VolumeId), v.State)
		}
	}
}

// snapshotted makes a machine (request rq-1, no elastic IP nor DNS) and
// takes its snapshot snap-1 (request rq-2): the machine's spec and state,
// and the snapshot.
func (w *world) snapshotted(t *testing.T) (*protocol.MachineSpec, protocol.MachineState, protocol.SnapshotRef) {
	t.Helper()
	spec, st := w.machine(t)
	ref, err := w.backend.Snapshot(context.Background(), w.request("rq-2", protocol.ProvisionSnapshot, nil), st, protocol.SnapshotRef{ID: "snap-1"})
	if err != nil {
		t.Fatal(err)
	}
	return spec, st, ref
}

// machine makes a machine (request rq-1, no elastic IP nor DNS): its spec
// and state.
func (w *world) machine(t *testing.T) (*protocol.MachineSpec, protocol.MachineState) {
	t.Helper()
	spec := w.spec()
	spec.ElasticIP, spec.Network.DNSStrategy = nil, "NONE"
	st, err := w.backend.Reprovision(context.Background(), w.request("rq-1", protocol.ProvisionReprovision, spec), protocol.MachineState{})
	if err != nil {
		t.Fatal(err)
	}
	st.RequestID = "rq-1"
	return spec, st
}
