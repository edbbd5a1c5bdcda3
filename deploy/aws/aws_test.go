package aws

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
)

const templatePath = "fm.yaml"

// needCfnLint skips the test on a machine without cfn-lint, unless
// FM_REQUIRE_CFN_LINT is set (CI sets it), where it fails: cfn-lint comes
// with the machine's Python, as moto does.
func needCfnLint(t *testing.T) {
	t.Helper()
	_, errBin := exec.LookPath("cfn-lint")
	errMod := exec.Command("python3", "-c", "import cfnlint.decode").Run()
	if errBin == nil && errMod == nil {
		return
	}
	msg := fmt.Sprintf("cfn-lint is needed (cfn-lint on PATH: %v; python3 -c 'import cfnlint': %v)", errBin, errMod)
	if os.Getenv("FM_REQUIRE_CFN_LINT") != "" {
		t.Fatal(msg + "; FM_REQUIRE_CFN_LINT is set")
	}
	t.Skip(msg + "; set FM_REQUIRE_CFN_LINT=1 to fail instead")
}

// TestTemplateLints: cfn-lint, with its informational checks too, finds
// nothing. A check that must be silenced is silenced on its resource
// (Metadata cfn-lint), never here.
func TestTemplateLints(t *testing.T) {
	t.Parallel()
	needCfnLint(t)
	out, err := exec.Command("cfn-lint", templatePath, "--include-checks", "I").CombinedOutput()
	if err != nil {
		t.Fatalf("cfn-lint %s: %v\n%s", templatePath, err, out)
	}
}

// loadTemplate is fm.yaml in its long form (Fn::Sub, Ref...), as JSON
// decodes it: cfn-lint's decoder reads the short-form tags, which no YAML
// module of go.mod knows.
func loadTemplate(t *testing.T) map[string]any {
	t.Helper()
	needCfnLint(t)
	// Python takes seconds to load cfn-lint: the template is decoded once,
	// and each test gets its own copy.
	decoded.once.Do(func() { decoded.json, decoded.err = decodeTemplate() })
	if decoded.err != nil {
		t.Fatal(decoded.err)
	}
	var tmpl map[string]any
	if err := json.Unmarshal(decoded.json, &tmpl); err != nil {
		t.Fatal(err)
	}
	return tmpl
}

var decoded struct {
	once sync.Once
	json []byte
	err  error
}

func decodeTemplate() ([]byte, error) {
	const script = `import json, sys
from cfnlint.decode import decode
tmpl, matches = decode(sys.argv[1])
if matches:
    sys.exit("\n".join(str(m) for m in matches))
json.dump(tmpl, sys.stdout)`
	var stderr bytes.Buffer
	cmd := exec.Command("python3", "-c", script, templatePath)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("decode %s: %v\n%s", templatePath, err, stderr.Bytes())
	}
	return out, nil
}

// get walks a decoded template: keys of maps, indexes ("0") of lists.
func get(t *testing.T, v any, path ...string) any {
	t.Helper()
	for i, p := range path {
		switch x := v.(type) {
		case map[string]any:
			var ok bool
			if v, ok = x[p]; !ok {
				t.Fatalf("the template has no %s", strings.Join(path[:i+1], "."))
			}
		case []any:
			var n int
			if _, err := fmt.Sscan(p, &n); err != nil || n >= len(x) {
				t.Fatalf("the template has no %s", strings.Join(path[:i+1], "."))
			}
			v = x[n]
		default:
			t.Fatalf("the template has no %s", strings.Join(path[:i+1], "."))
		}
	}
	return v
}

// TestTemplateMachine: what moto's CloudFormation does not keep (an
// instance's metadata options and disks, a volume's type and encryption)
// or does not know (Data Lifecycle Manager) is checked in the template.
func TestTemplateMachine(t *testing.T) {
	t.Parallel()
	tmpl := loadTemplate(t)
	for _, tc := range []struct {
		path []string
		want string // as JSON
	}{
		{[]string{"Resources", "Instance", "Properties", "MetadataOptions", "HttpTokens"}, `"required"`},
		{[]string{"Resources", "Instance", "Properties", "IamInstanceProfile"}, `{"Ref":"InstanceProfile"}`},
		{[]string{"Resources", "Instance", "Properties", "BlockDeviceMappings"},
			`[{"DeviceName":"/dev/xvda","Ebs":{"DeleteOnTermination":true,"Encrypted":true,"VolumeSize":20,"VolumeType":"gp3"}}]`},
		{[]string{"Resources", "Instance", "Properties", "KeyName"}, `{"Fn::If":["HasKeyName",{"Ref":"KeyName"},{"Ref":"AWS::NoValue"}]}`},
		{[]string{"Resources", "InstanceProfile", "Properties", "Roles"}, `[{"Ref":"Role"}]`},
		{[]string{"Resources", "DataVolume", "Properties", "VolumeType"}, `"gp3"`},
		{[]string{"Resources", "DataVolume", "Properties", "Encrypted"}, `true`},
		{[]string{"Resources", "DataVolume", "Properties", "Size"}, `{"Ref":"DataVolumeSize"}`},
		{[]string{"Resources", "DataVolume", "DeletionPolicy"}, `"Snapshot"`},
		{[]string{"Resources", "DataVolume", "Properties", "Tags", "1"}, `{"Key":"FleetManagerDataVolume","Value":{"Ref":"AWS::StackName"}}`},
		{[]string{"Resources", "DataVolumeAttachment", "Properties", "Device"}, `"/dev/sdf"`},
		{[]string{"Resources", "SnapshotPolicy", "Properties", "PolicyDetails", "TargetTags"}, `[{"Key":"FleetManagerDataVolume","Value":{"Ref":"AWS::StackName"}}]`},
		{[]string{"Resources", "SnapshotPolicy", "Properties", "PolicyDetails", "ResourceTypes"}, `["VOLUME"]`},
		{[]string{"Resources", "SnapshotPolicy", "Properties", "PolicyDetails", "Schedules", "0", "CreateRule"}, `{"Interval":24,"IntervalUnit":"HOURS","Times":["03:00"]}`},
		{[]string{"Resources", "SnapshotPolicy", "Properties", "PolicyDetails", "Schedules", "0", "RetainRule"}, `{"Count":7}`},
		{[]string{"Resources", "SnapshotPolicy", "Properties", "ExecutionRoleArn"}, `{"Fn::GetAtt":["SnapshotRole","Arn"]}`},
		{[]string{"Resources", "SnapshotRole", "Properties", "AssumeRolePolicyDocument", "Statement"},
			`[{"Action":"sts:AssumeRole","Effect":"Allow","Principal":{"Service":"dlm.amazonaws.com"}}]`},
		{[]string{"Resources", "SnapshotRole", "Properties", "ManagedPolicyArns"},
			`[{"Fn::Sub":"arn:${AWS::Partition}:iam::aws:policy/service-role/AWSDataLifecycleManagerServiceRole"}]`},
		{[]string{"Parameters", "ImageId"}, `{"Default":"/aws/service/debian/release/12/latest/amd64","Description":"SSM parameter naming the AMI (Debian 12, amd64, root device /dev/xvda).","Type":"AWS::SSM::Parameter::Value\u003cAWS::EC2::Image::Id\u003e"}`},
	} {
		got, _ := json.Marshal(get(t, tmpl, tc.path...))
		if string(got) != tc.want {
			t.Errorf("%s is\n  %s\nwant\n  %s", strings.Join(tc.path, "."), got, tc.want)
		}
	}
}

// userData is the instance's script with the template's substitutions
// made from params (and FMPackageURL, the package's URL).
func userData(t *testing.T, tmpl map[string]any, params map[string]string) string {
	t.Helper()
	sub := get(t, tmpl, "Resources", "Instance", "Properties", "UserData", "Fn::Base64", "Fn::Sub").([]any)
	script := sub[0].(string)
	// Bash's own ${…} would have to be written ${!…} for CloudFormation:
	// the script has none, so every ${…} is a substitution.
	return regexp.MustCompile(`\$\{([^}]*)\}`).ReplaceAllStringFunc(script, func(m string) string {
		v, ok := params[m[2:len(m)-1]]
		if !ok {
			t.Errorf("the user data substitutes %s, which the test does not know", m)
		}
		return v
	})
}

// TestUserData: the first boot's script parses, and does its steps in the
// order FM needs them: the data volume mounted before the package makes
// /var/lib/fm's folders, the units configured before they first start (the
// server's certificate is made then), the provisioner started once the
// server answers, since it mints its bus credentials with the server's key.
func TestUserData(t *testing.T) {
	t.Parallel()
	tmpl := loadTemplate(t)
	script := userData(t, tmpl, map[string]string{
		"AWS::StackName": "fm-test", "AWS::Region": "eu-west-3", "VpcId": "vpc-0123", "SubnetId": "subnet-0456",
		"AllowedCidr": "203.0.113.0/24", "FMPackageURL": "https://example.com/fm_1.2.3_amd64.deb",
		"PackageSHA256": strings.Repeat("ab", 32),
	})
	path := filepath.Join(t.TempDir(), "user-data.sh")
	if err := os.WriteFile(path, []byte(script), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("bash", "-n", path).CombinedOutput(); err != nil {
		t.Fatalf("the user data is not bash: %v\n%s", err, out)
	}
	steps := []string{
		"#!/bin/bash\n",
		"set -Eeuo pipefail",
		"/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol",
		`if [ -z "$(blkid -o value -s TYPE "$disk" || true)" ]; then`,
		"mkfs.ext4 -q -L fm-data \"$disk\"",
		"UUID=$uuid /var/lib/fm ext4 defaults,nofail 0 2\" >>/etc/fstab",
		"mountpoint -q /var/lib/fm || mount /var/lib/fm",
		"chown root:root /var/lib/fm\nchmod 0755 /var/lib/fm\n",
		"RequiresMountsFor=/var/lib/fm",
		"curl -fsSL --retry 5 --retry-connrefused -o fm.deb 'https://example.com/fm_1.2.3_amd64.deb'",
		"echo '" + strings.Repeat("ab", 32) + "  fm.deb' | sha256sum --check --strict -",
		"exit 101\\n' >/usr/sbin/policy-rc.d",
		"apt-get install -y -q ./fm.deb",
		"then rm -f /usr/sbin/policy-rc.d; fi\nchmod 0755 /var/lib/fm\n",
		`setenv /etc/fm/server.env FM_ADVERTISE_URL "https://$private_ip:10000"`,
		`setenv /etc/fm/server.env FM_TLS_HOSTS "$tls_hosts"`,
		`setenv /etc/fm/server.env FM_DEFAULT_VPC 'vpc-0123'`,
		`setenv /etc/fm/server.env FM_DEFAULT_SUBNET 'subnet-0456'`,
		`setenv /etc/fm/server.env FM_DEFAULT_REGION 'eu-west-3'`,
		`setenv /etc/fm/provisioner.env FM_EC2_REGION 'eu-west-3'`,
		`setenv /etc/fm/provisioner.env FM_AGENT_NATS_URL "tls://$private_ip:4222"`,
		`setenv /etc/fm/provisioner.env FM_EC2_INGRESS_CIDRS '203.0.113.0/24'`,
		"systemctl enable --now fm-server.service",
		"https://127.0.0.1:10000/healthz",
		"systemctl enable --now fm-provisioner.service",
	}
	// Each step once, so that its place is the one it is done at.
	at := 0
	for _, s := range steps {
		switch n := strings.Count(script, s); {
		case n == 0:
			t.Fatalf("the user data lacks %q", s)
		case n > 1:
			t.Fatalf("the user data does %q %d times, want once", s, n)
		}
		i := strings.Index(script[at:], s)
		if i < 0 {
			t.Fatalf("the user data does %q too early: the steps are, in order:\n%s", s, strings.Join(steps, "\n"))
		}
		at += i + len(s)
	}
	for _, s := range []string{"X-aws-ec2-metadata-token: $token", "meta-data/local-ipv4", "public-hostname"} {
		if !strings.Contains(script, s) && !strings.Contains(script, strings.TrimPrefix(s, "meta-data/")) {
			t.Errorf("the user data lacks %q (IMDSv2)", s)
		}
	}

	pkg, _ := json.Marshal(get(t, tmpl, "Resources", "Instance", "Properties", "UserData", "Fn::Base64", "Fn::Sub", "1", "FMPackageURL"))
	if want := `{"Fn::If":["HasPackageURL",{"Ref":"PackageURL"},{"Fn::Sub":"https://github.com/fleetmanager/fm/releases/download/v${FMVersion}/fm_${FMVersion}_amd64.deb"}]}`; string(pkg) != want {
		t.Errorf("the package's URL is\n  %s\nwant\n  %s", pkg, want)
	}
}
