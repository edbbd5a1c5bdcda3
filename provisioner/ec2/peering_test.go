package ec2

import (
	"context"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/fleetmanager/fm/protocol"
)

// fmVPC makes a VPC with a subnet and a route table of its own, standing
// for Fleet Manager's, and returns their ids.
func (w *world) fmVPC(t *testing.T, cidr string) (vpc, subnet, table string) {
	t.Helper()
	ctx := context.Background()
	v, err := w.ec2.CreateVpc(ctx, &ec2.CreateVpcInput{CidrBlock: aws.String(cidr)})
	if err != nil {
		t.Fatal(err)
	}
	vpc = aws.ToString(v.Vpc.VpcId)
	s, err := w.ec2.CreateSubnet(ctx, &ec2.CreateSubnetInput{VpcId: aws.String(vpc), CidrBlock: aws.String(cidr)})
	if err != nil {
		t.Fatal(err)
	}
	subnet = aws.ToString(s.Subnet.SubnetId)
	rt, err := w.ec2.CreateRouteTable(ctx, &ec2.CreateRouteTableInput{VpcId: aws.String(vpc)})
	if err != nil {
		t.Fatal(err)
	}
	table = aws.ToString(rt.RouteTable.RouteTableId)
	if _, err := w.ec2.AssociateRouteTable(ctx, &ec2.AssociateRouteTableInput{RouteTableId: aws.String(table), SubnetId: aws.String(subnet)}); err != nil {
		t.Fatal(err)
	}
	return vpc, subnet, table
}

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
	fmVpc, fmSubnet, fmTable := w.fmVPC(t, "10.42.0.0/16")
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

	// A network whose VPC overlaps FM's.
	w.progress = nil
	overlapping, overlappingSubnet, _ := w.fmVPC(t, netCIDR)
	spec.Network.Peering = &protocol.PeeringSpec{VpcID: overlapping, SubnetID: overlappingSubnet}
	_, err = w.backend.Reprovision(ctx, w.request("rq-3", protocol.ProvisionReprovision, spec), st)
	if protocol.CodeOf(err) != protocol.CodeInvalidArgument || !strings.Contains(err.Error(), "overlap") {
		t.Fatalf("err = %v", err)
	}
	if n := len(peerings()); n != 1 {
		t.Fatalf("%d peerings after a refusal", n)
	}
}
