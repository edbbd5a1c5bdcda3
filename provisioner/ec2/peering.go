package ec2

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
)

// rolePeering tags the VPC peerings FM makes.
const rolePeering = "peering"

// ensurePeering peers the network's VPC with FM's own (autoCreatePeerings),
// as the network's identity (the requester) and FM's (the accepter, in
// FM's region), and adds the routes both ways: in the route table of the
// network's subnet, to FM's VPC; in the route table of FM's subnet, to the
// network's VPC. Every step finds what an earlier try made (the peering by
// its pair of VPCs, a route by its destination), so a provisioner killed
// anywhere in here makes one peering; two provisions of the network at once
// take turns (one lock per pair of VPCs; the lease makes one provisioner
// act). A route to the same destination through something else is refused
// (FailedPrecondition, naming it), but a dead one (a blackhole: its peering
// was deleted) is replaced. region is the region c acts in.
func (b *Backend) ensurePeering(ctx context.Context, c clients, region string, req provisioner.Request, pl plan) error {
	spec := req.Spec
	peer := spec.Network.Peering
	if peer == nil {
		return nil
	}
	lock, _ := b.peering.LoadOrStore(spec.Network.VpcID+"|"+peer.VpcID, &sync.Mutex{})
	lock.(*sync.Mutex).Lock()
	defer lock.(*sync.Mutex).Unlock()
	fmRegion := firstSet(peer.Region, b.cfg.Region)
	fm, _, err := b.connectTo(ctx, fmRegion, nil)
	if err != nil {
		return err
	}
	vpcs, err := fm.ec2.DescribeVpcs(ctx, &ec2.DescribeVpcsInput{VpcIds: []string{peer.VpcID}})
	if err != nil || len(vpcs.Vpcs) != 1 {
		if err == nil || isNotFound(err) || apiCode(err) == "InvalidVpcID.NotFound" {
			return protocol.Errorf(protocol.CodeInvalidArgument, "Fleet Manager's own VPC %s (fm server --default-vpc) does not exist in %s", peer.VpcID, fmRegion)
		}
		return cloudError("look up Fleet Manager's VPC "+peer.VpcID, err)
	}
	fmCIDRs := vpcCIDRs(vpcs.Vpcs[0])
	for _, a := range fmCIDRs {
		for _, n := range pl.vpcCIDRs {
			if overlap(a, n) {
				return protocol.Errorf(protocol.CodeInvalidArgument, "the network's VPC %s (%s) and Fleet Manager's VPC %s (%s) overlap: VPCs whose addresses overlap cannot be peered",
					spec.Network.VpcID, n, peer.VpcID, a)
			}
		}
	}
	pcx, err := b.findPeering(ctx, c, spec.Network.VpcID, peer.VpcID)
	if err != nil {
		return err
	}
	if pcx == nil {
		in := &ec2.CreateVpcPeeringConnectionInput{VpcId: aws.String(spec.Network.VpcID), PeerVpcId: aws.String(peer.VpcID),
			PeerOwnerId: vpcs.Vpcs[0].OwnerId,
			TagSpecifications: tagSpec(types.ResourceTypeVpcPeeringConnection,
				tagList(spec.Tags, "fm-"+spec.Network.ID+"-peering", map[string]string{TagRole: rolePeering, TagNetwork: spec.Network.ID}))}
		if fmRegion != region {
			in.PeerRegion = aws.String(fmRegion)
		}
		out, err := c.ec2.CreateVpcPeeringConnection(ctx, in)
		if err != nil {
			return cloudError("peer VPC "+spec.Network.VpcID+" with "+peer.VpcID, err)
		}
		pcx = out.VpcPeeringConnection
		req.Progress("peering", fmt.Sprintf("VPC peering %s requested between %s and Fleet Manager's %s", aws.ToString(pcx.VpcPeeringConnectionId), spec.Network.VpcID, peer.VpcID))
	}
	id := aws.ToString(pcx.VpcPeeringConnectionId)
	err = b.waitFor(ctx, req, "peering", "VPC peering "+id, func() (bool, string, error) {
		out, err := fm.ec2.DescribeVpcPeeringConnections(ctx, &ec2.DescribeVpcPeeringConnectionsInput{VpcPeeringConnectionIds: []string{id}})
		if err != nil && !isNotFound(err) {
			return false, "", cloudError("look at VPC peering "+id, err)
		}
		if err != nil || len(out.VpcPeeringConnections) == 0 || out.VpcPeeringConnections[0].Status == nil {
			return false, "unknown", nil // just made: EC2 is eventually consistent
		}
		switch code := out.VpcPeeringConnections[0].Status.Code; code {
		case types.VpcPeeringConnectionStateReasonCodeActive:
			return true, string(code), nil
		case types.VpcPeeringConnectionStateReasonCodePendingAcceptance:
			// Refused if accepted meanwhile (by an earlier try): looked at
			// again at the next poll.
			if _, err := fm.ec2.AcceptVpcPeeringConnection(ctx, &ec2.AcceptVpcPeeringConnectionInput{VpcPeeringConnectionId: aws.String(id)}); err != nil &&
				apiCode(err) != "InvalidStateTransition" {
				return false, "", cloudError("accept VPC peering "+id+" as Fleet Manager", err)
			}
			return false, string(code), nil
		case types.VpcPeeringConnectionStateReasonCodeInitiatingRequest, types.VpcPeeringConnectionStateReasonCodeProvisioning:
			return false, string(code), nil
		default:
			return false, "", protocol.Errorf(protocol.CodeFailedPrecondition, "VPC peering %s between %s and %s is %s (%s): delete it and provision again",
				id, spec.Network.VpcID, peer.VpcID, code, aws.ToString(out.VpcPeeringConnections[0].Status.Message))
		}
	})
	if err != nil {
		return err
	}
	if err := b.routeThrough(ctx, c, req, spec.Network.VpcID, spec.Network.SubnetID, fmCIDRs, id); err != nil {
		return err
	}
	return b.routeThrough(ctx, fm, req, peer.VpcID, peer.SubnetID, pl.vpcCIDRs, id)
}

// findPeering is the peering between the two VPCs that is or may become
// active, nil if none.
func (b *Backend) findPeering(ctx context.Context, c clients, requester, accepter string) (*types.VpcPeeringConnection, error) {
	out, err := c.ec2.DescribeVpcPeeringConnections(ctx, &ec2.DescribeVpcPeeringConnectionsInput{Filters: []types.Filter{
		{Name: aws.String("requester-vpc-info.vpc-id"), Values: []string{requester}},
		{Name: aws.String("accepter-vpc-info.vpc-id"), Values: []string{accepter}}}})
	if err != nil {
		return nil, cloudError("look up the VPC peerings of "+requester, err)
	}
	live := []types.VpcPeeringConnectionStateReasonCode{types.VpcPeeringConnectionStateReasonCodeActive,
		types.VpcPeeringConnectionStateReasonCodePendingAcceptance, types.VpcPeeringConnectionStateReasonCodeInitiatingRequest,
		types.VpcPeeringConnectionStateReasonCodeProvisioning}
	for _, p := range out.VpcPeeringConnections {
		// Filtered again here: not every EC2 (moto) applies the filters.
		if p.RequesterVpcInfo == nil || p.AccepterVpcInfo == nil || aws.ToString(p.RequesterVpcInfo.VpcId) != requester ||
			aws.ToString(p.AccepterVpcInfo.VpcId) != accepter || p.Status == nil || !slices.Contains(live, p.Status.Code) {
			continue
		}
		return &p, nil
	}
	return nil, nil
}

// routeThrough routes each of cidrs through peering pcx in the route table
// of subnet (the VPC's main table if the subnet has none of its own).
func (b *Backend) routeThrough(ctx context.Context, c clients, req provisioner.Request, vpc, subnet string, cidrs []string, pcx string) error {
	table, err := routeTableOf(ctx, c, vpc, subnet)
	if err != nil {
		return err
	}
	have := map[string]types.Route{}
	for _, r := range table.Routes {
		have[aws.ToString(r.DestinationCidrBlock)] = r
	}
	tableID := aws.ToString(table.RouteTableId)
	for _, cidr := range cidrs {
		r, ok := have[cidr]
		switch {
		case ok && aws.ToString(r.VpcPeeringConnectionId) == pcx:
			continue
		case ok && (r.State == types.RouteStateBlackhole || deadPeering(ctx, c, aws.ToString(r.VpcPeeringConnectionId))):
			// Its target is gone (a peering deleted): this one replaces it.
			if _, err := c.ec2.ReplaceRoute(ctx, &ec2.ReplaceRouteInput{RouteTableId: aws.String(tableID), DestinationCidrBlock: aws.String(cidr),
				VpcPeeringConnectionId: aws.String(pcx)}); err != nil {
				return cloudError("route "+cidr+" through "+pcx+" in "+tableID, err)
			}
		case ok:
			return protocol.Errorf(protocol.CodeFailedPrecondition, "route table %s of %s already routes %s through %s: another network whose "+
				"addresses overlap is peered with it, or a route of your own reaches it (then turn autoCreatePeerings off)",
				tableID, vpc, cidr, routeTarget(r))
		default:
			_, err := c.ec2.CreateRoute(ctx, &ec2.CreateRouteInput{RouteTableId: aws.String(tableID), DestinationCidrBlock: aws.String(cidr),
				VpcPeeringConnectionId: aws.String(pcx)})
			if err != nil && apiCode(err) != "RouteAlreadyExists" {
				return cloudError("route "+cidr+" through "+pcx+" in "+tableID, err)
			}
		}
		req.Progress("peering", fmt.Sprintf("route table %s: %s through %s", tableID, cidr, pcx))
	}
	return nil
}

// deadPeering reports whether id names a peering that is gone or will not
// be (deleted, rejected, failed, expired), whose routes are dead.
func deadPeering(ctx context.Context, c clients, id string) bool {
	if id == "" {
		return false
	}
	out, err := c.ec2.DescribeVpcPeeringConnections(ctx, &ec2.DescribeVpcPeeringConnectionsInput{VpcPeeringConnectionIds: []string{id}})
	if err != nil {
		return isNotFound(err) || apiCode(err) == "InvalidVpcPeeringConnectionID.NotFound"
	}
	for _, p := range out.VpcPeeringConnections {
		if aws.ToString(p.VpcPeeringConnectionId) == id && p.Status != nil {
			switch p.Status.Code {
			case types.VpcPeeringConnectionStateReasonCodeDeleted, types.VpcPeeringConnectionStateReasonCodeDeleting,
				types.VpcPeeringConnectionStateReasonCodeRejected, types.VpcPeeringConnectionStateReasonCodeFailed,
				types.VpcPeeringConnectionStateReasonCodeExpired:
				return true
			}
			return false
		}
	}
	return len(out.VpcPeeringConnections) == 0
}

// routeTarget names where a route goes.
func routeTarget(r types.Route) string {
	return firstSet(aws.ToString(r.VpcPeeringConnectionId), aws.ToString(r.GatewayId), aws.ToString(r.NatGatewayId),
		aws.ToString(r.TransitGatewayId), aws.ToString(r.NetworkInterfaceId), aws.ToString(r.InstanceId), "another target")
}

// routeTableOf is the route table subnet uses: its own, or its VPC's main
// table.
func routeTableOf(ctx context.Context, c clients, vpc, subnet string) (types.RouteTable, error) {
	for _, f := range [][]types.Filter{
		{{Name: aws.String("association.subnet-id"), Values: []string{subnet}}},
		{{Name: aws.String("vpc-id"), Values: []string{vpc}}, {Name: aws.String("association.main"), Values: []string{"true"}}},
	} {
		if subnet == "" && aws.ToString(f[0].Name) == "association.subnet-id" {
			continue
		}
		out, err := c.ec2.DescribeRouteTables(ctx, &ec2.DescribeRouteTablesInput{Filters: f})
		if err != nil {
			return types.RouteTable{}, cloudError("look up the route table of "+firstSet(subnet, vpc), err)
		}
		if len(out.RouteTables) > 0 {
			return out.RouteTables[0], nil
		}
	}
	return types.RouteTable{}, protocol.Errorf(protocol.CodeInvalidArgument, "VPC %s has no route table for subnet %s", vpc, subnet)
}

// vpcCIDRs are a VPC's associated IPv4 blocks.
func vpcCIDRs(v types.Vpc) []string {
	var out []string
	for _, a := range v.CidrBlockAssociationSet {
		if a.CidrBlockState == nil || a.CidrBlockState.State == types.VpcCidrBlockStateCodeAssociated {
			out = append(out, aws.ToString(a.CidrBlock))
		}
	}
	if len(out) == 0 && v.CidrBlock != nil {
		out = []string{aws.ToString(v.CidrBlock)}
	}
	return out
}

// overlap reports whether two CIDR blocks share addresses.
func overlap(a, b string) bool {
	pa, err1 := netip.ParsePrefix(a)
	pb, err2 := netip.ParsePrefix(b)
	return err1 == nil && err2 == nil && pa.Overlaps(pb)
}
