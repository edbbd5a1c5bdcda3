package ec2

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/aws/smithy-go"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner/ec2/mototest"
)

// awsLike is EC2 as AWS behaves where moto does not, and counts the calls
// the tests look at.
type awsLike struct {
	ec2API
	mu     sync.Mutex
	calls  map[string]int
	failAt string // a call that fails (once) with an AWS-side error
	// terminateLaunched terminates every machine as soon as it is
	// launched, as AWS does when it cannot run it (capacity, a volume it
	// cannot attach, a KMS key it may not use).
	terminateLaunched bool
}

func (a *awsLike) count(name string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.calls[name]
}

func (a *awsLike) note(name string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.calls[name]++
	if a.failAt == name {
		a.failAt = ""
		return &smithy.GenericAPIError{Code: "InvalidParameterValue", Message: "refused by the test"}
	}
	return nil
}

// DescribeVolumesModifications answers a volume never modified, asked by
// id, with InvalidVolumeModification.NotFound, as AWS does (moto returns an
// empty list).
func (a *awsLike) DescribeVolumesModifications(ctx context.Context, in *ec2.DescribeVolumesModificationsInput, o ...func(*ec2.Options)) (*ec2.DescribeVolumesModificationsOutput, error) {
	_ = a.note("DescribeVolumesModifications")
	out, err := a.ec2API.DescribeVolumesModifications(ctx, in, o...)
	if err == nil && len(in.VolumeIds) > 0 && len(out.VolumesModifications) == 0 {
		return nil, &smithy.GenericAPIError{Code: "InvalidVolumeModification.NotFound", Message: "Modification for volume '" + in.VolumeIds[0] + "' does not exist."}
	}
	return out, err
}

func (a *awsLike) ModifyVolume(ctx context.Context, in *ec2.ModifyVolumeInput, o ...func(*ec2.Options)) (*ec2.ModifyVolumeOutput, error) {
	if err := a.note("ModifyVolume"); err != nil {
		return nil, err
	}
	return a.ec2API.ModifyVolume(ctx, in, o...)
}

func (a *awsLike) AssociateAddress(ctx context.Context, in *ec2.AssociateAddressInput, o ...func(*ec2.Options)) (*ec2.AssociateAddressOutput, error) {
	if err := a.note("AssociateAddress"); err != nil {
		return nil, err
	}
	return a.ec2API.AssociateAddress(ctx, in, o...)
}

func (a *awsLike) RunInstances(ctx context.Context, in *ec2.RunInstancesInput, o ...func(*ec2.Options)) (*ec2.RunInstancesOutput, error) {
	out, err := a.ec2API.RunInstances(ctx, in, o...)
	if err == nil && a.terminateLaunched {
		for _, inst := range out.Instances {
			if _, err := a.ec2API.TerminateInstances(ctx, &ec2.TerminateInstancesInput{InstanceIds: []string{aws.ToString(inst.InstanceId)}}); err != nil {
				return nil, err
			}
		}
	}
	return out, err
}

func (a *awsLike) DescribeInstances(ctx context.Context, in *ec2.DescribeInstancesInput, o ...func(*ec2.Options)) (*ec2.DescribeInstancesOutput, error) {
	_ = a.note("DescribeInstances")
	return a.ec2API.DescribeInstances(ctx, in, o...)
}

// useAWSLike puts awsLike between the backend and moto.
func useAWSLike(w *world) *awsLike {
	a := &awsLike{calls: map[string]int{}}
	real := w.backend.connect
	w.backend.connect = func(ctx context.Context, region string, auth *protocol.CloudAuth) (clients, error) {
		c, err := real(ctx, region, auth)
		a.ec2API = c.ec2
		c.ec2 = a
		return c, err
	}
	return a
}

// TestGrowingAVolumeNeverModified: on AWS, asking for the modifications of
// a volume never modified by its id is an error; growing it must still
// work (it failed every first growth before), and growing it again after a
// crash (the modification asked, not recorded) waits for that modification
// instead of asking for another, which EBS refuses within six hours.
func TestGrowingAVolumeNeverModified(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	spec := w.spec()
	spec.ElasticIP = nil
	st, err := w.backend.Reprovision(ctx, w.request("rq-1", protocol.ProvisionReprovision, spec), protocol.MachineState{})
	if err != nil {
		t.Fatal(err)
	}
	a := useAWSLike(w)
	grown, err := w.backend.GrowVolume(ctx, w.request("rq-2", protocol.ProvisionGrowVolume, nil), st, st.VolumeSizeGB+10)
	if err != nil {
		t.Fatalf("first growth: %v", err)
	}
	if grown.VolumeSizeGB != st.VolumeSizeGB+10 || a.count("ModifyVolume") != 1 {
		t.Fatalf("grown to %d, ModifyVolume called %d times", grown.VolumeSizeGB, a.count("ModifyVolume"))
	}
	// The same request again, from the state before it (the provisioner
	// died before recording the new size).
	if _, err := w.backend.GrowVolume(ctx, w.request("rq-2", protocol.ProvisionGrowVolume, nil), st, st.VolumeSizeGB+10); err != nil {
		t.Fatalf("again: %v", err)
	}
	if n := a.count("ModifyVolume"); n != 1 {
		t.Fatalf("ModifyVolume called %d times for one growth", n)
	}
}

// TestAnElasticIPOfAFailedReprovisionIsReleased: a first reprovision that
// allocated an elastic IP and then failed (before the address was
// recorded) leaves an address FM allocated; deleting the instance releases
// it, found by FM's tags.
func TestAnElasticIPOfAFailedReprovisionIsReleased(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	a := useAWSLike(w)
	a.failAt = "AssociateAddress"
	st, err := w.backend.Reprovision(ctx, w.request("rq-1", protocol.ProvisionReprovision, w.spec()), protocol.MachineState{})
	if err == nil {
		t.Fatal("the reprovision did not fail")
	}
	if st.Details[detailAllocatedByFM] != "" {
		t.Fatalf("the failed reprovision recorded its address: %+v", st.Details)
	}
	addrs := func() int {
		out, err := w.ec2.DescribeAddresses(ctx, &ec2.DescribeAddressesInput{Filters: []types.Filter{tagFilter(TagInstance, "in-analytics")}})
		if err != nil {
			t.Fatal(err)
		}
		return len(out.Addresses)
	}
	if addrs() != 1 {
		t.Fatalf("%d addresses after the failed reprovision", addrs())
	}
	st.Status = protocol.MachineFailed
	if _, err := w.backend.Delete(ctx, w.request("rq-2", protocol.ProvisionDelete, nil), st); err != nil {
		t.Fatal(err)
	}
	if n := addrs(); n != 0 {
		t.Fatalf("%d elastic IPs FM allocated are left after the instance was deleted", n)
	}
}

// TestAliveAsksOnceForEveryMachine: the liveness check of many machines is
// one DescribeInstances call, not one per machine.
func TestAliveAsksOnceForEveryMachine(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	out, err := w.ec2.RunInstances(ctx, &ec2.RunInstancesInput{ImageId: aws.String(w.ami), InstanceType: types.InstanceTypeT3Micro,
		MinCount: aws.Int32(12), MaxCount: aws.Int32(12), SubnetId: aws.String(w.subnet)})
	if err != nil {
		t.Fatal(err)
	}
	var machines []protocol.MachineState
	for i, inst := range out.Instances {
		machines = append(machines, protocol.MachineState{Instance: "in-" + string(rune('a'+i)), Status: protocol.MachineRunning,
			MachineID: aws.ToString(inst.InstanceId), Details: map[string]string{detailRegion: "us-east-1"}})
	}
	gone := aws.ToString(out.Instances[0].InstanceId)
	if _, err := w.ec2.TerminateInstances(ctx, &ec2.TerminateInstancesInput{InstanceIds: []string{gone}}); err != nil {
		t.Fatal(err)
	}
	a := useAWSLike(w)
	alive, err := w.backend.Alive(ctx, machines)
	if err != nil {
		t.Fatal(err)
	}
	if n := a.count("DescribeInstances"); n != 1 {
		t.Fatalf("%d DescribeInstances calls for %d machines, want 1", n, len(machines))
	}
	for _, m := range machines {
		if want := m.MachineID != gone; alive[m.Instance] != want {
			t.Errorf("%s (%s): alive %v, want %v", m.Instance, m.MachineID, alive[m.Instance], want)
		}
	}
}

// TestAMachineThatTerminatesFailsTheRequestAtOnce: a machine that AWS
// terminates as it starts never comes back, and a retry of the request
// would get the same machine (its client token is the request's id): the
// failure is final, not one retried until the operation's deadline.
func TestAMachineThatTerminatesFailsTheRequestAtOnce(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	a := useAWSLike(w)
	a.terminateLaunched = true
	spec := w.spec()
	spec.ElasticIP, spec.Network.DNSStrategy = nil, "NONE"
	_, err := w.backend.Reprovision(ctx, w.request("rq-1", protocol.ProvisionReprovision, spec), protocol.MachineState{})
	if err == nil {
		t.Fatal("the reprovision of a machine that terminated succeeded")
	}
	if code := protocol.CodeOf(err); code == protocol.CodeUnavailable || code != protocol.CodeFailedPrecondition {
		t.Fatalf("the reprovision failed with %s (%v); want a final failure (%s)", code, err, protocol.CodeFailedPrecondition)
	}
}

// answerLost is a proxy in front of moto that passes the first call of
// the action lose on to moto and then closes the connection without
// answering, as a network that drops a response does; it passes every
// other call through. It gives the proxy's URL.
func answerLost(t *testing.T, moto, lose string) string {
	t.Helper()
	target, err := url.Parse(moto)
	if err != nil {
		t.Fatal(err)
	}
	proxy := httputil.NewSingleHostReverseProxy(target)
	var (
		mu   sync.Mutex
		lost bool
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		form, _ := url.ParseQuery(string(body))
		mu.Lock()
		drop := form.Get("Action") == lose && !lost
		lost = lost || drop
		mu.Unlock()
		if !drop {
			proxy.ServeHTTP(w, r)
			return
		}
		proxy.ServeHTTP(httptest.NewRecorder(), r) // done by moto, answer lost
		conn, _, err := w.(http.Hijacker).Hijack()
		if err != nil {
			t.Errorf("hijack: %v", err)
			return
		}
		conn.Close()
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

// TestACallWithoutClientTokenIsMadeOnce: EC2's CreateSnapshot and
// AllocateAddress take no client token, so the SDK making one again after
// its answer was lost made a second snapshot or address (seen as two EBS
// snapshots for one FM snapshot in the crash table under load). Made once,
// the failure goes back to the provisioner, whose next try finds what the
// first made.
func TestACallWithoutClientTokenIsMadeOnce(t *testing.T) {
	tests := []struct {
		action string
		count  func(w *world) int
		do     func(w *world, b *Backend) error
	}{
		{"CreateSnapshot", func(w *world) int { return len(w.snapshots(t)) }, func(w *world, b *Backend) error {
			_, st := w.machine(t)
			ref, err := b.Snapshot(context.Background(), w.request("rq-2", protocol.ProvisionSnapshot, nil), st, protocol.SnapshotRef{ID: "snap-1"})
			if err == nil {
				if snaps := w.snapshots(t); len(snaps) != 1 || aws.ToString(snaps[0].SnapshotId) != ref.Ref {
					t.Errorf("reported %s; EBS snapshots %d", ref.Ref, len(snaps))
				}
			}
			return err
		}},
		{"AllocateAddress", func(w *world) int {
			out, err := w.ec2.DescribeAddresses(context.Background(), &ec2.DescribeAddressesInput{Filters: []types.Filter{tagFilter(TagInstance, "in-analytics")}})
			if err != nil {
				t.Fatal(err)
			}
			return len(out.Addresses)
		}, func(w *world, b *Backend) error {
			_, err := b.Reprovision(context.Background(), w.request("rq-1", protocol.ProvisionReprovision, w.spec()), protocol.MachineState{})
			return err
		}},
	}
	for _, tc := range tests {
		t.Run(tc.action, func(t *testing.T) {
			w := newWorld(t)
			b, err := New(Config{Region: mototest.Region, Endpoint: answerLost(t, w.moto.URL, tc.action), AgentNATSURL: "tls://fm.example.com:4222",
				IngressCIDRs: []string{"203.0.113.0/24"}, Poll: 20 * time.Millisecond, Timeout: 30 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			// The first try fails (its answer lost) or succeeds; the
			// provisioner's next try finishes it.
			if err := tc.do(w, b); err != nil {
				var pe *protocol.Error
				if !errors.As(err, &pe) || pe.Code != protocol.CodeUnavailable {
					t.Fatalf("a lost answer is not a transient failure: %v", err)
				}
				if err := tc.do(w, b); err != nil {
					t.Fatalf("the next try: %v", err)
				}
			}
			if n := tc.count(w); n != 1 {
				t.Fatalf("%d made by %s, want 1", n, tc.action)
			}
		})
	}
}

// TestWhatWasMadeTwice: two EBS snapshots for one FM snapshot, or
// two elastic IPs for one instance (a look-up that could not see the first
// yet, as EC2's eventual consistency allows). Either snapshot may be the
// one a first report named: both are kept, every try reports the first
// taken, and deleting the snapshot deletes both. Of the addresses, the one
// kept is associated and the other released.
func TestWhatWasMadeTwice(t *testing.T) {
	ctx := context.Background()
	t.Run("snapshot", func(t *testing.T) {
		w := newWorld(t)
		_, st := w.machine(t)
		for range 2 {
			if _, err := w.ec2.CreateSnapshot(ctx, &ec2.CreateSnapshotInput{VolumeId: aws.String(st.VolumeID),
				TagSpecifications: tagSpec(types.ResourceTypeSnapshot, []types.Tag{
					{Key: aws.String(TagInstance), Value: aws.String("in-analytics")}, {Key: aws.String(TagSnapshot), Value: aws.String("snap-1")}}),
			}); err != nil {
				t.Fatal(err)
			}
		}
		made := w.snapshots(t)
		first := made[0]
		for _, s := range made[1:] {
			if c := aws.ToTime(s.StartTime).Compare(aws.ToTime(first.StartTime)); c < 0 || c == 0 && aws.ToString(s.SnapshotId) < aws.ToString(first.SnapshotId) {
				first = s
			}
		}
		for _, rq := range []string{"rq-2", "rq-2"} { // a try, and a redelivery
			ref, err := w.backend.Snapshot(ctx, w.request(rq, protocol.ProvisionSnapshot, nil), st, protocol.SnapshotRef{ID: "snap-1"})
			if err != nil {
				t.Fatal(err)
			}
			if ref.Ref != aws.ToString(first.SnapshotId) || len(w.snapshots(t)) != 2 {
				t.Fatalf("reported %s, first taken %s; %d left", ref.Ref, aws.ToString(first.SnapshotId), len(w.snapshots(t)))
			}
		}
		// Deleted by the other's id (the one a first report could have named).
		var other protocol.SnapshotRef
		for _, s := range made {
			if s.SnapshotId != first.SnapshotId {
				other = protocol.SnapshotRef{ID: "snap-1", Store: "ebs", Ref: aws.ToString(s.SnapshotId)}
			}
		}
		if err := w.backend.DeleteSnapshot(ctx, w.request("rq-3", protocol.ProvisionDeleteSnapshot, nil), other); err != nil {
			t.Fatal(err)
		}
		if left := w.snapshots(t); len(left) != 0 {
			t.Fatalf("%d EBS snapshots left after the deletion", len(left))
		}
	})
	t.Run("elastic IP", func(t *testing.T) {
		w := newWorld(t)
		for range 2 {
			if _, err := w.ec2.AllocateAddress(ctx, &ec2.AllocateAddressInput{Domain: types.DomainTypeVpc,
				TagSpecifications: tagSpec(types.ResourceTypeElasticIp, []types.Tag{
					{Key: aws.String(TagInstance), Value: aws.String("in-analytics")}, {Key: aws.String(TagRole), Value: aws.String(roleEIP)}}),
			}); err != nil {
				t.Fatal(err)
			}
		}
		st, err := w.backend.Reprovision(ctx, w.request("rq-1", protocol.ProvisionReprovision, w.spec()), protocol.MachineState{})
		if err != nil {
			t.Fatal(err)
		}
		out, err := w.ec2.DescribeAddresses(ctx, &ec2.DescribeAddressesInput{Filters: []types.Filter{tagFilter(TagInstance, "in-analytics")}})
		if err != nil {
			t.Fatal(err)
		}
		if len(out.Addresses) != 1 || aws.ToString(out.Addresses[0].InstanceId) != st.MachineID {
			t.Fatalf("%d elastic IPs left (want 1, on machine %s): %+v", len(out.Addresses), st.MachineID, out.Addresses)
		}
		// Another, associated with the machine: the one on record is kept
		// (it is in DNS), the other released once the kept one is on.
		recorded := st.Details[detailAllocation]
		other, err := w.ec2.AllocateAddress(ctx, &ec2.AllocateAddressInput{Domain: types.DomainTypeVpc,
			TagSpecifications: tagSpec(types.ResourceTypeElasticIp, []types.Tag{
				{Key: aws.String(TagInstance), Value: aws.String("in-analytics")}, {Key: aws.String(TagRole), Value: aws.String(roleEIP)}}),
		})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.ec2.AssociateAddress(ctx, &ec2.AssociateAddressInput{AllocationId: other.AllocationId, InstanceId: aws.String(st.MachineID),
			AllowReassociation: aws.Bool(true)}); err != nil {
			t.Fatal(err)
		}
		st.RequestID = "rq-1"
		st, err = w.backend.Reprovision(ctx, w.request("rq-2", protocol.ProvisionReprovision, w.spec()), st)
		if err != nil {
			t.Fatal(err)
		}
		out, err = w.ec2.DescribeAddresses(ctx, &ec2.DescribeAddressesInput{Filters: []types.Filter{tagFilter(TagInstance, "in-analytics")}})
		if err != nil {
			t.Fatal(err)
		}
		if len(out.Addresses) != 1 || aws.ToString(out.Addresses[0].AllocationId) != recorded || st.Details[detailAllocation] != recorded {
			t.Fatalf("%d elastic IPs left (want %s only): %+v", len(out.Addresses), recorded, out.Addresses)
		}
	})
}

// TestTheAddressKeptIsTheOneOnRecord: of two elastic IPs allocated for one
// instance, the one kept is the one the machine record names (its public
// IP, in DNS and in its users' allow-lists), else an associated one, else
// the first by allocation id.
func TestTheAddressKeptIsTheOneOnRecord(t *testing.T) {
	addr := func(id string, associated bool) types.Address {
		a := types.Address{AllocationId: aws.String(id)}
		if associated {
			a.AssociationId = aws.String("assoc-" + id)
		}
		return a
	}
	for _, tc := range []struct {
		name     string
		addrs    []types.Address
		recorded string
		want     string
	}{
		{"the one on record", []types.Address{addr("eipalloc-1", true), addr("eipalloc-2", false)}, "eipalloc-2", "eipalloc-2"},
		{"an associated one", []types.Address{addr("eipalloc-1", false), addr("eipalloc-2", true)}, "", "eipalloc-2"},
		{"the first by id", []types.Address{addr("eipalloc-2", false), addr("eipalloc-1", false)}, "eipalloc-9", "eipalloc-1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := aws.ToString(keptAddress(tc.addrs, tc.recorded).AllocationId); got != tc.want {
				t.Fatalf("kept %s, want %s", got, tc.want)
			}
		})
	}
}
