package e2e

import (
	"context"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	elb "github.com/aws/aws-sdk-go-v2/service/elasticloadbalancingv2"
	"github.com/aws/aws-sdk-go-v2/service/iam"
	"github.com/fleetmanager/fm/internal/imdstest"
	"github.com/fleetmanager/fm/provisioner/ec2/mototest"
)

// TestTheRestOfFMOnAWS runs fm server and the EC2 provisioner on moto with
// what Dataiku's FM does on AWS beyond a plain machine, through the REST
// API as Dataiku's client sends it: a network without internet access,
// peered with FM's own VPC; a template whose machines boot with a startup
// instance profile swapped for the runtime one once DSS is set up, and
// whose DSS key pair is kept in AWS Secrets Manager; a gp3 volume's
// throughput; a load balancer mapping the instance, provisioned,
// deprovisioned and deleted.
func TestTheRestOfFMOnAWS(t *testing.T) {
	var fmVpc, fmSubnet, fmTable string
	w := startEC2FM(t, func(w *ec2FM) []string {
		fmVpc, fmSubnet, fmTable = mototest.MakeVPC(t, w.api, "10.42.0.0/16")
		return []string{"--default-vpc", fmVpc, "--default-subnet", fmSubnet, "--default-region", mototest.Region}
	})
	ctx := context.Background()
	py := &Python{Base: w.url, Client: TrustingClient(t, w.ca, time.Minute)}
	key := NewPython(t, w.url, filepath.Join(w.data, "admin-key.json"))
	py.KeyID, py.Secret = key.KeyID, key.Secret
	iamc := iam.NewFromConfig(w.cfg)
	profile := func(name string) string {
		out, err := iamc.CreateInstanceProfile(ctx, &iam.CreateInstanceProfileInput{InstanceProfileName: aws.String(name)})
		if err != nil {
			t.Fatal(err)
		}
		return aws.ToString(out.InstanceProfile.Arn)
	}
	startup, runtime := profile("dss-startup"), profile("dss-runtime")
	const secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
	w.moto.PutSecret(t, "dss/aws", `{"secretAccessKey":"`+secret+`"}`)

	do := func(method, path, body string) map[string]any {
		t.Helper()
		var out map[string]any
		if code := py.Do(t, method, path, body, &out); code != 200 {
			t.Fatalf("%s %s: %d %v", method, path, code, out)
		}
		return out
	}
	vn := do("POST", "/virtual-networks?useDefaultValues=False", fmt.Sprintf(`{"label": "private", "mode": "EXISTING_MONOTENANT",
		"internetAccessMode": "NO", "autoCreatePeerings": true, "awsVpcId": %q, "awsSubnetId": %q, "awsSecondSubnetId": %q,
		"awsRegion": %q, "awsAutoCreateSecurityGroups": true}`, w.vpc, w.subnet, w.subnets[1], mototest.Region))["id"].(string)
	tpl := do("POST", "/instance-settings-templates", fmt.Sprintf(`{"label": "aws", "startupInstanceProfileArn": %q, "runtimeInstanceProfileArn": %q,
		"dataikuAwsAPIAccessMode": "KEYPAIR", "dataikuAwsKeypairStorageMode": "AWS_SECRETS_MANAGER", "dataikuAwsAccessKeyId": "AKIAIOSFODNN7EXAMPLE",
		"dataikuAwsSecretAccessKeyAwsSecretName": "dss/aws", "awsSecretsManagerRegion": %q}`, startup, runtime, mototest.Region))["id"].(string)
	in := do("POST", "/instances", fmt.Sprintf(`{"label": "private1", "instanceSettingsTemplateId": %q, "virtualNetworkId": %q,
		"imageId": "dss-14.0.0-aws", "dssNodeType": "design", "dataVolumeThroughput": 250}`, tpl, vn))["id"].(string)
	op := do("GET", "/instances/"+in+"/actions/reprovision", "")

	vm := w.vm(in)
	if vm.PublicIpAddress != nil {
		t.Errorf("a machine of a network without internet access has the public address %s", aws.ToString(vm.PublicIpAddress))
	}
	var groups []string
	for _, g := range vm.SecurityGroups {
		groups = append(groups, aws.ToString(g.GroupName))
	}
	for _, ni := range vm.NetworkInterfaces {
		for _, g := range ni.Groups {
			groups = append(groups, aws.ToString(g.GroupName))
		}
	}
	if want := "fm-" + vn + "-web-p10000-private"; !strings.Contains(strings.Join(groups, " "), want) {
		t.Errorf("groups %v, want %s", groups, want)
	}
	agent, root := w.playMachine(vm, func(cfg map[string]any, imds *imdstest.IMDS) {
		cfg["secretsManagerEndpoint"] = w.moto.URL
		imds.SetProfile("dss-startup", `{"AccessKeyId":"ASIAEXAMPLE","SecretAccessKey":"profile-secret","Token":"tok"}`)
	})
	if res, code := py.wait(t, op); code != 200 || res["state"] != "succeeded" {
		t.Fatalf("reprovision: %d %v\n%s", code, res, tail(agent.Stderr(), 3000))
	}

	// The peering, active, with a route each way.
	peerings, err := w.api.DescribeVpcPeeringConnections(ctx, &ec2.DescribeVpcPeeringConnectionsInput{})
	if err != nil || len(peerings.VpcPeeringConnections) != 1 {
		t.Fatalf("peerings: %v %v", peerings, err)
	}
	pcx := peerings.VpcPeeringConnections[0]
	if pcx.Status.Code != types.VpcPeeringConnectionStateReasonCodeActive || aws.ToString(pcx.AccepterVpcInfo.VpcId) != fmVpc {
		t.Fatalf("peering %+v", pcx)
	}
	tables, err := w.api.DescribeRouteTables(ctx, &ec2.DescribeRouteTablesInput{RouteTableIds: []string{fmTable}})
	if err != nil || len(tables.RouteTables) != 1 {
		t.Fatal(err)
	}
	routed := false
	for _, r := range tables.RouteTables[0].Routes {
		routed = routed || aws.ToString(r.VpcPeeringConnectionId) == aws.ToString(pcx.VpcPeeringConnectionId)
	}
	if !routed {
		t.Fatalf("FM's route table has no route through the peering: %+v", tables.RouteTables[0].Routes)
	}
	// The gp3 volume's throughput.
	vols, err := w.api.DescribeVolumes(ctx, &ec2.DescribeVolumesInput{Filters: []types.Filter{{Name: aws.String("tag:fm:instance"), Values: []string{in}},
		{Name: aws.String("tag:fm:role"), Values: []string{"data"}}}})
	if err != nil || len(vols.Volumes) != 1 || aws.ToInt32(vols.Volumes[0].Throughput) != 250 {
		t.Fatalf("data volume: %+v %v", vols, err)
	}
	// DSS's key pair, read from Secrets Manager by the agent.
	me, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(root, "home", me.Username, ".aws", "credentials"))
	if err != nil || !strings.Contains(string(b), "aws_access_key_id = AKIAIOSFODNN7EXAMPLE\naws_secret_access_key = "+secret+"\n") {
		t.Fatalf("DSS's credentials: %q %v", b, err)
	}
	// The runtime profile, once DSS is set up.
	waitFor(t, time.Minute, "the runtime instance profile", func() bool {
		out, err := w.api.DescribeIamInstanceProfileAssociations(ctx, &ec2.DescribeIamInstanceProfileAssociationsInput{})
		if err != nil {
			return false
		}
		for _, a := range out.IamInstanceProfileAssociations {
			if aws.ToString(a.InstanceId) == aws.ToString(vm.InstanceId) && a.State == types.IamInstanceProfileAssociationStateAssociated {
				return aws.ToString(a.IamInstanceProfile.Arn) == runtime
			}
		}
		return false
	})

	// A load balancer mapping the instance, on the network's two subnets.
	lb := do("POST", "/load-balancers", fmt.Sprintf(`{"name": "front", "virtualNetworkId": %q, "azureAssignPublicIP": false, "publicIpMode": "NO_PUBLIC_IP",
		"nodes": [{"hostname": "dss.example.com", "instanceId": %q}]}`, vn, in))
	lbID := lb["id"].(string)
	lbAction := func(action string) {
		t.Helper()
		if res, code := py.wait(t, do("POST", "/load-balancers/"+lbID+"/actions/"+action, "")); code != 200 || res["state"] != "succeeded" {
			t.Fatalf("%s: %d %v\n%s", action, code, res, tail(w.prov.Stderr(), 3000))
		}
	}
	lbAction("provision")
	elbc := elb.NewFromConfig(w.cfg)
	albs, err := elbc.DescribeLoadBalancers(ctx, &elb.DescribeLoadBalancersInput{})
	if err != nil || len(albs.LoadBalancers) != 1 || albs.LoadBalancers[0].Scheme != "internal" || len(albs.LoadBalancers[0].AvailabilityZones) != 2 {
		t.Fatalf("load balancers: %+v %v", albs, err)
	}
	tgs, err := elbc.DescribeTargetGroups(ctx, &elb.DescribeTargetGroupsInput{})
	if err != nil || len(tgs.TargetGroups) != 1 {
		t.Fatalf("target groups: %+v %v", tgs, err)
	}
	// The instance cannot be deleted while the load balancer uses it.
	var refused map[string]any
	if code := py.Do(t, "GET", "/instances/"+in+"/actions/delete", "", &refused); code < 400 {
		t.Fatalf("an instance of a load balancer deleted: %d %v", code, refused)
	}
	lbAction("deprovision")
	if albs, err := elbc.DescribeLoadBalancers(ctx, &elb.DescribeLoadBalancersInput{}); err != nil || len(albs.LoadBalancers) != 0 {
		t.Fatalf("load balancers after deprovision: %+v %v", albs, err)
	}
	if tgs, err := elbc.DescribeTargetGroups(ctx, &elb.DescribeTargetGroupsInput{}); err != nil || len(tgs.TargetGroups) != 0 {
		t.Fatalf("target groups after deprovision: %+v %v", tgs, err)
	}
	do("DELETE", "/load-balancers/"+lbID, "")
	for _, p := range []*Proc{agent, w.prov, w.server} {
		if err := p.Interrupt(30 * time.Second); err != nil {
			t.Fatal(err)
		}
	}
}
