package aws

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/cloudformation"
	cfntypes "github.com/aws/aws-sdk-go-v2/service/cloudformation/types"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	ec2types "github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/aws/aws-sdk-go-v2/service/iam"

	"github.com/fleetmanager/fm/provisioner/ec2/mototest"
)

// motoImageParameter is the SSM parameter that names moto's AMI, as
// /aws/service/debian/release/12/latest/amd64 names Debian's in AWS.
const motoImageParameter = "/fm-test/debian-12"

// moto is a moto server with the clients the stack test uses.
type moto struct {
	srv *mototest.Server
	cfn *cloudformation.Client
	ec2 *ec2.Client
	iam *iam.Client
}

func newMoto(t *testing.T) *moto {
	t.Helper()
	srv := mototest.Run(t)
	cfg, err := config.LoadDefaultConfig(context.Background(), config.WithRegion(mototest.Region), config.WithBaseEndpoint(srv.URL),
		config.WithCredentialsProvider(credentials.NewStaticCredentialsProvider("testing", "testing", "")),
		config.WithSharedConfigFiles(nil), config.WithSharedCredentialsFiles(nil))
	if err != nil {
		t.Fatal(err)
	}
	return &moto{srv: srv, cfn: cloudformation.NewFromConfig(cfg), ec2: ec2.NewFromConfig(cfg), iam: iam.NewFromConfig(cfg)}
}

// putParameter makes an SSM parameter, as the public
// /aws/service/debian/… one stands in AWS (moto has no Debian's, and
// refuses /aws/ names). A plain JSON call: the SDK's SSM module is not one
// of FM's.
func (m *moto) putParameter(t *testing.T, name, value string) {
	t.Helper()
	body, _ := json.Marshal(map[string]any{"Name": name, "Value": value, "Type": "String", "DataType": "aws:ec2:image"})
	req, _ := http.NewRequest(http.MethodPost, m.srv.URL+"/", bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/x-amz-json-1.1")
	req.Header.Set("X-Amz-Target", "AmazonSSM.PutParameter")
	req.Header.Set("Authorization", "AWS4-HMAC-SHA256 Credential=testing/20250101/"+mototest.Region+"/ssm/aws4_request, SignedHeaders=host, Signature=0")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var b bytes.Buffer
		_, _ = b.ReadFrom(resp.Body)
		t.Fatalf("SSM PutParameter %s: %s %s", name, resp.Status, b.String())
	}
}

// createStack creates the stack and waits, polling, for it to be made.
func (m *moto) createStack(t *testing.T, name string, params map[string]string) map[string]cfntypes.StackResource {
	t.Helper()
	ctx := context.Background()
	body, err := os.ReadFile(templatePath)
	if err != nil {
		t.Fatal(err)
	}
	// moto resolves an SSM-typed parameter's default even when a value is
	// given, and has no Debian parameter (nor lets one be put under /aws/):
	// the default is moto's parameter, for moto alone.
	const debian = "Default: /aws/service/debian/release/12/latest/amd64\n"
	if n := strings.Count(string(body), debian); n != 1 {
		t.Fatalf("%s has %q %d times, want once", templatePath, debian, n)
	}
	tmpl := strings.Replace(string(body), debian, "Default: "+motoImageParameter+"\n", 1)
	in := &cloudformation.CreateStackInput{StackName: aws.String(name), TemplateBody: aws.String(tmpl),
		Capabilities: []cfntypes.Capability{cfntypes.CapabilityCapabilityIam}}
	for k, v := range params {
		in.Parameters = append(in.Parameters, cfntypes.Parameter{ParameterKey: aws.String(k), ParameterValue: aws.String(v)})
	}
	if _, err := m.cfn.CreateStack(ctx, in); err != nil {
		t.Fatalf("create stack %s: %v", name, err)
	}
	deadline := time.Now().Add(time.Minute)
	for {
		out, err := m.cfn.DescribeStacks(ctx, &cloudformation.DescribeStacksInput{StackName: aws.String(name)})
		if err != nil {
			t.Fatal(err)
		}
		st := out.Stacks[0]
		if st.StackStatus == cfntypes.StackStatusCreateComplete {
			break
		}
		if !strings.HasSuffix(string(st.StackStatus), "_IN_PROGRESS") {
			t.Fatalf("stack %s: %s: %s", name, st.StackStatus, aws.ToString(st.StackStatusReason))
		}
		if time.Now().After(deadline) {
			t.Fatalf("stack %s still %s after a minute", name, st.StackStatus)
		}
		time.Sleep(200 * time.Millisecond)
	}
	out, err := m.cfn.DescribeStackResources(ctx, &cloudformation.DescribeStackResourcesInput{StackName: aws.String(name)})
	if err != nil {
		t.Fatal(err)
	}
	res := map[string]cfntypes.StackResource{}
	for _, r := range out.StackResources {
		res[aws.ToString(r.LogicalResourceId)] = r
	}
	return res
}

func (m *moto) outputs(t *testing.T, name string) map[string]string {
	t.Helper()
	out, err := m.cfn.DescribeStacks(context.Background(), &cloudformation.DescribeStacksInput{StackName: aws.String(name)})
	if err != nil {
		t.Fatal(err)
	}
	o := map[string]string{}
	for _, x := range out.Stacks[0].Outputs {
		o[aws.ToString(x.OutputKey)] = aws.ToString(x.OutputValue)
	}
	return o
}

// TestStackOnMoto creates the stack on moto's CloudFormation, with every
// option and with none, and looks at what it made through the EC2 and IAM
// APIs. What moto's CloudFormation drops (metadata options, disks, volume
// type and encryption, the instance's security groups) or lacks (DLM) is
// TestTemplateMachine's.
func TestStackOnMoto(t *testing.T) {
	t.Parallel()
	needCfnLint(t) // the role's policy is compared with docs/ec2.md's through the template's
	m := newMoto(t)
	ctx := context.Background()
	vpc, subnet, _ := mototest.MakeVPC(t, m.ec2, "10.20.0.0/16")
	images, err := m.ec2.DescribeImages(ctx, &ec2.DescribeImagesInput{Owners: []string{"amazon"}})
	if err != nil || len(images.Images) == 0 {
		t.Fatalf("moto has no AMI: %v", err)
	}
	ami := aws.ToString(images.Images[0].ImageId)
	m.putParameter(t, motoImageParameter, ami)
	if _, err := m.ec2.CreateKeyPair(ctx, &ec2.CreateKeyPairInput{KeyName: aws.String("ops")}); err != nil {
		t.Fatal(err)
	}
	docs := docsPolicy(t)
	s3 := s3Actions(t)

	type rule struct {
		port int32
		cidr string
	}
	for _, tc := range []struct {
		name    string
		params  map[string]string
		pkg     string
		rules   []rule
		key     string
		buckets bool
	}{
		{
			name: "every option",
			params: map[string]string{"MachinesCidr": "10.0.0.0/8", "KeyName": "ops", "InstanceType": "m5.xlarge", "FMVersion": "1.2.3",
				"PackageURL": "https://downloads.example.com/fm_1.2.3-rc1_amd64.deb", "DataVolumeSize": "64", "SnapshotBucket": "fm-archives",
				"RoleNamePattern": "fleet/fm-*"},
			pkg:     "https://downloads.example.com/fm_1.2.3-rc1_amd64.deb",
			rules:   []rule{{22, "203.0.113.0/24"}, {4222, "10.0.0.0/8"}, {4222, "203.0.113.0/24"}, {10000, "10.0.0.0/8"}, {10000, "203.0.113.0/24"}},
			key:     "ops",
			buckets: true,
		},
		{
			name:   "no option",
			params: map[string]string{},
			pkg:    "https://github.com/fleetmanager/fm/releases/download/v1.0.0/fm_1.0.0_amd64.deb",
			rules:  []rule{{4222, "203.0.113.0/24"}, {10000, "203.0.113.0/24"}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stack := "fm-" + strings.ReplaceAll(tc.name, " ", "-")
			params := map[string]string{"VpcId": vpc, "SubnetId": subnet, "AllowedCidr": "203.0.113.0/24", "ImageId": motoImageParameter}
			for k, v := range tc.params {
				params[k] = v
			}
			res := m.createStack(t, stack, params)
			id := func(logical string) string {
				r, ok := res[logical]
				if !ok {
					t.Fatalf("stack %s has no %s", stack, logical)
				}
				return aws.ToString(r.PhysicalResourceId)
			}

			// The role: docs/ec2.md's policy and, with a bucket, its S3 grant.
			role := id("Role")
			names, err := m.iam.ListRolePolicies(ctx, &iam.ListRolePoliciesInput{RoleName: aws.String(role)})
			if err != nil {
				t.Fatal(err)
			}
			wantNames := []string{"fleet-manager"}
			if tc.buckets {
				wantNames = append(wantNames, "fleet-manager-snapshot-bucket")
			}
			slices.Sort(names.PolicyNames)
			if !slices.Equal(names.PolicyNames, wantNames) {
				t.Errorf("role %s has inline policies %v, want %v", role, names.PolicyNames, wantNames)
			}
			attached, err := m.iam.ListAttachedRolePolicies(ctx, &iam.ListAttachedRolePoliciesInput{RoleName: aws.String(role)})
			if err != nil || len(attached.AttachedPolicies) != 0 {
				t.Errorf("role %s has managed policies %v (%v), want none", role, attached, err)
			}
			// docs/ec2.md's policy, with the roles FM may pass and assume
			// narrowed to RoleNamePattern when given.
			want := docs
			if p, ok := tc.params["RoleNamePattern"]; ok {
				b, _ := json.Marshal(docs)
				var narrowed []any // not into want: it shares docs' array
				if err := json.Unmarshal([]byte(strings.ReplaceAll(string(b), `"arn:aws:iam::*:role/*"`, `"arn:aws:iam::*:role/`+p+`"`)), &narrowed); err != nil {
					t.Fatal(err)
				}
				want = narrowed
			}
			if got := m.rolePolicy(t, role, "fleet-manager"); len(comparePolicies(want, got)) > 0 {
				t.Errorf("role %s's policy on moto is not docs/ec2.md's:\n%s", role, strings.Join(comparePolicies(want, got), "\n"))
			}
			if tc.buckets {
				got := m.rolePolicy(t, role, "fleet-manager-snapshot-bucket")
				want := []any{map[string]any{"Sid": "FleetManagerSnapshotArchives", "Effect": "Allow", "Action": toAny(s3), "Resource": "arn:aws:s3:::fm-archives/*"}}
				if p := comparePolicies(want, got); len(p) > 0 {
					t.Errorf("role %s's bucket policy on moto:\n%s", role, strings.Join(p, "\n"))
				}
			}

			// The instance profile holds the role, and the instance has it.
			profile := id("InstanceProfile")
			ip, err := m.iam.GetInstanceProfile(ctx, &iam.GetInstanceProfileInput{InstanceProfileName: aws.String(profile)})
			if err != nil {
				t.Fatal(err)
			}
			if len(ip.InstanceProfile.Roles) != 1 || aws.ToString(ip.InstanceProfile.Roles[0].RoleName) != role {
				t.Errorf("instance profile %s holds %v, want role %s alone", profile, ip.InstanceProfile.Roles, role)
			}

			// The security group's rules.
			sgID := id("SecurityGroup")
			sgs, err := m.ec2.DescribeSecurityGroups(ctx, &ec2.DescribeSecurityGroupsInput{GroupIds: []string{sgID}})
			if err != nil {
				t.Fatal(err)
			}
			sg := sgs.SecurityGroups[0]
			if aws.ToString(sg.VpcId) != vpc {
				t.Errorf("security group %s is in %s, want %s", sgID, aws.ToString(sg.VpcId), vpc)
			}
			var rules []rule
			for _, p := range sg.IpPermissions {
				if aws.ToString(p.IpProtocol) != "tcp" || aws.ToInt32(p.FromPort) != aws.ToInt32(p.ToPort) {
					t.Errorf("security group %s lets in %+v", sgID, p)
				}
				for _, r := range p.IpRanges {
					rules = append(rules, rule{aws.ToInt32(p.FromPort), aws.ToString(r.CidrIp)})
				}
			}
			slices.SortFunc(rules, func(a, b rule) int {
				if a.port != b.port {
					return int(a.port - b.port)
				}
				return strings.Compare(a.cidr, b.cidr)
			})
			if !slices.Equal(rules, tc.rules) {
				t.Errorf("security group %s lets in %v, want %v", sgID, rules, tc.rules)
			}

			// The instance.
			instID := id("Instance")
			out, err := m.ec2.DescribeInstances(ctx, &ec2.DescribeInstancesInput{InstanceIds: []string{instID}})
			if err != nil {
				t.Fatal(err)
			}
			inst := out.Reservations[0].Instances[0]
			wantType := tc.params["InstanceType"]
			if wantType == "" {
				wantType = "m5.large"
			}
			if inst.IamInstanceProfile == nil || !strings.HasSuffix(aws.ToString(inst.IamInstanceProfile.Arn), "/"+profile) {
				t.Errorf("instance %s has profile %+v, want %s", instID, inst.IamInstanceProfile, profile)
			}
			if aws.ToString(inst.ImageId) != ami || string(inst.InstanceType) != wantType || aws.ToString(inst.KeyName) != tc.key ||
				aws.ToString(inst.SubnetId) != subnet {
				t.Errorf("instance %s: image %s, type %s, key %q, subnet %s; want %s (the SSM parameter's), %s, %q, %s", instID,
					aws.ToString(inst.ImageId), inst.InstanceType, aws.ToString(inst.KeyName), aws.ToString(inst.SubnetId), ami, wantType, tc.key, subnet)
			}
			attr, err := m.ec2.DescribeInstanceAttribute(ctx, &ec2.DescribeInstanceAttributeInput{InstanceId: aws.String(instID), Attribute: ec2types.InstanceAttributeNameUserData})
			if err != nil || attr.UserData == nil {
				t.Fatalf("user data of %s: %v", instID, err)
			}
			ud, err := base64.StdEncoding.DecodeString(aws.ToString(attr.UserData.Value))
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range []string{"-o fm.deb '" + tc.pkg + "'", "FM_DEFAULT_VPC '" + vpc + "'", "FM_DEFAULT_SUBNET '" + subnet + "'",
				"FM_DEFAULT_REGION '" + mototest.Region + "'", "FM_EC2_INGRESS_CIDRS '203.0.113.0/24'"} {
				if !bytes.Contains(ud, []byte(s)) {
					t.Errorf("the user data of %s lacks %q:\n%s", instID, s, ud)
				}
			}
			if bytes.Contains(ud, []byte("${")) {
				t.Errorf("the user data of %s has a substitution left:\n%s", instID, ud)
			}

			// The data volume: its size, in the instance's zone, attached at /dev/sdf.
			volID := id("DataVolume")
			vols, err := m.ec2.DescribeVolumes(ctx, &ec2.DescribeVolumesInput{VolumeIds: []string{volID}})
			if err != nil {
				t.Fatal(err)
			}
			vol := vols.Volumes[0]
			wantSize := int32(50)
			if tc.params["DataVolumeSize"] == "64" {
				wantSize = 64
			}
			if aws.ToInt32(vol.Size) != wantSize || aws.ToString(vol.AvailabilityZone) != aws.ToString(inst.Placement.AvailabilityZone) {
				t.Errorf("volume %s: %d GiB in %s, want %d GiB in %s", volID, aws.ToInt32(vol.Size), aws.ToString(vol.AvailabilityZone),
					wantSize, aws.ToString(inst.Placement.AvailabilityZone))
			}
			if len(vol.Attachments) != 1 || aws.ToString(vol.Attachments[0].InstanceId) != instID || aws.ToString(vol.Attachments[0].Device) != "/dev/sdf" {
				t.Errorf("volume %s is attached %+v, want to %s at /dev/sdf", volID, vol.Attachments, instID)
			}

			// The outputs.
			o := m.outputs(t, stack)
			roleOut, err := m.iam.GetRole(ctx, &iam.GetRoleInput{RoleName: aws.String(role)})
			if err != nil {
				t.Fatal(err)
			}
			for k, want := range map[string]string{
				"URL":             "https://" + aws.ToString(inst.PrivateIpAddress) + ":10000",
				"InstanceId":      instID,
				"SecurityGroupId": sgID,
				"RoleArn":         aws.ToString(roleOut.Role.Arn),
				"DataVolumeId":    volID,
			} {
				if o[k] != want {
					t.Errorf("output %s is %q, want %q", k, o[k], want)
				}
			}
			if !strings.Contains(o["AdminKey"], "/var/lib/fm/server/admin-key.json on "+instID) {
				t.Errorf("output AdminKey is %q", o["AdminKey"])
			}
			if tc.key != "" && !strings.Contains(o["AdminKey"], "ssh -i ops.pem") {
				t.Errorf("output AdminKey is %q, want how to ssh in with key ops", o["AdminKey"])
			}
		})
	}
}

func toAny(s []string) []any {
	out := make([]any, len(s))
	for i, x := range s {
		out[i] = x
	}
	return out
}

// rolePolicy is an inline policy of a role as IAM gives it back.
func (m *moto) rolePolicy(t *testing.T, role, name string) []any {
	t.Helper()
	out, err := m.iam.GetRolePolicy(context.Background(), &iam.GetRolePolicyInput{RoleName: aws.String(role), PolicyName: aws.String(name)})
	if err != nil {
		t.Fatalf("policy %s of role %s: %v", name, role, err)
	}
	doc, err := url.QueryUnescape(aws.ToString(out.PolicyDocument))
	if err != nil {
		doc = aws.ToString(out.PolicyDocument)
	}
	if !json.Valid([]byte(doc)) {
		// moto's CloudFormation stores a role's Policies as Python's repr
		// of the document, not as JSON as IAM does.
		cmd := exec.Command("python3", "-c", "import ast, json, sys; json.dump(ast.literal_eval(sys.stdin.read()), sys.stdout)")
		cmd.Stdin = strings.NewReader(doc)
		if out, err := cmd.Output(); err == nil {
			doc = string(out)
		}
	}
	var p struct {
		Version   string
		Statement []any
	}
	if err := json.Unmarshal([]byte(doc), &p); err != nil {
		t.Fatalf("policy %s of role %s: %v\n%s", name, role, err, doc)
	}
	if p.Version != "2012-10-17" {
		t.Errorf("policy %s of role %s has version %q", name, role, p.Version)
	}
	return p.Statement
}
