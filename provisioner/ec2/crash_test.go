package ec2

import (
	"context"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/aws/aws-sdk-go-v2/service/route53"
	r53types "github.com/aws/aws-sdk-go-v2/service/route53/types"
	"github.com/fleetmanager/fm/internal/crashpoint"
	"github.com/fleetmanager/fm/internal/crashpoint/crashtable"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
	"github.com/fleetmanager/fm/provisioner/crashtest"
	"github.com/nats-io/nats.go/jetstream"
)

// TestCrashPoints is the crash-point table of the EC2 backend on moto
// (provisioner/crashtest): every operation, killed before and after each
// AWS call that changes something and at each of the provisioner's own
// points. Resources are found by FM's tags to count them: one machine, one
// data volume, one elastic IP per instance, snapshots exactly once, nothing
// orphaned. FM_CRASH_FULL=1 runs every point; by default one in three
// (always the first and the last of each operation).
func TestCrashPoints(t *testing.T) {
	const parallel = 4
	// A moto server per case at a time, reset between cases: moto slows
	// down as what it holds grows.
	cw := &ec2World{pool: make(chan *world, parallel)}
	for range parallel {
		cw.pool <- newWorld(t)
	}
	opts := crashtest.Options{Stride: 3, Parallel: parallel}
	if crashtable.Full() {
		opts.Stride = 1
	}
	crashtable.Report(t, "provisioner-ec2", crashtest.Run(t, cw, opts))
}

// ec2World is a pool of moto servers with the operator's resources.
type ec2World struct{ pool chan *world }

func (cw *ec2World) Name() string { return "ec2" }

// Case implements crashtest.World: a moto server of the pool, reset, with
// the operator's resources made again.
func (cw *ec2World) Case(t testing.TB) crashtest.Case {
	w := <-cw.pool
	t.Cleanup(func() { cw.pool <- w })
	w.reset(t)
	return &ec2Case{w: w}
}

// ec2Case is one case's moto; each instance gets a network of its own, so
// that what its machines make (security groups) is the same in every case.
type ec2Case struct{ w *world }

func (cw *ec2Case) Backend(t testing.TB, natsURL string, hook crashpoint.Hook) provisioner.Backend {
	b, err := New(Config{Region: "us-east-1", Endpoint: cw.w.moto.URL, AgentNATSURL: natsURL,
		IngressCIDRs: []string{"203.0.113.0/24"}, Poll: 20 * time.Millisecond, Timeout: time.Minute, Crash: hook})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (cw *ec2Case) Spec(instance string) *protocol.MachineSpec {
	spec := cw.w.spec()
	spec.Label = instance
	spec.Network.ID = "vn-" + instance[3:]
	spec.DataVolume.SizeGB = crashtest.SizeGB
	return spec
}

func (cw *ec2Case) Cleanup(string) {}

func (cw *ec2Case) Check(t testing.TB, _ jetstream.JetStream, instance string, want crashtest.Want) {
	t.Helper()
	ctx := context.Background()
	c := cw.w.ec2
	out, err := c.DescribeInstances(ctx, &ec2.DescribeInstancesInput{Filters: []types.Filter{
		tagFilter(TagInstance, instance),
		{Name: aws.String("instance-state-name"), Values: []string{"pending", "running", "stopping", "stopped"}}}})
	if err != nil {
		t.Fatal(err)
	}
	var machines []types.Instance
	for _, r := range out.Reservations {
		machines = append(machines, r.Instances...)
	}
	if len(machines) != want.Machines {
		t.Errorf("%d machines, want %d", len(machines), want.Machines)
	}
	for _, m := range machines {
		wantState := types.InstanceStateNameStopped
		if want.Running {
			wantState = types.InstanceStateNameRunning
		}
		if m.State.Name != wantState {
			t.Errorf("machine %s is %s, want %s", aws.ToString(m.InstanceId), m.State.Name, wantState)
		}
		if by := tagValue(m.Tags, TagRequest); by != want.MadeBy {
			t.Errorf("machine %s was made by %q, want %q", aws.ToString(m.InstanceId), by, want.MadeBy)
		}
	}
	vols, err := c.DescribeVolumes(ctx, &ec2.DescribeVolumesInput{Filters: []types.Filter{tagFilter(TagInstance, instance),
		{Name: aws.String("status"), Values: []string{"creating", "available", "in-use"}}}})
	if err != nil {
		t.Fatal(err)
	}
	byRole := map[string][]types.Volume{}
	for _, v := range vols.Volumes {
		role := tagValue(v.Tags, TagRole)
		byRole[role] = append(byRole[role], v)
	}
	if n := len(byRole[roleData]); n != want.Volumes {
		t.Errorf("%d data volumes, want %d", n, want.Volumes)
	}
	if n := len(byRole[rolePreviousData]); n != want.Kept {
		t.Errorf("%d kept-aside volumes, want %d", n, want.Kept)
	}
	if want.VolumeSizeGB != 0 && len(byRole[roleData]) == 1 {
		if got := int(aws.ToInt32(byRole[roleData][0].Size)); got != want.VolumeSizeGB {
			t.Errorf("the data volume is %d GB, want %d", got, want.VolumeSizeGB)
		}
	}
	for role, vs := range byRole {
		if role != roleData && role != rolePreviousData && role != "os" {
			t.Errorf("%d volumes of role %q", len(vs), role)
		}
	}
	addrs, err := c.DescribeAddresses(ctx, &ec2.DescribeAddressesInput{Filters: []types.Filter{tagFilter(TagInstance, instance)}})
	if err != nil {
		t.Fatal(err)
	}
	// The spec asks for an elastic IP FM allocates: one while the instance
	// lives, none once it is deleted.
	wantAddrs := 1
	if want.Machines == 0 && want.Volumes == 0 {
		wantAddrs = 0
	}
	if len(addrs.Addresses) != wantAddrs {
		t.Errorf("%d elastic IPs, want %d", len(addrs.Addresses), wantAddrs)
	}
	snaps, err := c.DescribeSnapshots(ctx, &ec2.DescribeSnapshotsInput{OwnerIds: []string{"self"},
		Filters: []types.Filter{tagFilter(TagInstance, instance)}})
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps.Snapshots) != len(want.Snapshots) {
		t.Errorf("%d EBS snapshots, want %d", len(snaps.Snapshots), len(want.Snapshots))
	}
	for _, ref := range want.Snapshots {
		n := 0
		for _, s := range snaps.Snapshots {
			if tagValue(s.Tags, TagSnapshot) == ref.ID {
				n++
				if aws.ToString(s.SnapshotId) != ref.Ref {
					t.Errorf("snapshot %s is EBS %s, %s was recorded", ref.ID, aws.ToString(s.SnapshotId), ref.Ref)
				}
			}
		}
		if n != 1 {
			t.Errorf("snapshot %s is kept %d times", ref.ID, n)
		}
	}
	for _, ref := range want.Gone {
		for _, s := range snaps.Snapshots {
			if tagValue(s.Tags, TagSnapshot) == ref.ID {
				t.Errorf("snapshot %s is still kept (%s)", ref.ID, aws.ToString(s.SnapshotId))
			}
		}
	}
	// DNS: the machine's records while it runs, none once it is gone.
	for _, zone := range []string{cw.w.privZone, cw.w.pubZone} {
		rrs, err := cw.w.dns.ListResourceRecordSets(ctx, &route53.ListResourceRecordSetsInput{HostedZoneId: aws.String(zone)})
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, rr := range rrs.ResourceRecordSets {
			if rr.Type == r53types.RRTypeA && strings.HasPrefix(aws.ToString(rr.Name), instance+".") {
				n++
			}
		}
		switch {
		case want.Running && n != 1:
			t.Errorf("zone %s has %d records of the instance, want 1", zone, n)
		case want.Machines == 0 && n != 0:
			t.Errorf("zone %s has %d records of an instance without a machine", zone, n)
		}
	}
}

// TestEveryChangeHasCrashPoints: every EC2 call of the backend's interface
// that changes something (all but the Describe calls) is wrapped by
// crashEC2, so that the crash-point harness can kill the provisioner around
// it; a call added to the interface without its wrapper fails here.
func TestEveryChangeHasCrashPoints(t *testing.T) {
	src, err := os.ReadFile("crash.go")
	if err != nil {
		t.Fatal(err)
	}
	api := reflect.TypeFor[ec2API]()
	for i := range api.NumMethod() {
		name := api.Method(i).Name
		if strings.HasPrefix(name, "Describe") {
			continue
		}
		if !strings.Contains(string(src), "func (c crashEC2) "+name+"(") {
			t.Errorf("ec2API.%s changes something and has no crash points (crashEC2 in crash.go)", name)
		}
	}
}
