package ec2

import (
	"context"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
)

// crashed is what the test's crash hook panics with: the backend call
// stops there, as a provisioner killed at that point would.
type crashed struct{ point string }

// liveVolumes are the instance's volumes that are not being deleted, by
// FM's role tag.
func (w *world) liveVolumes(t *testing.T) map[string][]types.Volume {
	t.Helper()
	out, err := w.ec2.DescribeVolumes(context.Background(), &ec2.DescribeVolumesInput{Filters: []types.Filter{tagFilter(TagInstance, "in-analytics"),
		{Name: aws.String("status"), Values: []string{"creating", "available", "in-use"}}}})
	if err != nil {
		t.Fatal(err)
	}
	byRole := map[string][]types.Volume{}
	for _, v := range out.Volumes {
		byRole[tagValue(v.Tags, TagRole)] = append(byRole[tagValue(v.Tags, TagRole)], v)
	}
	return byRole
}

// TestAnUnfinishedRestoreIsUndoneByTheNextRequest: a restore killed before
// it finished, and never finished (refused past its deadline, or
// superseded), is undone by the next reprovision: the data volume that was
// in place is in place again and the volume made from the snapshot goes.
// A plain reprovision must not put the snapshot's volume in place (nor make
// an empty one), and another restore must keep the volume that was in
// place aside, not delete it as an earlier restore's.
func TestAnUnfinishedRestoreIsUndoneByTheNextRequest(t *testing.T) {
	tests := []struct {
		name    string
		crashAt string // the unfinished restore stops at the first pass there
		restore bool   // the next request is another restore
	}{
		{name: "volume made, plain reprovision", crashAt: "ec2/CreateVolume:after"},
		{name: "current volume kept aside, plain reprovision", crashAt: "ec2/CreateTags:after"},
		{name: "current volume kept aside, another restore", crashAt: "ec2/CreateTags:after", restore: true},
	}
	w := newWorld(t)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w.reset(t)
			ctx := context.Background()
			spec, st, ref := w.snapshotted(t)
			first := st.VolumeID
			restore := func(id string) provisioner.Request {
				req := w.request(id, protocol.ProvisionReprovision, spec)
				req.FromSnapshot = &ref
				return req
			}

			w.backend.cfg.Crash = func(point string) {
				if point == tc.crashAt {
					panic(crashed{point})
				}
			}
			func() {
				defer func() {
					if r := recover(); r != (crashed{tc.crashAt}) {
						t.Fatalf("the restore stopped with %v, not at %s", r, tc.crashAt)
					}
				}()
				_, _ = w.backend.Reprovision(ctx, restore("rq-3"), st)
			}()
			w.backend.cfg.Crash = nil

			next := w.request("rq-4", protocol.ProvisionReprovision, spec)
			if tc.restore {
				next = restore("rq-4")
			}
			got, err := w.backend.Reprovision(ctx, next, st)
			if err != nil {
				t.Fatal(err)
			}
			vols := w.liveVolumes(t)
			if n := len(vols[roleRestoring]); n != 0 {
				t.Errorf("%d volumes of the unfinished restore are left", n)
			}
			if n := len(vols[roleData]); n != 1 || aws.ToString(vols[roleData][0].VolumeId) != got.VolumeID {
				t.Fatalf("%d data volumes, the machine's is %s", n, got.VolumeID)
			}
			if !tc.restore {
				if got.VolumeID != first || len(vols[rolePreviousData]) != 0 {
					t.Fatalf("the data volume is %s (was %s), %d kept aside: the unfinished restore was not undone", got.VolumeID, first, len(vols[rolePreviousData]))
				}
				return
			}
			restored := w.volume(t, got.VolumeID)
			if aws.ToString(restored.SnapshotId) != ref.Ref || tagValue(restored.Tags, TagRequest) != "rq-4" {
				t.Fatalf("the data volume %s is not the one rq-4 made from the snapshot: %+v", got.VolumeID, restored.Tags)
			}
			if kept := vols[rolePreviousData]; len(kept) != 1 || aws.ToString(kept[0].VolumeId) != first || tagValue(kept[0].Tags, TagKeptBy) != "rq-4" {
				t.Fatalf("the volume that was in place, %s, is not the one kept aside: %+v", first, kept)
			}
		})
	}
}
