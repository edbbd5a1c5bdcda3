package ec2

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
)

// maxSecurityGroups is how many groups a network may name (as Dataiku's FM).
const maxSecurityGroups = 5

// plan is what the checks found: the AMI, its root device, the subnet's
// availability zone and the instance's kept data volume, if any.
type plan struct {
	ami        string
	rootDevice string
	rootSizeGB int32 // of the AMI's root snapshot, when it says
	az         string
	volume     *types.Volume
	// vpcCIDRs are the VPC's IPv4 blocks.
	vpcCIDRs []string
}

// plan checks, without changing anything, that everything the machine needs
// exists: the AMI, the instance type, the key pair, the VPC, the subnet in
// it, the given security groups in it, a sensible data volume, and that a
// kept data volume is in the subnet's zone. Every problem found is reported
// at once.
func (b *Backend) plan(ctx context.Context, c clients, region string, req provisioner.Request) (plan, error) {
	spec := req.Spec
	var pl plan
	var problems []string
	bad := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }
	// found runs a look-up: a not-found answer is a problem with the
	// request, anything else (a refusal, an outage) stops the checks.
	found := func(what string, err error) (bool, error) {
		if err == nil {
			return true, nil
		}
		if isNotFound(err) || strings.HasPrefix(apiCode(err), "Invalid") {
			bad("%s does not exist in %s", what, region)
			return false, nil
		}
		return false, cloudError("check "+what, err)
	}

	if pl.ami = spec.AMIs[region]; pl.ami == "" {
		bad("image %s has no AMI for region %s", spec.ImageID, region)
	} else {
		out, err := c.ec2.DescribeImages(ctx, &ec2.DescribeImagesInput{ImageIds: []string{pl.ami}})
		ok, err := found("AMI "+pl.ami, err)
		if err != nil {
			return pl, err
		}
		if ok && len(out.Images) == 0 {
			bad("AMI %s does not exist in %s", pl.ami, region)
		} else if ok {
			pl.rootDevice = aws.ToString(out.Images[0].RootDeviceName)
			for _, m := range out.Images[0].BlockDeviceMappings {
				if aws.ToString(m.DeviceName) == pl.rootDevice && m.Ebs != nil {
					pl.rootSizeGB = aws.ToInt32(m.Ebs.VolumeSize)
				}
			}
		}
	}
	if spec.InstanceType == "" {
		bad("no cloud instance type")
	} else {
		out, err := c.ec2.DescribeInstanceTypes(ctx, &ec2.DescribeInstanceTypesInput{InstanceTypes: []types.InstanceType{types.InstanceType(spec.InstanceType)}})
		ok, err := found("instance type "+spec.InstanceType, err)
		if err != nil {
			return pl, err
		}
		if ok && len(out.InstanceTypes) == 0 {
			bad("instance type %s does not exist in %s", spec.InstanceType, region)
		}
	}
	if k := spec.Access.KeyPairName; k != "" {
		out, err := c.ec2.DescribeKeyPairs(ctx, &ec2.DescribeKeyPairsInput{KeyNames: []string{k}})
		ok, err := found("key pair "+k, err)
		if err != nil {
			return pl, err
		}
		if ok && len(out.KeyPairs) == 0 {
			bad("key pair %s does not exist in %s", k, region)
		}
	}
	vpcOK := false
	if v := spec.Network.VpcID; v == "" {
		bad("the virtual network names no VPC")
	} else {
		out, err := c.ec2.DescribeVpcs(ctx, &ec2.DescribeVpcsInput{VpcIds: []string{v}})
		ok, err := found("VPC "+v, err)
		if err != nil {
			return pl, err
		}
		vpcOK = ok && len(out.Vpcs) == 1
		if ok && !vpcOK {
			bad("VPC %s does not exist in %s", v, region)
		}
		if vpcOK {
			pl.vpcCIDRs = vpcCIDRs(out.Vpcs[0])
		}
	}
	if s := spec.Network.SubnetID; s == "" {
		bad("the virtual network names no subnet")
	} else {
		out, err := c.ec2.DescribeSubnets(ctx, &ec2.DescribeSubnetsInput{SubnetIds: []string{s}})
		ok, err := found("subnet "+s, err)
		if err != nil {
			return pl, err
		}
		switch {
		case ok && len(out.Subnets) == 0:
			bad("subnet %s does not exist in %s", s, region)
		case ok && vpcOK && aws.ToString(out.Subnets[0].VpcId) != spec.Network.VpcID:
			bad("subnet %s is in %s, not in the network's VPC %s", s, aws.ToString(out.Subnets[0].VpcId), spec.Network.VpcID)
		case ok:
			pl.az = aws.ToString(out.Subnets[0].AvailabilityZone)
		}
	}
	given := spec.Network.SecurityGroups
	total := len(given)
	if spec.Network.AutoCreateSecurityGroups {
		total += 2
	}
	if total > maxSecurityGroups {
		bad("%d security groups (%d given%s): at most %d", total, len(given),
			map[bool]string{true: " plus the 2 FM creates", false: ""}[spec.Network.AutoCreateSecurityGroups], maxSecurityGroups)
	} else if len(given) > 0 {
		out, err := c.ec2.DescribeSecurityGroups(ctx, &ec2.DescribeSecurityGroupsInput{GroupIds: given})
		ok, err := found("security group(s) "+strings.Join(given, ", "), err)
		if err != nil {
			return pl, err
		}
		if ok {
			seen := map[string]bool{}
			for _, g := range out.SecurityGroups {
				seen[aws.ToString(g.GroupId)] = true
				if vpcOK && aws.ToString(g.VpcId) != spec.Network.VpcID {
					bad("security group %s is in %s, not in the network's VPC %s", aws.ToString(g.GroupId), aws.ToString(g.VpcId), spec.Network.VpcID)
				}
			}
			for _, g := range given {
				if !seen[g] {
					bad("security group %s does not exist in %s", g, region)
				}
			}
		}
	}
	switch spec.Network.InternetAccess {
	case "", protocol.InternetAccessYes, protocol.InternetAccessNo, protocol.InternetAccessEgressOnly:
	default:
		bad("internet access mode %q is unknown", spec.Network.InternetAccess)
	}
	if !spec.Network.Public() && spec.ElasticIP != nil {
		bad("the network's internetAccessMode %s gives machines no public address: an elastic IP cannot be assigned", spec.Network.InternetAccess)
	}
	for _, p := range spec.Network.WebPorts {
		if p <= 0 || p > 65535 {
			bad("web port %d is not a TCP port", p)
		}
	}
	problems = append(problems, volumeProblems(spec.DataVolume, "data volume")...)
	if spec.RootVolume.Type != "" || spec.RootVolume.IOPS != 0 {
		problems = append(problems, volumeProblems(spec.RootVolume, "root volume")...)
	}
	if spec.Agent == nil {
		bad("FM gave no download URL for the agent (start fm server with --advertise-url, the address machines reach it at)")
	}
	vols, err := b.findVolumes(ctx, c, req.Instance)
	if err != nil {
		return pl, err
	}
	if len(vols) > 0 {
		pl.volume = &vols[0]
		// A restore makes a new volume in the subnet's zone.
		if z := aws.ToString(pl.volume.AvailabilityZone); pl.az != "" && z != pl.az && req.FromSnapshot == nil {
			bad("the data volume %s is in %s but subnet %s is in %s: a volume cannot move between zones (snapshot it and restore)",
				aws.ToString(pl.volume.VolumeId), z, spec.Network.SubnetID, pl.az)
		}
	}
	if len(problems) > 0 {
		return pl, &protocol.Error{Code: protocol.CodeInvalidArgument, Message: "the machine cannot be made: " + strings.Join(problems, "; ")}
	}
	return pl, nil
}

// EBS volume types, and those whose IOPS can be set.
var (
	volumeTypes = []string{"gp2", "gp3", "io1", "io2", "st1", "sc1", "standard"}
	iopsTypes   = []string{"gp3", "io1", "io2"}
)

func volumeProblems(v protocol.VolumeSpec, what string) []string {
	var p []string
	if v.Type != "" && !slices.Contains(volumeTypes, v.Type) {
		p = append(p, fmt.Sprintf("%s type %q is not an EBS type (%s)", what, v.Type, strings.Join(volumeTypes, ", ")))
	}
	if v.IOPS != 0 && !slices.Contains(iopsTypes, v.Type) {
		p = append(p, fmt.Sprintf("%s IOPS can only be set for %s volumes, not %q", what, strings.Join(iopsTypes, ", "), v.Type))
	}
	if v.ThroughputMiBps != 0 && (v.Type != "gp3" || v.ThroughputMiBps < 125 || v.ThroughputMiBps > 1000) {
		p = append(p, fmt.Sprintf("%s throughput %d MiB/s: only a gp3 volume's can be set, from 125 to 1000", what, v.ThroughputMiBps))
	}
	if v.SizeGB < 0 || v.SizeGB > 16384 {
		p = append(p, fmt.Sprintf("%s size %d GB is out of range (1 to 16384)", what, v.SizeGB))
	}
	switch v.Encryption {
	case "", "NONE", "DEFAULT_KEY":
	case "CUSTOM", "TENANT":
		if v.KMSKeyID == "" {
			p = append(p, fmt.Sprintf("%s encryption %s needs a KMS key (volumesEncryptionKey, or the tenant's awsCMKId)", what, v.Encryption))
		}
	default:
		p = append(p, fmt.Sprintf("%s encryption %q is unknown", what, v.Encryption))
	}
	return p
}

func validCIDR(s string) bool {
	p, err := netip.ParsePrefix(s)
	return err == nil && p.Addr().Is4()
}
