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

// associateAddress gives the machine its elastic IP: the allocation the
// instance names, or one FM allocates for it once (found again by its tags)
// and keeps across reprovisions until the instance is deleted. An address
// FM allocated before is released when the instance now names its own.
func (b *Backend) associateAddress(ctx context.Context, c clients, req provisioner.Request, machineID, given string, cur protocol.MachineState) (alloc string, byFM bool, ip string, err error) {
	var (
		addr  *types.Address
		extra []string // other addresses FM allocated for the instance
	)
	if given != "" {
		out, err := c.ec2.DescribeAddresses(ctx, &ec2.DescribeAddressesInput{AllocationIds: []string{given}})
		if isNotFound(err) || (err == nil && len(out.Addresses) == 0) {
			return "", false, "", protocol.Errorf(protocol.CodeInvalidArgument, "elastic IP allocation %s does not exist", given)
		}
		if err != nil {
			return "", false, "", cloudError("look up elastic IP "+given, err)
		}
		addr = &out.Addresses[0]
	} else {
		out, err := c.ec2.DescribeAddresses(ctx, &ec2.DescribeAddressesInput{Filters: []types.Filter{
			tagFilter(TagInstance, req.Instance), tagFilter(TagRole, roleEIP)}})
		if err != nil {
			return "", false, "", cloudError("look up the instance's elastic IP", err)
		}
		if len(out.Addresses) > 0 {
			addr = keptAddress(out.Addresses, cur.Details[detailAllocation])
			// Allocated twice (an allocation whose answer was lost, and one
			// the retry's look-up could not see yet): the one kept is
			// associated below, the others released once it is.
			for _, a := range out.Addresses {
				if aws.ToString(a.AllocationId) != aws.ToString(addr.AllocationId) {
					extra = append(extra, aws.ToString(a.AllocationId))
				}
			}
		} else {
			// AllocateAddress takes no client token: made once (see once),
			// a failure goes back to the provisioner, whose next try looks
			// for the address first.
			a, err := c.ec2.AllocateAddress(ctx, &ec2.AllocateAddressInput{Domain: types.DomainTypeVpc,
				TagSpecifications: tagSpec(types.ResourceTypeElasticIp, tagsFor(req.Spec, req.Spec.Label,
					map[string]string{TagInstance: req.Instance, TagRole: roleEIP}))}, once)
			if err != nil {
				return "", false, "", cloudError("allocate an elastic IP", err)
			}
			addr = &types.Address{AllocationId: a.AllocationId, PublicIp: a.PublicIp}
			req.Progress("elastic-ip", "elastic IP allocated: "+aws.ToString(a.PublicIp))
		}
		byFM = true
	}
	alloc = aws.ToString(addr.AllocationId)
	if _, err := c.ec2.AssociateAddress(ctx, &ec2.AssociateAddressInput{AllocationId: addr.AllocationId,
		InstanceId: aws.String(machineID), AllowReassociation: aws.Bool(true)}); err != nil {
		return "", false, "", cloudError("associate elastic IP "+alloc, err)
	}
	req.Progress("elastic-ip", fmt.Sprintf("elastic IP %s associated", aws.ToString(addr.PublicIp)))
	for _, id := range extra {
		// The machine has the one kept: the others are associated with
		// nothing now. One that cannot be released yet is tried again by
		// the next reprovision, and released with the instance in any case.
		if err := b.releaseAddress(ctx, c, req, id); err != nil {
			req.Progress("elastic-ip", fmt.Sprintf("the second elastic IP %s could not be released yet: %v", id, err))
		}
	}
	if old := cur.Details[detailAllocation]; !byFM && cur.Details[detailAllocatedByFM] == "true" && old != alloc {
		if err := b.releaseAddress(ctx, c, req, old); err != nil {
			return "", false, "", err
		}
	}
	return alloc, byFM, aws.ToString(addr.PublicIp), nil
}

// keptAddress is, of the elastic IPs FM allocated for an instance, the
// one it keeps: the one on record (the instance's public IP, in DNS and
// in its users' allow-lists), else one associated with a machine, else the
// first by allocation id, so that every try keeps the same.
func keptAddress(addrs []types.Address, recorded string) *types.Address {
	var kept *types.Address
	for i, a := range addrs {
		if recorded != "" && aws.ToString(a.AllocationId) == recorded {
			return &addrs[i]
		}
	}
	for i, a := range addrs {
		switch {
		case kept == nil,
			a.AssociationId != nil && kept.AssociationId == nil,
			(a.AssociationId != nil) == (kept.AssociationId != nil) && aws.ToString(a.AllocationId) < aws.ToString(kept.AllocationId):
			kept = &addrs[i]
		}
	}
	return kept
}

// releaseAddress gives back an elastic IP FM allocated.
func (b *Backend) releaseAddress(ctx context.Context, c clients, req provisioner.Request, alloc string) error {
	if alloc == "" {
		return nil
	}
	if _, err := c.ec2.ReleaseAddress(ctx, &ec2.ReleaseAddressInput{AllocationId: aws.String(alloc)}); err != nil && !isNotFound(err) {
		return cloudError("release elastic IP "+alloc, err)
	}
	req.Progress("elastic-ip", "elastic IP released: "+alloc)
	return nil
}

// releaseAllocated releases every elastic IP FM allocated for the instance
// (its tags say so); an address the user gave carries none of FM's tags and
// stays theirs.
func (b *Backend) releaseAllocated(ctx context.Context, c clients, req provisioner.Request) error {
	out, err := c.ec2.DescribeAddresses(ctx, &ec2.DescribeAddressesInput{Filters: []types.Filter{
		tagFilter(TagInstance, req.Instance), tagFilter(TagRole, roleEIP)}})
	if err != nil {
		return cloudError("look up the instance's elastic IPs", err)
	}
	for _, a := range out.Addresses {
		if err := b.releaseAddress(ctx, c, req, aws.ToString(a.AllocationId)); err != nil {
			return err
		}
	}
	return nil
}
