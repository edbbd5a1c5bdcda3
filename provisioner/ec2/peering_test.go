package ec2

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner/ec2/mototest"
)

// routes are a route table's routes through peerings: destination -> peering.
func (w *world) routes(t *testing.T, filters ...types.Filter) map[string]string {
	t.Helper()
	out, err := w.ec2.DescribeRouteTables(context.Background(), &ec2.DescribeRouteTablesInput{Filters: filters})
	if err != nil || len(out.RouteTables) == 0 {
		t.Fatalf("route tables: %v", err)
	}
	m := map[string]string{}
	for _, r := range out.RouteTables[0].Routes {
		if r.VpcPeeringConnectionId != nil {
			m[aws.ToString(r.DestinationCidrBlock)] = aws.ToString(r.VpcPeeringConnectionId)
		}
	}
	return m
}

// TestANetworkPeeredWithFMsVPC: autoCreatePeerings peers the network's VPC
// with FM's (requested and accepted), tagged, with a route each way; a
// second provision (or one after a crash anywhere in it) finds the peering
// and the routes and makes no second; a VPC overlapping FM's is refused
// before anything is made.
func TestANetworkPeeredWithFMsVPC(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	fmVpc, fmSubnet, fmTable := mototest.MakeVPC(t, w.ec2, "10.42.0.0/16")
	spec := w.spec()
	spec.Network.Peering = &protocol.PeeringSpec{VpcID: fmVpc, SubnetID: fmSubnet, Region: spec.Network.Region}
	vpcs, err := w.ec2.DescribeVpcs(ctx, &ec2.DescribeVpcsInput{VpcIds: []string{w.vpc}})
	if err != nil {
		t.Fatal(err)
	}
	netCIDR := aws.ToString(vpcs.Vpcs[0].CidrBlock)
	peerings := func() []types.VpcPeeringConnection {
		t.Helper()
		out, err := w.ec2.DescribeVpcPeeringConnections(ctx, &ec2.DescribeVpcPeeringConnectionsInput{})
		if err != nil {
			t.Fatal(err)
		}
		return out.VpcPeeringConnections
	}
	st := protocol.MachineState{}
	for i, id := range []string{"rq-1", "rq-2"} {
		if st, err = w.backend.Reprovision(ctx, w.request(id, protocol.ProvisionReprovision, spec), st); err != nil {
			t.Fatalf("reprovision %d: %v\n%s", i+1, err, strings.Join(w.progress, "\n"))
		}
		ps := peerings()
		if len(ps) != 1 {
			t.Fatalf("after provision %d: %d peerings", i+1, len(ps))
		}
		p := ps[0]
		pcx := aws.ToString(p.VpcPeeringConnectionId)
		tags := map[string]string{}
		for _, tag := range p.Tags {
			tags[aws.ToString(tag.Key)] = aws.ToString(tag.Value)
		}
		if p.Status.Code != types.VpcPeeringConnectionStateReasonCodeActive || aws.ToString(p.RequesterVpcInfo.VpcId) != w.vpc ||
			aws.ToString(p.AccepterVpcInfo.VpcId) != fmVpc || tags[TagRole] != rolePeering || tags[TagNetwork] != "vn-lab" {
			t.Fatalf("peering %s: %s, %s -> %s, tags %v", pcx, p.Status.Code, aws.ToString(p.RequesterVpcInfo.VpcId), aws.ToString(p.AccepterVpcInfo.VpcId), tags)
		}
		toFM := w.routes(t, types.Filter{Name: aws.String("vpc-id"), Values: []string{w.vpc}}, types.Filter{Name: aws.String("association.main"), Values: []string{"true"}})
		back := w.routes(t, types.Filter{Name: aws.String("route-table-id"), Values: []string{fmTable}})
		if toFM["10.42.0.0/16"] != pcx || back[netCIDR] != pcx || len(toFM) != 1 || len(back) != 1 {
			t.Fatalf("routes: network %v, FM %v (peering %s)", toFM, back, pcx)
		}
	}

	// Two networks' machines on the same pair of VPCs provisioned at once:
	// one peering still.
	// Each look-up for the peering waits (2 s at most) for the other's, so
	// that both would find none if nothing kept them apart.
	if _, err := w.ec2.DeleteVpcPeeringConnection(ctx, &ec2.DeleteVpcPeeringConnectionInput{VpcPeeringConnectionId: peerings()[0].VpcPeeringConnectionId}); err != nil {
		t.Fatal(err)
	}
	meet := &meeting{ec2API: w.ec2, arrived: make(chan struct{}, 2)}
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = w.backend.ensurePeering(ctx, clients{ec2: meet, dns: w.dns}, mototest.Region, w.request("rq-c", protocol.ProvisionReprovision, spec),
				plan{vpcCIDRs: []string{netCIDR}})
		}()
	}
	wg.Wait()
	var live []types.VpcPeeringConnection
	for _, p := range peerings() {
		if p.Status.Code == types.VpcPeeringConnectionStateReasonCodeActive {
			live = append(live, p)
		}
	}
	if errs[0] != nil || errs[1] != nil || len(live) != 1 {
		t.Fatalf("two at once: %v, %v, %d peerings", errs[0], errs[1], len(live))
	}

	// FM's route table routes a network's addresses elsewhere (another
	// network peered with FM has the same addresses): refused, saying so.
	other, _, _ := mototest.MakeVPC(t, w.ec2, "10.43.0.0/16")
	otherPeering, err := w.ec2.CreateVpcPeeringConnection(ctx, &ec2.CreateVpcPeeringConnectionInput{VpcId: aws.String(other), PeerVpcId: aws.String(fmVpc)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.ec2.ReplaceRoute(ctx, &ec2.ReplaceRouteInput{RouteTableId: aws.String(fmTable), DestinationCidrBlock: aws.String(netCIDR),
		VpcPeeringConnectionId: otherPeering.VpcPeeringConnection.VpcPeeringConnectionId}); err != nil {
		t.Fatal(err)
	}
	_, err = w.backend.Reprovision(ctx, w.request("rq-4", protocol.ProvisionReprovision, spec), st)
	if protocol.CodeOf(err) != protocol.CodeFailedPrecondition || !strings.Contains(err.Error(), "already routes "+netCIDR) {
		t.Fatalf("a route elsewhere: %v", err)
	}

	// A network whose VPC overlaps FM's.
	w.progress = nil
	overlapping, overlappingSubnet, _ := mototest.MakeVPC(t, w.ec2, netCIDR)
	spec.Network.Peering = &protocol.PeeringSpec{VpcID: overlapping, SubnetID: overlappingSubnet}
	_, err = w.backend.Reprovision(ctx, w.request("rq-3", protocol.ProvisionReprovision, spec), st)
	if protocol.CodeOf(err) != protocol.CodeInvalidArgument || !strings.Contains(err.Error(), "overlap") {
		t.Fatalf("err = %v", err)
	}
	if n := len(peerings()); n != 3 { // the one deleted, FM's, and the test's own of the other VPC
		t.Fatalf("%d peerings after a refusal", n)
	}
}

// meeting makes each look-up of peerings wait, 2 s at most, for another.
type meeting struct {
	ec2API
	arrived chan struct{}
	mu      sync.Mutex
	seen    int
}

func (m *meeting) DescribeVpcPeeringConnections(ctx context.Context, in *ec2.DescribeVpcPeeringConnectionsInput, o ...func(*ec2.Options)) (*ec2.DescribeVpcPeeringConnectionsOutput, error) {
	if len(in.VpcPeeringConnectionIds) == 0 { // a look-up by VPCs, not the wait for one
		m.mu.Lock()
		m.seen++
		first := m.seen <= 2
		m.mu.Unlock()
		if first {
			m.arrived <- struct{}{}
			deadline := time.After(2 * time.Second)
			for len(m.arrived) < 2 {
				select {
				case <-deadline:
					return m.ec2API.DescribeVpcPeeringConnections(ctx, in, o...)
				case <-time.After(10 * time.Millisecond):
				}
			}
		}
	}
	return m.ec2API.DescribeVpcPeeringConnections(ctx, in, o...)
}
