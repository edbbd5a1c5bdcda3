package ec2

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/fleetmanager/fm/protocol"
)

// privateRanges are where a machine of a network without internet access
// (internetAccessMode NO) may send traffic, beside its VPC's own blocks: FM
// and the AWS endpoints it uses are reached over peering, VPN or VPC
// endpoints, at private addresses.
var privateRanges = []string{"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"}

// securityGroups returns the groups a machine of the network gets: those
// the network names and, when it auto-creates them, FM's two (made on first
// use, their rules brought to what they must be on every use):
//
//   - the web group: SSH and the machine's web ports (spec.Network.WebPorts:
//     DSS's own port, or its HTTPS front's) from the ingress CIDRs; out to
//     anywhere, or only to the VPC and private addresses for a network
//     without internet access. Its name says its ports and mode
//     (fm-<network>-web-p443-p80, …-private), so that machines provisioned
//     before a change of the network's HTTPS strategy keep the group they
//     were made for until they are provisioned again. A machine spec from an
//     older server, which names no ports, gets fm-<network>-web: SSH, 80,
//     443 and the base port, out to anywhere as AWS makes it.
//   - fm-<network>-members: all traffic between its members (machines, load
//     balancers), in and out; nothing else goes out through it.
//
// FM's groups are FM's: a rule added to one by hand is removed the next
// time a machine of the network is provisioned (give groups of your own in
// awsSecurityGroups instead). A rule AWS refuses to remove is told to note,
// and does not fail the provision.
func (b *Backend) securityGroups(ctx context.Context, c clients, spec *protocol.MachineSpec, pl plan, note func(string)) ([]string, error) {
	ids := slices.Clone(spec.Network.SecurityGroups)
	if !spec.Network.AutoCreateSecurityGroups {
		return ids, nil
	}
	webID, err := b.ensureGroup(ctx, c, spec.Network, spec.Tags, b.webGroup(spec, pl), note)
	if err != nil {
		return nil, err
	}
	membersID, err := b.membersGroup(ctx, c, spec.Network, spec.Tags, note)
	if err != nil {
		return nil, err
	}
	return append(ids, webID, membersID), nil
}

// groupWant is one of FM's groups as it must be. ingress and egress are
// the whole of its rules, one source each; nil egress leaves the group's
// outbound rules as they are (AWS makes a group with "all traffic out").
type groupWant struct {
	kind, desc      string
	ingress, egress func(self string) []types.IpPermission
}

// ingressOn is a group's ingress: TCP ports from the ingress CIDRs.
func (b *Backend) ingressOn(ports ...int32) func(string) []types.IpPermission {
	return func(string) []types.IpPermission {
		var rules []types.IpPermission
		for _, port := range ports {
			for _, cidr := range b.cfg.IngressCIDRs {
				rules = append(rules, types.IpPermission{IpProtocol: aws.String("tcp"), FromPort: aws.Int32(port), ToPort: aws.Int32(port),
					IpRanges: []types.IpRange{{CidrIp: aws.String(cidr), Description: aws.String("Fleet Manager ingress")}}})
			}
		}
		return rules
	}
}

// webGroup is the web group a machine of spec gets.
func (b *Backend) webGroup(spec *protocol.MachineSpec, pl plan) groupWant {
	if len(spec.Network.WebPorts) == 0 {
		return groupWant{kind: "web", desc: "Fleet Manager: SSH, HTTP and HTTPS to DSS", ingress: b.ingressOn(legacyWebPorts(spec.BasePort)...)}
	}
	ports := []int32{22}
	kind := "web"
	for _, p := range spec.Network.WebPorts {
		if !slices.Contains(ports, int32(p)) {
			ports = append(ports, int32(p))
		}
		kind += "-p" + strconv.Itoa(p)
	}
	to := []string{"0.0.0.0/0"}
	desc := "Fleet Manager: SSH and DSS (" + strings.TrimPrefix(kind, "web-") + ")"
	if !spec.Network.Public() && spec.Network.InternetAccess == protocol.InternetAccessNo {
		kind += "-private"
		desc += ", out to private addresses only"
		to = append(slices.Clone(pl.vpcCIDRs), privateRanges...)
	}
	return groupWant{kind: kind, desc: desc, ingress: b.ingressOn(ports...), egress: func(string) []types.IpPermission {
		var rules []types.IpPermission
		for _, cidr := range slices.Compact(slices.Sorted(slices.Values(to))) {
			rules = append(rules, types.IpPermission{IpProtocol: aws.String("-1"), IpRanges: []types.IpRange{{CidrIp: aws.String(cidr)}}})
		}
		return rules
	}}
}

// membersGroup is the network's members' group: all traffic between its
// members (machines, load balancers), both ways.
func (b *Backend) membersGroup(ctx context.Context, c clients, network protocol.NetworkSpec, tags map[string]string, note func(string)) (string, error) {
	self := func(self string) []types.IpPermission {
		return []types.IpPermission{{IpProtocol: aws.String("-1"), UserIdGroupPairs: []types.UserIdGroupPair{{GroupId: aws.String(self)}}}}
	}
	return b.ensureGroup(ctx, c, network, tags, groupWant{kind: "members", desc: "Fleet Manager: all traffic between members", ingress: self, egress: self}, note)
}

// legacyWebPorts are the ports the web group of an older server's machine
// spec opens: SSH, HTTP, HTTPS, and DSS's base port.
func legacyWebPorts(dssPort int) []int32 {
	ports := []int32{22, 80, 443}
	if dssPort > 0 && dssPort < 65536 && !slices.Contains(ports, int32(dssPort)) {
		ports = append(ports, int32(dssPort))
	}
	return ports
}

// ensureGroup finds the network's group of that kind by name (made before,
// perhaps by a provisioner that then died) or creates it, then brings its
// rules to what want says: the missing ones added, the others removed. A
// provisioner that dies anywhere in here leaves a group the next call
// finds by its name and finishes; two provisions that make it at once find
// the one that was made first.
func (b *Backend) ensureGroup(ctx context.Context, c clients, network protocol.NetworkSpec, tags map[string]string, want groupWant, note func(string)) (string, error) {
	name := "fm-" + network.ID + "-" + want.kind
	lookUp := func() ([]types.SecurityGroup, error) {
		out, err := c.ec2.DescribeSecurityGroups(ctx, &ec2.DescribeSecurityGroupsInput{Filters: []types.Filter{
			{Name: aws.String("vpc-id"), Values: []string{network.VpcID}}, {Name: aws.String("group-name"), Values: []string{name}}}})
		if err != nil {
			return nil, cloudError("look up security group "+name, err)
		}
		return out.SecurityGroups, nil
	}
	found, err := lookUp()
	if err != nil {
		return "", err
	}
	if len(found) == 0 {
		_, err := c.ec2.CreateSecurityGroup(ctx, &ec2.CreateSecurityGroupInput{
			GroupName: aws.String(name), Description: aws.String(want.desc), VpcId: aws.String(network.VpcID),
			TagSpecifications: tagSpec(types.ResourceTypeSecurityGroup, tagList(tags, name, map[string]string{TagRole: roleSG, TagNetwork: network.ID})),
		})
		if err != nil && apiCode(err) != "InvalidGroup.Duplicate" {
			return "", cloudError("create security group "+name, err)
		}
		// Read back rather than assumed: the rules AWS gives a new group
		// (all traffic out, and to ::/0 in a VPC with IPv6).
		if found, err = lookUp(); err != nil {
			return "", err
		}
		if len(found) == 0 {
			return "", cloudError("look up security group "+name, fmt.Errorf("the group made is not found"))
		}
	}
	g := found[0]
	id := aws.ToString(g.GroupId)
	if err := reconcileRules(ctx, c, id, name, false, g.IpPermissions, want.ingress(id), note); err != nil {
		return "", err
	}
	if want.egress != nil {
		if err := reconcileRules(ctx, c, id, name, true, g.IpPermissionsEgress, want.egress(id), note); err != nil {
			return "", err
		}
	}
	return id, nil
}

// reconcileRules adds the rules of want the group lacks and removes those
// it has beyond them, one rule per call: a rule already there (a duplicate)
// fails its whole call and must not keep a new one out; one already gone
// (another provisioner's removal) is not an error either. Rules are added
// before any is removed, so a machine never goes without what it needs; a
// rule AWS refuses to remove (one naming a group of another account that is
// gone) is told to note, and fails nothing: what the machine needs is there.
func reconcileRules(ctx context.Context, c clients, id, name string, egress bool, have, want []types.IpPermission, note func(string)) error {
	haveAtoms, wantAtoms := ruleAtoms(have), ruleAtoms(want)
	for _, key := range slices.Sorted(maps.Keys(wantAtoms)) {
		if _, ok := haveAtoms[key]; ok {
			continue
		}
		rule := []types.IpPermission{wantAtoms[key]}
		var err error
		if egress {
			_, err = c.ec2.AuthorizeSecurityGroupEgress(ctx, &ec2.AuthorizeSecurityGroupEgressInput{GroupId: aws.String(id), IpPermissions: rule})
		} else {
			_, err = c.ec2.AuthorizeSecurityGroupIngress(ctx, &ec2.AuthorizeSecurityGroupIngressInput{GroupId: aws.String(id), IpPermissions: rule})
		}
		if err != nil && apiCode(err) != "InvalidPermission.Duplicate" {
			return cloudError("open security group "+name, err)
		}
	}
	for _, key := range slices.Sorted(maps.Keys(haveAtoms)) {
		if _, ok := wantAtoms[key]; ok {
			continue
		}
		rule := []types.IpPermission{haveAtoms[key]}
		var err error
		if egress {
			_, err = c.ec2.RevokeSecurityGroupEgress(ctx, &ec2.RevokeSecurityGroupEgressInput{GroupId: aws.String(id), IpPermissions: rule})
		} else {
			_, err = c.ec2.RevokeSecurityGroupIngress(ctx, &ec2.RevokeSecurityGroupIngressInput{GroupId: aws.String(id), IpPermissions: rule})
		}
		if err != nil && apiCode(err) != "InvalidPermission.NotFound" {
			if ctx.Err() != nil {
				return cloudError("close security group "+name, err)
			}
			direction := "inbound"
			if egress {
				direction = "outbound"
			}
			note(fmt.Sprintf("the %s rule %s of security group %s (%s), which FM did not make, could not be removed: %v", direction, key, name, id, err))
		}
	}
	return nil
}

// ruleAtoms splits rules into one rule per source (a CIDR, an IPv6 CIDR, a
// group, a prefix list), keyed by what it allows: AWS groups the sources of
// one protocol and port range into one permission, and adds or removes
// them one at a time.
func ruleAtoms(rules []types.IpPermission) map[string]types.IpPermission {
	atoms := map[string]types.IpPermission{}
	for _, r := range rules {
		proto := aws.ToString(r.IpProtocol)
		base := types.IpPermission{IpProtocol: r.IpProtocol}
		ports := ""
		if proto != "-1" && proto != "all" {
			base.FromPort, base.ToPort = r.FromPort, r.ToPort
			ports = fmt.Sprintf("%d-%d", aws.ToInt32(r.FromPort), aws.ToInt32(r.ToPort))
		}
		if proto == "all" {
			proto = "-1"
			base.IpProtocol = aws.String("-1")
		}
		add := func(source string, set func(*types.IpPermission)) {
			a := base
			set(&a)
			atoms[proto+"/"+ports+"/"+source] = a
		}
		for _, x := range r.IpRanges {
			add("cidr:"+aws.ToString(x.CidrIp), func(a *types.IpPermission) { a.IpRanges = []types.IpRange{x} })
		}
		for _, x := range r.Ipv6Ranges {
			add("cidr6:"+aws.ToString(x.CidrIpv6), func(a *types.IpPermission) { a.Ipv6Ranges = []types.Ipv6Range{x} })
		}
		for _, x := range r.UserIdGroupPairs {
			// Kept whole (another account's group, a peered VPC's) for its
			// removal, but its description; told apart by the group's id,
			// unique across accounts (AWS adds the account to a pair
			// given without it).
			x.Description = nil
			add("group:"+aws.ToString(x.GroupId)+"/"+aws.ToString(x.VpcPeeringConnectionId), func(a *types.IpPermission) {
				a.UserIdGroupPairs = []types.UserIdGroupPair{x}
			})
		}
		for _, x := range r.PrefixListIds {
			add("prefix:"+aws.ToString(x.PrefixListId), func(a *types.IpPermission) { a.PrefixListIds = []types.PrefixListId{x} })
		}
	}
	return atoms
}
