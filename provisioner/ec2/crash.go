package ec2

import (
	"context"

	"github.com/aws/aws-sdk-go-v2/service/ec2"
	elb "github.com/aws/aws-sdk-go-v2/service/elasticloadbalancingv2"
	"github.com/aws/aws-sdk-go-v2/service/route53"
	"github.com/fleetmanager/fm/internal/crashpoint"
)

// crashEC2 passes a crash point before and after every EC2 call that
// changes something, so that the crash-point harness can kill the
// provisioner around each of the backend's side effects without a point
// written by hand at every call site (a new call gets its points by being
// a call). Reads pass through.
type crashEC2 struct {
	ec2API
	crash crashpoint.Hook
}

func around[In, Out any](h crashpoint.Hook, name string, call func(context.Context, In, ...func(*ec2.Options)) (Out, error),
	ctx context.Context, in In, opts ...func(*ec2.Options)) (Out, error) {
	return aroundCall(h, "ec2/"+name, call, ctx, in, opts...)
}

// aroundCall passes the crash points of one call (service/operation).
func aroundCall[In, Out, Opt any](h crashpoint.Hook, point string, call func(context.Context, In, ...Opt) (Out, error),
	ctx context.Context, in In, opts ...Opt) (Out, error) {
	h.At(point + ":before")
	out, err := call(ctx, in, opts...)
	if err == nil {
		h.At(point + ":after")
	}
	return out, err
}

func (c crashEC2) CreateSecurityGroup(ctx context.Context, in *ec2.CreateSecurityGroupInput, o ...func(*ec2.Options)) (*ec2.CreateSecurityGroupOutput, error) {
	return around(c.crash, "CreateSecurityGroup", c.ec2API.CreateSecurityGroup, ctx, in, o...)
}
func (c crashEC2) AuthorizeSecurityGroupIngress(ctx context.Context, in *ec2.AuthorizeSecurityGroupIngressInput, o ...func(*ec2.Options)) (*ec2.AuthorizeSecurityGroupIngressOutput, error) {
	return around(c.crash, "AuthorizeSecurityGroupIngress", c.ec2API.AuthorizeSecurityGroupIngress, ctx, in, o...)
}
func (c crashEC2) AcceptVpcPeeringConnection(ctx context.Context, in *ec2.AcceptVpcPeeringConnectionInput, o ...func(*ec2.Options)) (*ec2.AcceptVpcPeeringConnectionOutput, error) {
	return around(c.crash, "AcceptVpcPeeringConnection", c.ec2API.AcceptVpcPeeringConnection, ctx, in, o...)
}
func (c crashEC2) AssociateIamInstanceProfile(ctx context.Context, in *ec2.AssociateIamInstanceProfileInput, o ...func(*ec2.Options)) (*ec2.AssociateIamInstanceProfileOutput, error) {
	return around(c.crash, "AssociateIamInstanceProfile", c.ec2API.AssociateIamInstanceProfile, ctx, in, o...)
}
func (c crashEC2) AuthorizeSecurityGroupEgress(ctx context.Context, in *ec2.AuthorizeSecurityGroupEgressInput, o ...func(*ec2.Options)) (*ec2.AuthorizeSecurityGroupEgressOutput, error) {
	return around(c.crash, "AuthorizeSecurityGroupEgress", c.ec2API.AuthorizeSecurityGroupEgress, ctx, in, o...)
}
func (c crashEC2) CreateRoute(ctx context.Context, in *ec2.CreateRouteInput, o ...func(*ec2.Options)) (*ec2.CreateRouteOutput, error) {
	return around(c.crash, "CreateRoute", c.ec2API.CreateRoute, ctx, in, o...)
}
func (c crashEC2) CreateVpcPeeringConnection(ctx context.Context, in *ec2.CreateVpcPeeringConnectionInput, o ...func(*ec2.Options)) (*ec2.CreateVpcPeeringConnectionOutput, error) {
	return around(c.crash, "CreateVpcPeeringConnection", c.ec2API.CreateVpcPeeringConnection, ctx, in, o...)
}
func (c crashEC2) ReplaceIamInstanceProfileAssociation(ctx context.Context, in *ec2.ReplaceIamInstanceProfileAssociationInput, o ...func(*ec2.Options)) (*ec2.ReplaceIamInstanceProfileAssociationOutput, error) {
	return around(c.crash, "ReplaceIamInstanceProfileAssociation", c.ec2API.ReplaceIamInstanceProfileAssociation, ctx, in, o...)
}
func (c crashEC2) ReplaceRoute(ctx context.Context, in *ec2.ReplaceRouteInput, o ...func(*ec2.Options)) (*ec2.ReplaceRouteOutput, error) {
	return around(c.crash, "ReplaceRoute", c.ec2API.ReplaceRoute, ctx, in, o...)
}
func (c crashEC2) RevokeSecurityGroupEgress(ctx context.Context, in *ec2.RevokeSecurityGroupEgressInput, o ...func(*ec2.Options)) (*ec2.RevokeSecurityGroupEgressOutput, error) {
	return around(c.crash, "RevokeSecurityGroupEgress", c.ec2API.RevokeSecurityGroupEgress, ctx, in, o...)
}
func (c crashEC2) RevokeSecurityGroupIngress(ctx context.Context, in *ec2.RevokeSecurityGroupIngressInput, o ...func(*ec2.Options)) (*ec2.RevokeSecurityGroupIngressOutput, error) {
	return around(c.crash, "RevokeSecurityGroupIngress", c.ec2API.RevokeSecurityGroupIngress, ctx, in, o...)
}
func (c crashEC2) RunInstances(ctx context.Context, in *ec2.RunInstancesInput, o ...func(*ec2.Options)) (*ec2.RunInstancesOutput, error) {
	return around(c.crash, "RunInstances", c.ec2API.RunInstances, ctx, in, o...)
}
func (c crashEC2) StartInstances(ctx context.Context, in *ec2.StartInstancesInput, o ...func(*ec2.Options)) (*ec2.StartInstancesOutput, error) {
	return around(c.crash, "StartInstances", c.ec2API.StartInstances, ctx, in, o...)
}
func (c crashEC2) StopInstances(ctx context.Context, in *ec2.StopInstancesInput, o ...func(*ec2.Options)) (*ec2.StopInstancesOutput, error) {
	return around(c.crash, "StopInstances", c.ec2API.StopInstances, ctx, in, o...)
}
func (c crashEC2) TerminateInstances(ctx context.Context, in *ec2.TerminateInstancesInput, o ...func(*ec2.Options)) (*ec2.TerminateInstancesOutput, error) {
	return around(c.crash, "TerminateInstances", c.ec2API.TerminateInstances, ctx, in, o...)
}
func (c crashEC2) CreateVolume(ctx context.Context, in *ec2.CreateVolumeInput, o ...func(*ec2.Options)) (*ec2.CreateVolumeOutput, error) {
	return around(c.crash, "CreateVolume", c.ec2API.CreateVolume, ctx, in, o...)
}
func (c crashEC2) AttachVolume(ctx context.Context, in *ec2.AttachVolumeInput, o ...func(*ec2.Options)) (*ec2.AttachVolumeOutput, error) {
	return around(c.crash, "AttachVolume", c.ec2API.AttachVolume, ctx, in, o...)
}
func (c crashEC2) DeleteVolume(ctx context.Context, in *ec2.DeleteVolumeInput, o ...func(*ec2.Options)) (*ec2.DeleteVolumeOutput, error) {
	return around(c.crash, "DeleteVolume", c.ec2API.DeleteVolume, ctx, in, o...)
}
func (c crashEC2) ModifyVolume(ctx context.Context, in *ec2.ModifyVolumeInput, o ...func(*ec2.Options)) (*ec2.ModifyVolumeOutput, error) {
	return around(c.crash, "ModifyVolume", c.ec2API.ModifyVolume, ctx, in, o...)
}
func (c crashEC2) CreateTags(ctx context.Context, in *ec2.CreateTagsInput, o ...func(*ec2.Options)) (*ec2.CreateTagsOutput, error) {
	return around(c.crash, "CreateTags", c.ec2API.CreateTags, ctx, in, o...)
}
func (c crashEC2) CreateSnapshot(ctx context.Context, in *ec2.CreateSnapshotInput, o ...func(*ec2.Options)) (*ec2.CreateSnapshotOutput, error) {
	return around(c.crash, "CreateSnapshot", c.ec2API.CreateSnapshot, ctx, in, o...)
}
func (c crashEC2) DeleteSnapshot(ctx context.Context, in *ec2.DeleteSnapshotInput, o ...func(*ec2.Options)) (*ec2.DeleteSnapshotOutput, error) {
	return around(c.crash, "DeleteSnapshot", c.ec2API.DeleteSnapshot, ctx, in, o...)
}
func (c crashEC2) AllocateAddress(ctx context.Context, in *ec2.AllocateAddressInput, o ...func(*ec2.Options)) (*ec2.AllocateAddressOutput, error) {
	return around(c.crash, "AllocateAddress", c.ec2API.AllocateAddress, ctx, in, o...)
}
func (c crashEC2) AssociateAddress(ctx context.Context, in *ec2.AssociateAddressInput, o ...func(*ec2.Options)) (*ec2.AssociateAddressOutput, error) {
	return around(c.crash, "AssociateAddress", c.ec2API.AssociateAddress, ctx, in, o...)
}
func (c crashEC2) ReleaseAddress(ctx context.Context, in *ec2.ReleaseAddressInput, o ...func(*ec2.Options)) (*ec2.ReleaseAddressOutput, error) {
	return around(c.crash, "ReleaseAddress", c.ec2API.ReleaseAddress, ctx, in, o...)
}

// crashDNS does for Route53 what crashEC2 does for EC2.
type crashDNS struct {
	dnsAPI
	crash crashpoint.Hook
}

func (c crashDNS) ChangeResourceRecordSets(ctx context.Context, in *route53.ChangeResourceRecordSetsInput, o ...func(*route53.Options)) (*route53.ChangeResourceRecordSetsOutput, error) {
	c.crash.At("route53/ChangeResourceRecordSets:before")
	out, err := c.dnsAPI.ChangeResourceRecordSets(ctx, in, o...)
	if err == nil {
		c.crash.At("route53/ChangeResourceRecordSets:after")
	}
	return out, err
}

// crashELB does for Elastic Load Balancing what crashEC2 does for EC2.
type crashELB struct {
	elbAPI
	crash crashpoint.Hook
}

func (c crashELB) CreateLoadBalancer(ctx context.Context, in *elb.CreateLoadBalancerInput, o ...func(*elb.Options)) (*elb.CreateLoadBalancerOutput, error) {
	return aroundCall(c.crash, "elb/CreateLoadBalancer", c.elbAPI.CreateLoadBalancer, ctx, in, o...)
}
func (c crashELB) DeleteLoadBalancer(ctx context.Context, in *elb.DeleteLoadBalancerInput, o ...func(*elb.Options)) (*elb.DeleteLoadBalancerOutput, error) {
	return aroundCall(c.crash, "elb/DeleteLoadBalancer", c.elbAPI.DeleteLoadBalancer, ctx, in, o...)
}
func (c crashELB) CreateTargetGroup(ctx context.Context, in *elb.CreateTargetGroupInput, o ...func(*elb.Options)) (*elb.CreateTargetGroupOutput, error) {
	return aroundCall(c.crash, "elb/CreateTargetGroup", c.elbAPI.CreateTargetGroup, ctx, in, o...)
}
func (c crashELB) DeleteTargetGroup(ctx context.Context, in *elb.DeleteTargetGroupInput, o ...func(*elb.Options)) (*elb.DeleteTargetGroupOutput, error) {
	return aroundCall(c.crash, "elb/DeleteTargetGroup", c.elbAPI.DeleteTargetGroup, ctx, in, o...)
}
func (c crashELB) RegisterTargets(ctx context.Context, in *elb.RegisterTargetsInput, o ...func(*elb.Options)) (*elb.RegisterTargetsOutput, error) {
	return aroundCall(c.crash, "elb/RegisterTargets", c.elbAPI.RegisterTargets, ctx, in, o...)
}
func (c crashELB) DeregisterTargets(ctx context.Context, in *elb.DeregisterTargetsInput, o ...func(*elb.Options)) (*elb.DeregisterTargetsOutput, error) {
	return aroundCall(c.crash, "elb/DeregisterTargets", c.elbAPI.DeregisterTargets, ctx, in, o...)
}
func (c crashELB) CreateListener(ctx context.Context, in *elb.CreateListenerInput, o ...func(*elb.Options)) (*elb.CreateListenerOutput, error) {
	return aroundCall(c.crash, "elb/CreateListener", c.elbAPI.CreateListener, ctx, in, o...)
}
func (c crashELB) ModifyListener(ctx context.Context, in *elb.ModifyListenerInput, o ...func(*elb.Options)) (*elb.ModifyListenerOutput, error) {
	return aroundCall(c.crash, "elb/ModifyListener", c.elbAPI.ModifyListener, ctx, in, o...)
}
func (c crashELB) DeleteListener(ctx context.Context, in *elb.DeleteListenerInput, o ...func(*elb.Options)) (*elb.DeleteListenerOutput, error) {
	return aroundCall(c.crash, "elb/DeleteListener", c.elbAPI.DeleteListener, ctx, in, o...)
}
func (c crashELB) CreateRule(ctx context.Context, in *elb.CreateRuleInput, o ...func(*elb.Options)) (*elb.CreateRuleOutput, error) {
	return aroundCall(c.crash, "elb/CreateRule", c.elbAPI.CreateRule, ctx, in, o...)
}
func (c crashELB) ModifyRule(ctx context.Context, in *elb.ModifyRuleInput, o ...func(*elb.Options)) (*elb.ModifyRuleOutput, error) {
	return aroundCall(c.crash, "elb/ModifyRule", c.elbAPI.ModifyRule, ctx, in, o...)
}
func (c crashELB) DeleteRule(ctx context.Context, in *elb.DeleteRuleInput, o ...func(*elb.Options)) (*elb.DeleteRuleOutput, error) {
	return aroundCall(c.crash, "elb/DeleteRule", c.elbAPI.DeleteRule, ctx, in, o...)
}

// withCrashPoints wraps the clients' calls that change something.
func (c clients) withCrashPoints(h crashpoint.Hook) clients {
	if h == nil {
		return c
	}
	return clients{ec2: crashEC2{c.ec2, h}, dns: crashDNS{c.dns, h}, elb: crashELB{c.elb, h}}
}
