package ec2

import (
	"context"
	"maps"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/fleetmanager/fm/protocol"
)

// groupRules reads a group's rules as "proto/ports/source" strings, sorted.
func (w *world) groupRules(t *testing.T, id string) (in, out []string, name string) {
	t.Helper()
	got, err := w.ec2.DescribeSecurityGroups(context.Background(), &ec2.DescribeSecurityGroupsInput{GroupIds: []string{id}})
	if err != nil || len(got.SecurityGroups) != 1 {
		t.Fatalf("group %s: %v", id, err)
	}
	g := got.SecurityGroups[0]
	return slices.Sorted(maps.Keys(ruleAtoms(g.IpPermissions))), slices.Sorted(maps.Keys(ruleAtoms(g.IpPermissionsEgress))), aws.ToString(g.GroupName)
}

func tcpFrom(cidr string, ports ...int) []string {
	var out []string
	for _, p := range ports {
		out = append(out, "tcp/"+strconv.Itoa(p)+"-"+strconv.Itoa(p)+"/cidr:"+cidr)
	}
	slices.Sort(out)
	return out
}

// TestANetworkWithoutInternetAccess: internetAccessMode NO gives the
// machine no public address and no public DNS name, and FM's groups let
// traffic out only to the VPC and private addresses (the web group) and to
// the network's members (the members group, whose outbound "all traffic"
// AWS made is removed); SSH and DSS's port come in from the ingress CIDRs.
func TestANetworkWithoutInternetAccess(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	spec := w.spec()
	spec.ElasticIP = nil
	spec.Network.InternetAccess, spec.Network.WebPorts = protocol.InternetAccessNo, []int{10000}
	st, err := w.backend.Reprovision(ctx, w.request("rq-1", protocol.ProvisionReprovision, spec), protocol.MachineState{})
	if err != nil {
		t.Fatalf("reprovision: %v\n%s", err, strings.Join(w.progress, "\n"))
	}
	insts := w.fmInstances(t)
	if len(insts) != 1 {
		t.Fatalf("%d machines", len(insts))
	}
	if insts[0].PublicIpAddress != nil {
		t.Fatalf("a public address %s for a machine without internet access", aws.ToString(insts[0].PublicIpAddress))
	}
	if recs := w.records(t, w.pubZone); len(recs) != 0 {
		t.Errorf("public records %v for a machine without internet access", recs)
	}
	vpcs, err := w.ec2.DescribeVpcs(ctx, &ec2.DescribeVpcsInput{VpcIds: []string{w.vpc}})
	if err != nil {
		t.Fatal(err)
	}
	vpcCIDR := aws.ToString(vpcs.Vpcs[0].CidrBlock)
	groups := strings.Split(st.Details[detailSecurityGroups], ",")
	if len(groups) != 2 {
		t.Fatalf("groups %v", groups)
	}
	in, out, name := w.groupRules(t, groups[0])
	wantOut := []string{"-1//cidr:10.0.0.0/8", "-1//cidr:172.16.0.0/12", "-1//cidr:192.168.0.0/16"}
	if !slices.Contains(wantOut, "-1//cidr:"+vpcCIDR) {
		wantOut = append(wantOut, "-1//cidr:"+vpcCIDR)
		slices.Sort(wantOut)
	}
	if name != "fm-vn-lab-web-p10000-private" || !slices.Equal(in, tcpFrom("203.0.113.0/24", 22, 10000)) || !slices.Equal(out, wantOut) {
		t.Errorf("web group %s: in %v, out %v; want out %v", name, in, out, wantOut)
	}
	in, out, name = w.groupRules(t, groups[1])
	self := []string{"-1//group:" + groups[1] + "/"}
	if name != "fm-vn-lab-members" || !slices.Equal(in, self) || !slices.Equal(out, self) {
		t.Errorf("members group %s: in %v, out %v", name, in, out)
	}
}

// TestFMGroupsFollowTheNetwork: a machine whose network serves DSS through
// an HTTPS front gets a web group of its own ports (443, 80), DSS's port
// not among them; the group of the machines made before keeps its ports
// until they are provisioned again. A rule added to one of FM's groups by
// hand is removed, a rule missing is put back, at the next provision;
// nothing else changes.
func TestFMGroupsFollowTheNetwork(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	c := clients{ec2: w.ec2, dns: w.dns}
	spec := w.spec()
	spec.Network.WebPorts = []int{10000}
	plain, err := w.backend.securityGroups(ctx, c, spec, plan{}, func(string) {})
	if err != nil {
		t.Fatal(err)
	}
	spec.Network.WebPorts = []int{443, 80}
	front, err := w.backend.securityGroups(ctx, c, spec, plan{}, func(string) {})
	if err != nil {
		t.Fatal(err)
	}
	if plain[0] == front[0] || plain[1] != front[1] {
		t.Fatalf("groups before %v, after %v: want a web group of its own and the same members group", plain, front)
	}
	in, out, name := w.groupRules(t, front[0])
	if name != "fm-vn-lab-web-p443-p80" || !slices.Equal(in, tcpFrom("203.0.113.0/24", 22, 80, 443)) || !slices.Equal(out, []string{"-1//cidr:0.0.0.0/0"}) {
		t.Fatalf("front group %s: in %v out %v", name, in, out)
	}
	if in, _, _ := w.groupRules(t, plain[0]); !slices.Equal(in, tcpFrom("203.0.113.0/24", 22, 10000)) {
		t.Fatalf("the earlier machines' group changed: %v", in)
	}

	// By hand: DSS's port opened to the world, SSH closed.
	id := aws.String(front[0])
	if _, err := w.ec2.AuthorizeSecurityGroupIngress(ctx, &ec2.AuthorizeSecurityGroupIngressInput{GroupId: id, IpPermissions: []types.IpPermission{{
		IpProtocol: aws.String("tcp"), FromPort: aws.Int32(10000), ToPort: aws.Int32(10000), IpRanges: []types.IpRange{{CidrIp: aws.String("0.0.0.0/0")}}}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := w.ec2.RevokeSecurityGroupIngress(ctx, &ec2.RevokeSecurityGroupIngressInput{GroupId: id, IpPermissions: []types.IpPermission{{
		IpProtocol: aws.String("tcp"), FromPort: aws.Int32(22), ToPort: aws.Int32(22), IpRanges: []types.IpRange{{CidrIp: aws.String("203.0.113.0/24")}}}}}); err != nil {
		t.Fatal(err)
	}
	again, err := w.backend.securityGroups(ctx, c, spec, plan{}, func(string) {})
	if err != nil || !slices.Equal(again, front) {
		t.Fatalf("groups %v, %v; want %v", again, err, front)
	}
	// As AWS says it, not through ruleAtoms: one rule per port, from the
	// ingress CIDR alone.
	got, err := w.ec2.DescribeSecurityGroups(ctx, &ec2.DescribeSecurityGroupsInput{GroupIds: []string{front[0]}})
	if err != nil {
		t.Fatal(err)
	}
	var ports []int32
	for _, p := range got.SecurityGroups[0].IpPermissions {
		if aws.ToString(p.IpProtocol) != "tcp" || aws.ToInt32(p.FromPort) != aws.ToInt32(p.ToPort) || len(p.IpRanges) != 1 ||
			aws.ToString(p.IpRanges[0].CidrIp) != "203.0.113.0/24" || len(p.UserIdGroupPairs)+len(p.Ipv6Ranges)+len(p.PrefixListIds) != 0 {
			t.Errorf("rule %+v", p)
		}
		ports = append(ports, aws.ToInt32(p.FromPort))
	}
	if slices.Sort(ports); !slices.Equal(ports, []int32{22, 80, 443}) {
		t.Fatalf("ports after the next provision: %v", ports)
	}
}

// staleLookUp answers the first look-up of security groups with none, as a
// look-up made just before another provision made the group does.
type staleLookUp struct {
	ec2API
	looked bool
}

func (s *staleLookUp) DescribeSecurityGroups(ctx context.Context, in *ec2.DescribeSecurityGroupsInput, o ...func(*ec2.Options)) (*ec2.DescribeSecurityGroupsOutput, error) {
	if !s.looked {
		s.looked = true
		return &ec2.DescribeSecurityGroupsOutput{}, nil
	}
	return s.ec2API.DescribeSecurityGroups(ctx, in, o...)
}

// TestTwoProvisionsMakeOneGroup: a provision that looked for the network's
// group before another made it gets AWS's "duplicate" when it makes it too,
// and uses the one made, rather than failing.
func TestTwoProvisionsMakeOneGroup(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	spec := w.spec()
	spec.Network.WebPorts = []int{10000}
	first, err := w.backend.securityGroups(ctx, clients{ec2: w.ec2, dns: w.dns}, spec, plan{}, func(string) {})
	if err != nil {
		t.Fatal(err)
	}
	second, err := w.backend.securityGroups(ctx, clients{ec2: &staleLookUp{ec2API: w.ec2}, dns: w.dns}, spec, plan{}, func(string) {})
	if err != nil || !slices.Equal(first, second) {
		t.Fatalf("the second provision: %v, %v; want %v", second, err, first)
	}
}

// TestAnOlderServersSpecKeepsTheWebGroup: a machine spec naming no web ports
// (an older server's) gets fm-<network>-web with SSH, 80, 443 and DSS's port,
// its outbound rules left as AWS made them.
func TestAnOlderServersSpecKeepsTheWebGroup(t *testing.T) {
	w := newWorld(t)
	ids, err := w.backend.securityGroups(context.Background(), clients{ec2: w.ec2, dns: w.dns}, w.spec(), plan{}, func(string) {})
	if err != nil {
		t.Fatal(err)
	}
	in, out, name := w.groupRules(t, ids[0])
	if name != "fm-vn-lab-web" || !slices.Equal(in, tcpFrom("203.0.113.0/24", 22, 80, 443, 10000)) || !slices.Equal(out, []string{"-1//cidr:0.0.0.0/0"}) {
		t.Fatalf("group %s: in %v out %v", name, in, out)
	}
}
