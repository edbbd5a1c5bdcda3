package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"os/user"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/fleetmanager/fm/deploy/cloudinit"
	"github.com/fleetmanager/fm/deploy/standin/kit"
	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/fleetmanager/fm/internal/imdstest"
	"github.com/fleetmanager/fm/provisioner/ec2/mototest"
)

// TestEC2MachineJoinsFM runs fm server and fm provisioner --backend ec2
// against moto. moto boots nothing, so the test plays the machine: it takes
// the user data moto was given, checks the binary it would download, and
// runs the agent with the config (and join token) written there. The
// instance then reaches running through FM, and a deprovision terminates
// the VM and keeps its data volume.
func TestEC2MachineJoinsFM(t *testing.T) {
	moto := mototest.Run(t)
	bin := fmBin(t)
	tmp := t.TempDir()
	data := filepath.Join(tmp, "fm")
	addr, natsAddr := FreePort(t), FreePort(t)
	// AWS's key, which signs machines' identity documents: FM joins the
	// machine only with the document of the one launched for its token.
	awsKey := imdstest.NewSigner(t)
	certs := filepath.Join(tmp, "aws-identity.pem")
	if err := os.WriteFile(certs, awsKey.CertPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	server := Start(t, bin, nil, "server", "--data", data, "--listen", addr, "--nats-listen", natsAddr, "--ec2-identity-certs", certs)
	server.WaitStdout("REST API https://"+addr, 60*time.Second)
	ca := filepath.Join(data, "tls", "ca.pem")
	env := []string{"FM_URL=https://" + addr, "FM_KEY_FILE=" + filepath.Join(data, "admin-key.json"), "FM_CA_FILE=" + ca}
	fm := func(args ...string) string {
		t.Helper()
		out, errOut, code := Run(t, bin, env, args...)
		if code != 0 {
			t.Fatalf("fm %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
		}
		return out
	}
	creds := filepath.Join(tmp, "provisioner.creds")
	fm("nats-creds", "--role", "provisioner", "-o", creds)
	prov := Start(t, bin, moto.Env, "provisioner", "--backend", "ec2", "--nats-url", "tls://"+natsAddr, "--nats-creds", creds,
		"--nats-ca", ca, "--ec2-endpoint", moto.URL, "--ec2-region", mototest.Region, "--ec2-poll", "100ms",
		"--secret-key-file", filepath.Join(data, "secrets.key"))
	prov.WaitStdout("ec2 backend", 30*time.Second)

	// What the operator has on AWS: a VPC, a subnet, an AMI.
	cfg, err := config.LoadDefaultConfig(context.Background(), config.WithRegion(mototest.Region), config.WithBaseEndpoint(moto.URL),
		config.WithCredentialsProvider(credentials.NewStaticCredentialsProvider("testing", "testing", "")))
	if err != nil {
		t.Fatal(err)
	}
	api := ec2.NewFromConfig(cfg)
	ctx := context.Background()
	vpcs, err := api.DescribeVpcs(ctx, &ec2.DescribeVpcsInput{})
	if err != nil || len(vpcs.Vpcs) == 0 {
		t.Fatalf("vpcs: %v", err)
	}
	vpc := aws.ToString(vpcs.Vpcs[0].VpcId)
	subnets, err := api.DescribeSubnets(ctx, &ec2.DescribeSubnetsInput{Filters: []types.Filter{{Name: aws.String("vpc-id"), Values: []string{vpc}}}})
	if err != nil || len(subnets.Subnets) == 0 {
		t.Fatalf("subnets: %v", err)
	}
	images, err := api.DescribeImages(ctx, &ec2.DescribeImagesInput{Owners: []string{"amazon"}})
	if err != nil || len(images.Images) == 0 {
		t.Fatalf("images: %v", err)
	}
	ami := aws.ToString(images.Images[0].ImageId)

	write := func(name string, v any) string { return WriteJSON(t, tmp, name, v) }
	kitPath := filepath.Join(filepath.Dir(bin), "kits", kit.FileName("14.0.0"))
	fm("image", "add", "--file", write("image.json", map[string]any{"id": "dss-14.0.0-aws", "label": "DSS 14 on AWS", "dssVersion": "14.0.0",
		"amis": map[string]string{mototest.Region: ami}, "kit": map[string]string{"path": kitPath}}))
	vn := jsonField(t, fm("network", "create", "--output", "json", "--file", write("vn.json", map[string]any{"label": "aws",
		"awsVpcId": vpc, "awsSubnetId": aws.ToString(subnets.Subnets[0].SubnetId), "awsRegion": mototest.Region,
		"awsAutoCreateSecurityGroups": true})), "id")
	tpl := jsonField(t, fm("template", "create", "--label", "base", "--output", "json"), "id")
	in := jsonField(t, fm("instance", "create", "--label", "aws1", "--network", vn, "--template", tpl, "--image", "dss-14.0.0-aws",
		"--output", "json"), "id")
	op := strings.TrimSpace(fm("instance", "provision", in, "--output", "json"))

	// The VM appears in EC2; its user data is what a machine would run.
	var vm types.Instance
	waitFor(t, 60*time.Second, "the machine in EC2", func() bool {
		out, err := api.DescribeInstances(ctx, &ec2.DescribeInstancesInput{Filters: []types.Filter{
			{Name: aws.String("tag:fm:instance"), Values: []string{in}}, {Name: aws.String("instance-state-name"), Values: []string{"running"}}}})
		if err != nil || len(out.Reservations) == 0 {
			return false
		}
		vm = out.Reservations[0].Instances[0]
		return true
	})
	attr, err := api.DescribeInstanceAttribute(ctx, &ec2.DescribeInstanceAttributeInput{InstanceId: vm.InstanceId, Attribute: types.InstanceAttributeNameUserData})
	if err != nil {
		t.Fatal(err)
	}
	userData, err := base64.StdEncoding.DecodeString(aws.ToString(attr.UserData.Value))
	if err != nil {
		t.Fatal(err)
	}

	// The download the bootstrap makes: the binary FM serves, with the digest
	// the script checks.
	m := regexp.MustCompile(`'(https://[^']+/download/fm)'`).FindStringSubmatch(string(userData))
	d := regexp.MustCompile(`([0-9a-f]{64})  /usr/local/bin/fm.download`).FindStringSubmatch(string(userData))
	if m == nil || d == nil {
		t.Fatalf("user data has no download:\n%s", userData)
	}
	machineBin := filepath.Join(tmp, "usr-local-bin-fm")
	if got := download(t, m[1], ca, machineBin); got != d[1] {
		t.Fatalf("downloaded binary's digest %s, user data says %s", got, d[1])
	}

	// The machine's agent, with the config its user data wrote.
	agentCfg, err := cloudinit.AgentConfig(userData)
	if err != nil {
		t.Fatal(err)
	}
	// The folder standing for the machine has no account of its own for
	// DSS: DSS runs as the test's user, as on the local backend.
	var fields map[string]any
	if err := json.Unmarshal(agentCfg, &fields); err != nil {
		t.Fatal(err)
	}
	me, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	fields["dssUser"] = me.Username
	// The machine's metadata service, with its identity document.
	if fields["imdsUrl"] != "http://169.254.169.254" {
		t.Fatalf("the agent's config names the metadata service %v", fields["imdsUrl"])
	}
	fields["imdsUrl"] = imdstest.Serve(t, awsKey.Proof(t, aws.ToString(vm.InstanceId)), 0).URL
	if agentCfg, err = json.Marshal(fields); err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(tmp, "agent.json")
	if err := os.WriteFile(cfgPath, agentCfg, 0o600); err != nil {
		t.Fatal(err)
	}
	root, vol := filepath.Join(tmp, "machine-root"), filepath.Join(tmp, "machine-data")
	t.Cleanup(func() { cmdline.Stop(cmdline.Find(vol), 5*time.Second) })
	// The machine runs what it downloaded: the slim build beside bin.
	if d[1] != fileDigest(t, AgentBin(bin)) {
		t.Fatal("FM served another binary than the slim agent build beside it")
	}
	agent := Start(t, machineBin, nil, "agent", "--config", cfgPath, "--root", root, "--data", vol, "--package-manager", "none",
		"--data-volume-bytes", "21474836480")
	fm("op", "wait", jsonField(t, op, "jobId")) // fails the test unless the operation succeeds
	status := fm("instance", "status", in, "--output", "json")
	var st struct {
		State, Backend, PrivateIP string
		CloudMachineIsUp          bool
		DSS                       struct{ Version string }
	}
	if err := json.Unmarshal([]byte(status), &st); err != nil || st.State != "running" || st.Backend != "ec2" || !st.CloudMachineIsUp ||
		st.DSS.Version != "14.0.0" || st.PrivateIP != aws.ToString(vm.PrivateIpAddress) {
		t.Fatalf("status after the agent joined (%v):\n%s", err, status)
	}

	// Deprovision: the VM goes, the data volume stays.
	fm("instance", "deprovision", in, "--wait")
	out, err := api.DescribeInstances(ctx, &ec2.DescribeInstancesInput{InstanceIds: []string{aws.ToString(vm.InstanceId)}})
	if err != nil || out.Reservations[0].Instances[0].State.Name != types.InstanceStateNameTerminated {
		t.Fatalf("after deprovision: %+v %v", out, err)
	}
	vols, err := api.DescribeVolumes(ctx, &ec2.DescribeVolumesInput{Filters: []types.Filter{{Name: aws.String("tag:fm:instance"), Values: []string{in}},
		{Name: aws.String("tag:fm:role"), Values: []string{"data"}}}})
	if err != nil || len(vols.Volumes) != 1 || vols.Volumes[0].State != types.VolumeStateAvailable {
		t.Fatalf("data volume after deprovision: %+v %v", vols, err)
	}
	for _, p := range []*Proc{agent, prov, server} {
		if err := p.Interrupt(30 * time.Second); err != nil {
			t.Fatal(err)
		}
	}
}

// download gets url as a machine's bootstrap does, verifying FM with
// caFile, into dst (executable), and returns its SHA-256.
func download(t *testing.T, url, caFile, dst string) string {
	t.Helper()
	resp, err := TrustingClient(t, caFile, time.Minute).Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	f, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(io.MultiWriter(f, h), resp.Body); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func fileDigest(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256Hex(b)
}

// waitFor polls cond until it holds, for at most timeout.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
