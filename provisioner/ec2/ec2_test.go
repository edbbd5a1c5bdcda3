package ec2

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/aws/aws-sdk-go-v2/service/iam"
	"github.com/aws/aws-sdk-go-v2/service/route53"
	r53types "github.com/aws/aws-sdk-go-v2/service/route53/types"
	"github.com/aws/smithy-go"
	"github.com/fleetmanager/fm/deploy/cloudinit"
	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
	"github.com/fleetmanager/fm/provisioner/ec2/mototest"
)

// world is moto with what an operator has before FM: a key pair, the
// default VPC and a subnet, an AMI, two hosted zones.
type world struct {
	moto                *mototest.Server
	ec2                 *ec2.Client
	dns                 *route53.Client
	iam                 *iam.Client
	vpc, subnet, ami    string
	privZone, pubZone   string
	privName, pubName   string
	backend             *Backend
	progress            []string
	progressMu          sync.Mutex
	instanceProfileArn  string
	defaultVolumeSizeGB int
}

func newWorld(t *testing.T) *world {
	t.Helper()
	m := mototest.Run(t)
	m.SetEnv(t)
	w := &world{moto: m, defaultVolumeSizeGB: 50}
	cfg, err := config.LoadDefaultConfig(context.Background(), config.WithRegion(mototest.Region), config.WithBaseEndpoint(m.URL))
	if err != nil {
		t.Fatal(err)
	}
	w.ec2, w.dns, w.iam = ec2.NewFromConfig(cfg), route53.NewFromConfig(cfg), iam.NewFromConfig(cfg)
	w.reset(t)
	return w
}

// reset empties moto and makes the operator's resources again.
func (w *world) reset(t testing.TB) {
	t.Helper()
	w.moto.Reset(t)
	ctx := context.Background()
	if _, err := w.ec2.CreateKeyPair(ctx, &ec2.CreateKeyPairInput{KeyName: aws.String("ops")}); err != nil {
		t.Fatal(err)
	}
	vpcs, err := w.ec2.DescribeVpcs(ctx, &ec2.DescribeVpcsInput{})
	if err != nil || len(vpcs.Vpcs) == 0 {
		t.Fatalf("moto has no VPC: %v", err)
	}
	w.vpc = aws.ToString(vpcs.Vpcs[0].VpcId)
	subnets, err := w.ec2.DescribeSubnets(ctx, &ec2.DescribeSubnetsInput{Filters: []types.Filter{{Name: aws.String("vpc-id"), Values: []string{w.vpc}}}})
	if err != nil || len(subnets.Subnets) == 0 {
		t.Fatalf("moto has no subnet: %v", err)
	}
	w.subnet = aws.ToString(subnets.Subnets[0].SubnetId)
	images, err := w.ec2.DescribeImages(ctx, &ec2.DescribeImagesInput{Owners: []string{"amazon"}})
	if err != nil || len(images.Images) == 0 {
		t.Fatalf("moto has no AMI: %v", err)
	}
	w.ami = aws.ToString(images.Images[0].ImageId)
	profile, err := w.iam.CreateInstanceProfile(ctx, &iam.CreateInstanceProfileInput{InstanceProfileName: aws.String("dss")})
	if err != nil {
		t.Fatal(err)
	}
	w.instanceProfileArn = aws.ToString(profile.InstanceProfile.Arn)
	zone := func(name string, private bool) string {
		in := &route53.CreateHostedZoneInput{Name: aws.String(name), CallerReference: aws.String(name + time.Now().String())}
		if private {
			in.VPC = &r53types.VPC{VPCId: aws.String(w.vpc), VPCRegion: r53types.VPCRegion(mototest.Region)}
			in.HostedZoneConfig = &r53types.HostedZoneConfig{PrivateZone: true}
		}
		out, err := w.dns.CreateHostedZone(ctx, in)
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimPrefix(aws.ToString(out.HostedZone.Id), "/hostedzone/")
	}
	w.privName, w.pubName = "internal.example.com", "dss.example.com"
	w.privZone, w.pubZone = zone(w.privName, true), zone(w.pubName, false)
	b, err := New(Config{Region: mototest.Region, Endpoint: w.moto.URL, AgentNATSURL: "tls://fm.example.com:4222",
		IngressCIDRs: []string{"203.0.113.0/24"}, Poll: 20 * time.Millisecond, Timeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	w.backend = b
}

// spec is a full machine spec in the world.
func (w *world) spec() *protocol.MachineSpec {
	return &protocol.MachineSpec{
		Label: "analytics", NodeType: "design", ImageID: "dss-14.0.0", DSSVersion: "14.0.0",
		AMIs: map[string]string{mototest.Region: w.ami}, InstanceType: "m5.xlarge", BasePort: 10000,
		Network: protocol.NetworkSpec{ID: "vn-lab", Region: mototest.Region, VpcID: w.vpc, SubnetID: w.subnet,
			AutoCreateSecurityGroups: true, AssignPublicIP: true, DNSStrategy: dnsStrategyRoute53,
			PrivateZoneID: w.privZone, PublicZoneID: w.pubZone},
		Access: protocol.AccessSpec{KeyPairName: "ops", RuntimeInstanceProfileArn: w.instanceProfileArn, RestrictMetadataAccess: true},
		DataVolume: protocol.VolumeSpec{Type: "io1", SizeGB: w.defaultVolumeSizeGB, MaxSizeGB: 200, IOPS: 3000,
			Encryption: "CUSTOM", KMSKeyID: "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"},
		RootVolume: protocol.VolumeSpec{Type: "gp3", SizeGB: 40},
		Tags:       map[string]string{"team": "data", "cost-center": "42"},
		ElasticIP:  &protocol.ElasticIPSpec{},
		Join:       &protocol.JoinSpec{URL: "https://fm.example.com:10000/api/join", Token: "join-token-1"},
		Agent:      &protocol.AgentDownload{URL: "https://fm.example.com:10000/download/fm", SHA256: strings.Repeat("0f", 32)},
	}
}

func (w *world) request(id string, action protocol.ProvisionAction, spec *protocol.MachineSpec) provisioner.Request {
	return provisioner.Request{
		ProvisionRequest: protocol.ProvisionRequest{ID: id, Instance: "in-analytics", Action: action, Generation: 1, Spec: spec},
		Progress: func(step, msg string) {
			w.progressMu.Lock()
			w.progress = append(w.progress, step+": "+msg)
			w.progressMu.Unlock()
		},
	}
}

// fmInstances are the machines carrying FM's tags, in any live state.
func (w *world) fmInstances(t *testing.T) []types.Instance {
	t.Helper()
	out, err := w.ec2.DescribeInstances(context.Background(), &ec2.DescribeInstancesInput{Filters: []types.Filter{
		tagFilter(TagInstance, "in-analytics"),
		{Name: aws.String("instance-state-name"), Values: []string{"pending", "running", "stopping", "stopped"}}}})
	if err != nil {
		t.Fatal(err)
	}
	var all []types.Instance
	for _, r := range out.Reservations {
		all = append(all, r.Instances...)
	}
	return all
}

func (w *world) volume(t *testing.T, id string) types.Volume {
	t.Helper()
	out, err := w.ec2.DescribeVolumes(context.Background(), &ec2.DescribeVolumesInput{VolumeIds: []string{id}})
	if err != nil || len(out.Volumes) != 1 {
		t.Fatalf("volume %s: %v", id, err)
	}
	return out.Volumes[0]
}

func (w *world) records(t *testing.T, zone string) map[string]string {
	t.Helper()
	out, err := w.dns.ListResourceRecordSets(context.Background(), &route53.ListResourceRecordSetsInput{HostedZoneId: aws.String(zone)})
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, rr := range out.ResourceRecordSets {
		if rr.Type == r53types.RRTypeA {
			m[aws.ToString(rr.Name)] = aws.ToString(rr.ResourceRecords[0].Value)
		}
	}
	return m
}

func TestMachineLifecycleOnMoto(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	spec := w.spec()

	st, err := w.backend.Reprovision(ctx, w.request("rq-1", protocol.ProvisionReprovision, spec), protocol.MachineState{})
	if err != nil {
		t.Fatalf("reprovision: %v\n%s", err, strings.Join(w.progress, "\n"))
	}
	if st.Status != protocol.MachineRunning || !strings.HasPrefix(st.MachineID, "i-") || !strings.HasPrefix(st.VolumeID, "vol-") {
		t.Fatalf("state = %+v", st)
	}

	t.Run("security groups", func(t *testing.T) {
		out, err := w.ec2.DescribeSecurityGroups(ctx, &ec2.DescribeSecurityGroupsInput{GroupIds: strings.Split(st.Details[detailSecurityGroups], ",")})
		if err != nil || len(out.SecurityGroups) != 2 {
			t.Fatalf("groups: %v %v", out, err)
		}
		byName := map[string]types.SecurityGroup{}
		for _, g := range out.SecurityGroups {
			byName[aws.ToString(g.GroupName)] = g
		}
		web, members := byName["fm-vn-lab-web"], byName["fm-vn-lab-members"]
		var ports []int32
		for _, p := range web.IpPermissions {
			if len(p.IpRanges) != 1 || aws.ToString(p.IpRanges[0].CidrIp) != "203.0.113.0/24" {
				t.Errorf("web rule %d open to %v, not the ingress CIDR", aws.ToInt32(p.FromPort), p.IpRanges)
			}
			ports = append(ports, aws.ToInt32(p.FromPort))
		}
		slices.Sort(ports)
		if !slices.Equal(ports, []int32{22, 80, 443, 10000}) {
			t.Errorf("web ports = %v", ports)
		}
		if len(members.IpPermissions) != 1 || aws.ToString(members.IpPermissions[0].IpProtocol) != "-1" ||
			len(members.IpPermissions[0].UserIdGroupPairs) != 1 || aws.ToString(members.IpPermissions[0].UserIdGroupPairs[0].GroupId) != aws.ToString(members.GroupId) {
			t.Errorf("members rules = %+v", members.IpPermissions)
		}
	})

	t.Run("instance", func(t *testing.T) {
		insts := w.fmInstances(t)
		if len(insts) != 1 {
			t.Fatalf("%d machines", len(insts))
		}
		in := insts[0]
		if aws.ToString(in.ImageId) != w.ami || in.InstanceType != "m5.xlarge" || aws.ToString(in.KeyName) != "ops" || aws.ToString(in.SubnetId) != w.subnet {
			t.Errorf("instance = ami %s type %s key %s subnet %s", aws.ToString(in.ImageId), in.InstanceType, aws.ToString(in.KeyName), aws.ToString(in.SubnetId))
		}
		if in.IamInstanceProfile == nil || aws.ToString(in.IamInstanceProfile.Arn) != w.instanceProfileArn {
			t.Errorf("profile = %+v", in.IamInstanceProfile)
		}
		if in.MetadataOptions == nil || in.MetadataOptions.HttpTokens != types.HttpTokensStateRequired || aws.ToInt32(in.MetadataOptions.HttpPutResponseHopLimit) != 1 {
			t.Errorf("metadata options = %+v", in.MetadataOptions)
		}
		for k, v := range map[string]string{"team": "data", "cost-center": "42", "Name": "analytics", TagInstance: "in-analytics",
			TagRole: roleMachine, TagRequest: "rq-1", TagGeneration: "1"} {
			if got := tagValue(in.Tags, k); got != v {
				t.Errorf("tag %s = %q, want %q", k, got, v)
			}
		}
		attr, err := w.ec2.DescribeInstanceAttribute(ctx, &ec2.DescribeInstanceAttributeInput{InstanceId: in.InstanceId, Attribute: types.InstanceAttributeNameUserData})
		if err != nil {
			t.Fatal(err)
		}
		ud, err := base64.StdEncoding.DecodeString(aws.ToString(attr.UserData.Value))
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := cloudinit.AgentConfig(ud)
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{`"join-token-1"`, `"tls://fm.example.com:4222"`, `"machineRequest": "rq-1"`, `"dataDir": "/data"`, `"imdsUrl": "http://169.254.169.254"`} {
			if !strings.Contains(string(cfg), want) {
				t.Errorf("agent config lacks %s:\n%s", want, cfg)
			}
		}
		// The names the DNS records give it, the public zone's first: the
		// agent's HTTPS front certifies them.
		var agentCfg struct {
			Hostnames []string `json:"hostnames"`
		}
		if err := json.Unmarshal(cfg, &agentCfg); err != nil {
			t.Fatal(err)
		}
		if want := []string{"in-analytics." + w.pubName, "in-analytics." + w.privName}; !slices.Equal(agentCfg.Hostnames, want) {
			t.Errorf("agent hostnames = %v, want %v", agentCfg.Hostnames, want)
		}
		if !strings.Contains(string(ud), strings.ReplaceAll(st.VolumeID, "-", "")) || !strings.Contains(string(ud), "download/fm") {
			t.Errorf("user data does not name the volume or the download")
		}
	})

	t.Run("data volume", func(t *testing.T) {
		v := w.volume(t, st.VolumeID)
		if aws.ToInt32(v.Size) != 50 || v.VolumeType != "io1" || aws.ToInt32(v.Iops) != 3000 || !aws.ToBool(v.Encrypted) ||
			!strings.HasSuffix(aws.ToString(v.KmsKeyId), "11111111-2222-3333-4444-555555555555") {
			t.Errorf("volume = %d GB %s iops %d encrypted %v key %s", aws.ToInt32(v.Size), v.VolumeType, aws.ToInt32(v.Iops), aws.ToBool(v.Encrypted), aws.ToString(v.KmsKeyId))
		}
		if len(v.Attachments) != 1 || aws.ToString(v.Attachments[0].InstanceId) != st.MachineID || aws.ToString(v.Attachments[0].Device) != dataDevice {
			t.Errorf("attachments = %+v", v.Attachments)
		}
		if tagValue(v.Tags, TagRole) != roleData || tagValue(v.Tags, "team") != "data" {
			t.Errorf("volume tags = %+v", v.Tags)
		}
	})

	t.Run("elastic ip and dns", func(t *testing.T) {
		out, err := w.ec2.DescribeAddresses(ctx, &ec2.DescribeAddressesInput{AllocationIds: []string{st.Details[detailAllocation]}})
		if err != nil || len(out.Addresses) != 1 || aws.ToString(out.Addresses[0].InstanceId) != st.MachineID {
			t.Fatalf("address: %+v %v", out, err)
		}
		if st.PublicIP != aws.ToString(out.Addresses[0].PublicIp) {
			t.Errorf("public IP %s, elastic IP %s", st.PublicIP, aws.ToString(out.Addresses[0].PublicIp))
		}
		if got := w.records(t, w.privZone)["in-analytics."+w.privName+"."]; got != st.PrivateIP || got == "" {
			t.Errorf("private record -> %q, want %s", got, st.PrivateIP)
		}
		if got := w.records(t, w.pubZone)["in-analytics."+w.pubName+"."]; got != st.PublicIP {
			t.Errorf("public record -> %q, want %s", got, st.PublicIP)
		}
		if st.PublicDNS != "in-analytics."+w.pubName {
			t.Errorf("public DNS = %q", st.PublicDNS)
		}
	})

	// Stop and start.
	st.Action = protocol.ProvisionStop
	if st, err = w.backend.Stop(ctx, w.request("rq-2", protocol.ProvisionStop, spec), st); err != nil || st.Status != protocol.MachineStopped {
		t.Fatalf("stop: %v %+v", err, st)
	}
	if in := w.fmInstances(t); len(in) != 1 || in[0].State.Name != types.InstanceStateNameStopped {
		t.Fatalf("after stop: %+v", in)
	}
	if alive, err := aliveOne(w.backend, st); err != nil || alive {
		t.Fatalf("a stopped machine is alive: %v %v", alive, err)
	}
	if st, err = w.backend.Start(ctx, w.request("rq-3", protocol.ProvisionStart, spec), st); err != nil || st.Status != protocol.MachineRunning {
		t.Fatalf("start: %v %+v", err, st)
	}
	if alive, err := aliveOne(w.backend, st); err != nil || !alive {
		t.Fatalf("a started machine is not alive: %v %v", alive, err)
	}

	// A reprovision: a new machine, the same volume; the old one goes.
	first, vol, eip := st.MachineID, st.VolumeID, st.Details[detailAllocation]
	if st, err = w.backend.Reprovision(ctx, w.request("rq-4", protocol.ProvisionReprovision, spec), st); err != nil {
		t.Fatalf("second reprovision: %v", err)
	}
	if st.MachineID == first || st.VolumeID != vol || st.Details[detailAllocation] != eip {
		t.Fatalf("reprovision: machine %s (was %s), volume %s (was %s), eip %s (was %s)", st.MachineID, first, st.VolumeID, vol, st.Details[detailAllocation], eip)
	}
	if in := w.fmInstances(t); len(in) != 1 || aws.ToString(in[0].InstanceId) != st.MachineID {
		t.Fatalf("after reprovision: %d machines", len(in))
	}
	if v := w.volume(t, vol); len(v.Attachments) != 1 || aws.ToString(v.Attachments[0].InstanceId) != st.MachineID {
		t.Fatalf("volume not reattached: %+v", v.Attachments)
	}

	// Deprovision keeps the volume (and the address), withdraws the records.
	if st, err = w.backend.Deprovision(ctx, w.request("rq-5", protocol.ProvisionDeprovision, nil), st); err != nil || st.Status != protocol.MachineDeprovisioned {
		t.Fatalf("deprovision: %v %+v", err, st)
	}
	if in := w.fmInstances(t); len(in) != 0 {
		t.Fatalf("machines left after deprovision: %d", len(in))
	}
	if v := w.volume(t, vol); v.State != types.VolumeStateAvailable {
		t.Fatalf("volume after deprovision: %s", v.State)
	}
	if len(w.records(t, w.privZone)) != 0 || len(w.records(t, w.pubZone)) != 0 {
		t.Fatalf("records left: %v %v", w.records(t, w.privZone), w.records(t, w.pubZone))
	}
	// Reprovisioned, it finds the kept volume.
	if st, err = w.backend.Reprovision(ctx, w.request("rq-6", protocol.ProvisionReprovision, spec), st); err != nil || st.VolumeID != vol {
		t.Fatalf("reprovision after deprovision: %v, volume %s (was %s)", err, st.VolumeID, vol)
	}

	// Delete: the machine, the volume and FM's address go.
	if st, err = w.backend.Delete(ctx, w.request("rq-7", protocol.ProvisionDelete, nil), st); err != nil || st.Status != protocol.MachineDeleted {
		t.Fatalf("delete: %v %+v", err, st)
	}
	vols, _ := w.ec2.DescribeVolumes(ctx, &ec2.DescribeVolumesInput{Filters: []types.Filter{tagFilter(TagInstance, "in-analytics"), tagFilter(TagRole, roleData)}})
	if len(vols.Volumes) != 0 {
		t.Fatalf("volumes left after delete: %+v", vols.Volumes)
	}
	addrs, _ := w.ec2.DescribeAddresses(ctx, &ec2.DescribeAddressesInput{})
	if len(addrs.Addresses) != 0 {
		t.Fatalf("addresses left after delete: %+v", addrs.Addresses)
	}
}

func TestDeleteCanKeepTheVolume(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	spec := w.spec()
	spec.ElasticIP, spec.Network.DNSStrategy = nil, "NONE"
	st, err := w.backend.Reprovision(ctx, w.request("rq-1", protocol.ProvisionReprovision, spec), protocol.MachineState{})
	if err != nil {
		t.Fatal(err)
	}
	req := w.request("rq-2", protocol.ProvisionDelete, nil)
	req.KeepVolume = true
	if st, err = w.backend.Delete(ctx, req, st); err != nil || st.VolumeID == "" {
		t.Fatalf("delete: %v %+v", err, st)
	}
	if v := w.volume(t, st.VolumeID); v.State != types.VolumeStateAvailable {
		t.Fatalf("kept volume is %s", v.State)
	}
}

// crashAfterRun lets RunInstances through to moto, then fails as a
// provisioner killed before recording the result would: the caller never
// learns the machine's id.
type crashAfterRun struct {
	ec2API
	ran int
}

var errKilled = errors.New("provisioner killed")

func (c *crashAfterRun) RunInstances(ctx context.Context, in *ec2.RunInstancesInput, o ...func(*ec2.Options)) (*ec2.RunInstancesOutput, error) {
	if _, err := c.ec2API.RunInstances(ctx, in, o...); err != nil {
		return nil, err
	}
	c.ran++
	return nil, errKilled
}

func TestCrashAfterRunInstancesMakesOneMachine(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	real := w.backend.connect
	crashing := &crashAfterRun{}
	w.backend.connect = func(ctx context.Context, region string, auth *protocol.CloudAuth) (clients, error) {
		c, err := real(ctx, region, auth)
		crashing.ec2API = c.ec2
		c.ec2 = crashing
		return c, err
	}
	req := w.request("rq-crash", protocol.ProvisionReprovision, w.spec())
	if _, err := w.backend.Reprovision(ctx, req, protocol.MachineState{}); !errors.Is(err, errKilled) || crashing.ran != 1 {
		t.Fatalf("first attempt: %v (RunInstances ran %d times)", err, crashing.ran)
	}
	if n := len(w.fmInstances(t)); n != 1 {
		t.Fatalf("%d machines after the crash", n)
	}
	// A new provisioner gets the same request again.
	w.backend.connect = real
	st, err := w.backend.Reprovision(ctx, req, protocol.MachineState{Status: protocol.MachineProvisioning, RequestID: req.ID})
	if err != nil {
		t.Fatal(err)
	}
	insts := w.fmInstances(t)
	if len(insts) != 1 || aws.ToString(insts[0].InstanceId) != st.MachineID {
		t.Fatalf("after the retry: %d machines, state %s", len(insts), st.MachineID)
	}
	if !slices.ContainsFunc(w.progress, func(p string) bool { return strings.HasPrefix(p, "adopt:") }) {
		t.Errorf("the retry did not adopt the machine: %v", w.progress)
	}
	vols, _ := w.ec2.DescribeVolumes(ctx, &ec2.DescribeVolumesInput{Filters: []types.Filter{tagFilter(TagRole, roleData)}})
	if len(vols.Volumes) != 1 {
		t.Fatalf("%d data volumes", len(vols.Volumes))
	}
}

func TestBadInputChangesNothing(t *testing.T) {
	w := newWorld(t)
	for _, tc := range []struct {
		name   string
		mutate func(*protocol.MachineSpec)
		want   string
	}{
		{"unknown AMI", func(s *protocol.MachineSpec) { s.AMIs[mototest.Region] = "ami-00000000deadbeef0" }, "AMI ami-00000000deadbeef0 does not exist"},
		{"no AMI for the region", func(s *protocol.MachineSpec) { s.AMIs = map[string]string{"eu-west-3": "ami-1"} }, "no AMI for region us-east-1"},
		{"unknown type", func(s *protocol.MachineSpec) { s.InstanceType = "m5.huge" }, "instance type m5.huge does not exist"},
		{"unknown key pair", func(s *protocol.MachineSpec) { s.Access.KeyPairName = "nobody" }, "key pair nobody does not exist"},
		{"unknown VPC", func(s *protocol.MachineSpec) { s.Network.VpcID = "vpc-0000000000000dead" }, "VPC vpc-0000000000000dead does not exist"},
		{"unknown subnet", func(s *protocol.MachineSpec) { s.Network.SubnetID = "subnet-000000000000dead" }, "subnet subnet-000000000000dead does not exist"},
		{"six security groups", func(s *protocol.MachineSpec) {
			s.Network.AutoCreateSecurityGroups = false
			s.Network.SecurityGroups = []string{"sg-1", "sg-2", "sg-3", "sg-4", "sg-5", "sg-6"}
		}, "6 security groups"},
		{"four given and two made", func(s *protocol.MachineSpec) { s.Network.SecurityGroups = []string{"sg-1", "sg-2", "sg-3", "sg-4"} }, "at most 5"},
		{"an elastic IP without internet access", func(s *protocol.MachineSpec) { s.Network.InternetAccess = protocol.InternetAccessNo }, "no public address: an elastic IP"},
		{"an unknown internet access mode", func(s *protocol.MachineSpec) { s.Network.InternetAccess = "SOMETIMES" }, `internet access mode "SOMETIMES" is unknown`},
		{"a web port out of range", func(s *protocol.MachineSpec) { s.Network.WebPorts = []int{443, 70000} }, "web port 70000"},
		{"unknown security group", func(s *protocol.MachineSpec) {
			s.Network.AutoCreateSecurityGroups = false
			s.Network.SecurityGroups = []string{"sg-0000000000000dead"}
		}, "sg-0000000000000dead does not exist"},
		{"custom key missing", func(s *protocol.MachineSpec) { s.DataVolume.KMSKeyID = "" }, "needs a KMS key"},
		{"iops on gp2", func(s *protocol.MachineSpec) { s.DataVolume.Type = "gp2" }, "IOPS can only be set"},
		{"no agent download", func(s *protocol.MachineSpec) { s.Agent = nil }, "--advertise-url"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			spec := w.spec()
			tc.mutate(spec)
			_, err := w.backend.Reprovision(context.Background(), w.request("rq-bad", protocol.ProvisionReprovision, spec), protocol.MachineState{})
			if protocol.CodeOf(err) != protocol.CodeInvalidArgument || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want InvalidArgument with %q", err, tc.want)
			}
			ctx := context.Background()
			sgs, _ := w.ec2.DescribeSecurityGroups(ctx, &ec2.DescribeSecurityGroupsInput{Filters: []types.Filter{tagFilter(TagRole, roleSG)}})
			vols, _ := w.ec2.DescribeVolumes(ctx, &ec2.DescribeVolumesInput{Filters: []types.Filter{tagFilter(TagInstance, "in-analytics")}})
			addrs, _ := w.ec2.DescribeAddresses(ctx, &ec2.DescribeAddressesInput{})
			if n := len(w.fmInstances(t)) + len(sgs.SecurityGroups) + len(vols.Volumes) + len(addrs.Addresses); n != 0 {
				t.Fatalf("%d resources were made", n)
			}
		})
	}
	// Several problems are reported together.
	spec := w.spec()
	spec.InstanceType, spec.Access.KeyPairName = "m5.huge", "nobody"
	_, err := w.backend.Reprovision(context.Background(), w.request("rq-bad", protocol.ProvisionReprovision, spec), protocol.MachineState{})
	if err == nil || !strings.Contains(err.Error(), "m5.huge") || !strings.Contains(err.Error(), "nobody") {
		t.Fatalf("err = %v", err)
	}
}

// refusing is an EC2 that refuses one call, as IAM would.
type refusing struct{ ec2API }

func (r refusing) RunInstances(ctx context.Context, in *ec2.RunInstancesInput, o ...func(*ec2.Options)) (*ec2.RunInstancesOutput, error) {
	return nil, &smithy.OperationError{ServiceID: "EC2", OperationName: "RunInstances",
		Err: &smithy.GenericAPIError{Code: "UnauthorizedOperation", Message: "You are not authorized to perform this operation."}}
}

func TestPermissionRefusalNamesTheAction(t *testing.T) {
	w := newWorld(t)
	real := w.backend.connect
	w.backend.connect = func(ctx context.Context, region string, auth *protocol.CloudAuth) (clients, error) {
		c, err := real(ctx, region, auth)
		c.ec2 = refusing{ec2API: c.ec2}
		return c, err
	}
	_, err := w.backend.Reprovision(context.Background(), w.request("rq-1", protocol.ProvisionReprovision, w.spec()), protocol.MachineState{})
	if protocol.CodeOf(err) != protocol.CodePermissionDenied || !strings.Contains(err.Error(), "needs the IAM action ec2:RunInstances") {
		t.Fatalf("err = %v", err)
	}
}

func TestConfigAndCredentials(t *testing.T) {
	if _, err := New(Config{}); err == nil {
		t.Error("New accepted no bus URL")
	}
	if _, err := New(Config{AgentNATSURL: "nats://x:4222", IngressCIDRs: []string{"10.0.0.0/33"}}); err == nil {
		t.Error("New accepted a bad CIDR")
	}
	b, err := New(Config{AgentNATSURL: "nats://x:4222"})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for name, tc := range map[string]struct {
		auth *protocol.CloudAuth
		code protocol.Code
	}{
		"keypair without a secret key": {&protocol.CloudAuth{Mode: protocol.CloudAuthKeypair, AccessKeyID: "AKIA", SealedSecretAccessKey: "fmsealed1:x"}, protocol.CodeFailedPrecondition},
		"unknown mode":                 {&protocol.CloudAuth{Mode: "MAGIC"}, protocol.CodeInvalidArgument},
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := b.connect(ctx, "us-east-1", tc.auth); protocol.CodeOf(err) != tc.code {
				t.Fatalf("err = %v, want %s", err, tc.code)
			}
		})
	}
	if _, _, err := b.clientsFor(ctx, provisioner.Request{ProvisionRequest: protocol.ProvisionRequest{Spec: &protocol.MachineSpec{}}}, protocol.MachineState{}); protocol.CodeOf(err) != protocol.CodeInvalidArgument {
		t.Fatalf("no region: %v", err)
	}
}

// Every action runs as the request's identity: an assumed role (through
// moto's STS, with the cloud account's external id) or a key pair whose
// secret FM sealed.
func TestCloudIdentitiesOnMoto(t *testing.T) {
	w := newWorld(t)
	key := seal.NewKey()
	box, _ := seal.New(key)
	// What reaches STS, seen on the way to moto.
	var mu sync.Mutex
	var assumed []string
	target, err := url.Parse(w.moto.URL)
	if err != nil {
		t.Fatal(err)
	}
	forward := httputil.NewSingleHostReverseProxy(target)
	sts := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if form, err := url.ParseQuery(string(body)); err == nil && form.Get("Action") == "AssumeRole" {
			mu.Lock()
			assumed = append(assumed, form.Get("RoleArn")+" "+form.Get("ExternalId"))
			mu.Unlock()
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		forward.ServeHTTP(rw, r)
	}))
	t.Cleanup(sts.Close)
	b, err := New(Config{Region: mototest.Region, Endpoint: sts.URL, AgentNATSURL: "nats://fm:4222", OpenSecret: box.Open,
		Poll: 20 * time.Millisecond, Timeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	spec := w.spec()
	spec.ElasticIP, spec.Network.DNSStrategy = nil, "NONE"
	for _, auth := range []*protocol.CloudAuth{
		{Mode: protocol.CloudAuthIAMRole, RoleARN: "arn:aws:iam::123456789012:role/fm-tenant"},
		{Mode: protocol.CloudAuthIAMRole, RoleARN: "arn:aws:iam::123456789012:role/fm-account", ExternalID: "fm-0123abcd"},
		{Mode: protocol.CloudAuthKeypair, AccessKeyID: "AKIAIOSFODNN7EXAMPLE", SealedSecretAccessKey: box.Seal("wJalrXUtnFEMI", protocol.SealedCloudSecretPlace)},
	} {
		name := auth.Mode
		if auth.ExternalID != "" {
			name += "-external-id"
		}
		t.Run(name, func(t *testing.T) {
			req := w.request("rq-"+strings.ToLower(name), protocol.ProvisionReprovision, spec)
			req.Cloud = auth
			st, err := b.Reprovision(context.Background(), req, protocol.MachineState{})
			if err != nil {
				t.Fatal(err)
			}
			st.Instance = req.Instance // as the provisioner records it
			if alive, err := aliveOne(b, st); err != nil || !alive {
				t.Fatalf("alive = %v, %v", alive, err)
			}
			del := w.request("rq-del-"+strings.ToLower(name), protocol.ProvisionDelete, nil)
			del.Cloud = auth
			if _, err := b.Delete(context.Background(), del, st); err != nil {
				t.Fatal(err)
			}
		})
	}
	mu.Lock()
	got := slices.Clone(assumed)
	mu.Unlock()
	if !slices.Contains(got, "arn:aws:iam::123456789012:role/fm-account fm-0123abcd") ||
		!slices.Contains(got, "arn:aws:iam::123456789012:role/fm-tenant ") {
		t.Fatalf("roles assumed (ARN, external id): %q", got)
	}
	// A secret sealed with another key is refused before any call.
	req := w.request("rq-wrong-key", protocol.ProvisionReprovision, spec)
	other, _ := seal.New(seal.NewKey())
	req.Cloud = &protocol.CloudAuth{Mode: protocol.CloudAuthKeypair, AccessKeyID: "AKIAOTHER", SealedSecretAccessKey: other.Seal("x", protocol.SealedCloudSecretPlace)}
	if _, err := b.Reprovision(context.Background(), req, protocol.MachineState{}); protocol.CodeOf(err) != protocol.CodeFailedPrecondition {
		t.Fatalf("err = %v", err)
	}
}

// A web group made before (with only some of its rules, as by a provisioner
// that died halfway or an older FM) gets the missing ones.
func TestExistingWebGroupGetsMissingRules(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	g, err := w.ec2.CreateSecurityGroup(ctx, &ec2.CreateSecurityGroupInput{GroupName: aws.String("fm-vn-lab-web"),
		Description: aws.String("made before"), VpcId: aws.String(w.vpc)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.ec2.AuthorizeSecurityGroupIngress(ctx, &ec2.AuthorizeSecurityGroupIngressInput{GroupId: g.GroupId,
		IpPermissions: []types.IpPermission{{IpProtocol: aws.String("tcp"), FromPort: aws.Int32(22), ToPort: aws.Int32(22),
			IpRanges: []types.IpRange{{CidrIp: aws.String("203.0.113.0/24")}}}}}); err != nil {
		t.Fatal(err)
	}
	ids, err := w.backend.securityGroups(ctx, clients{ec2: w.ec2, dns: w.dns}, w.spec(), plan{}, func(string) {})
	if err != nil || !slices.Contains(ids, aws.ToString(g.GroupId)) {
		t.Fatalf("groups %v, %v (want the existing %s)", ids, err, aws.ToString(g.GroupId))
	}
	out, err := w.ec2.DescribeSecurityGroups(ctx, &ec2.DescribeSecurityGroupsInput{GroupIds: []string{aws.ToString(g.GroupId)}})
	if err != nil {
		t.Fatal(err)
	}
	var ports []int32
	for _, p := range out.SecurityGroups[0].IpPermissions {
		ports = append(ports, aws.ToInt32(p.FromPort))
	}
	slices.Sort(ports)
	if !slices.Equal(ports, []int32{22, 80, 443, 10000}) {
		t.Fatalf("ports = %v", ports)
	}
}

// aliveOne asks the backend about one machine.
func aliveOne(b *Backend, st protocol.MachineState) (bool, error) {
	m, err := b.Alive(context.Background(), []protocol.MachineState{st})
	return m[st.Instance], err
}

// TestTheOSDiskIsEncryptedWithTheDataVolume: the OS disk holds the agent's
// NATS credentials and the instance key; it is encrypted (with the data
// volume's key) whenever the data volume is, root-volume settings or not.
func TestTheOSDiskIsEncryptedWithTheDataVolume(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	spec := w.spec()
	spec.ElasticIP, spec.Network.DNSStrategy, spec.RootVolume = nil, "NONE", protocol.VolumeSpec{}
	st, err := w.backend.Reprovision(ctx, w.request("rq-1", protocol.ProvisionReprovision, spec), protocol.MachineState{})
	if err != nil {
		t.Fatal(err)
	}
	out, err := w.ec2.DescribeInstances(ctx, &ec2.DescribeInstancesInput{InstanceIds: []string{st.MachineID}})
	if err != nil || len(out.Reservations) != 1 || len(out.Reservations[0].Instances) != 1 {
		t.Fatalf("machine %s: %v", st.MachineID, err)
	}
	inst := out.Reservations[0].Instances[0]
	root := ""
	for _, m := range inst.BlockDeviceMappings {
		if aws.ToString(m.DeviceName) == aws.ToString(inst.RootDeviceName) && m.Ebs != nil {
			root = aws.ToString(m.Ebs.VolumeId)
		}
	}
	if root == "" {
		t.Fatalf("no root volume in %+v", inst.BlockDeviceMappings)
	}
	if v := w.volume(t, root); !aws.ToBool(v.Encrypted) || !strings.HasSuffix(aws.ToString(v.KmsKeyId), "11111111-2222-3333-4444-555555555555") {
		t.Fatalf("the OS disk is encrypted %v with key %s", aws.ToBool(v.Encrypted), aws.ToString(v.KmsKeyId))
	}
}
