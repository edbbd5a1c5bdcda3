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

// ec2FM is fm server and fm provisioner --backend ec2 on moto, with what
// the operator has on AWS (a VPC, its subnet, an AMI) and a DSS image of it.
type ec2FM struct {
	t                *testing.T
	moto             *mototest.Server
	bin, tmp, data   string
	url, ca          string
	env              []string
	server, prov     *Proc
	cfg              aws.Config
	api              *ec2.Client
	vpc, subnet, ami string
	subnets          []string // the VPC's, the first is subnet
	awsKey           *imdstest.Signer
	volumes          []string // the folders standing for machines' data volumes, whose DSS is stopped at the end
}

// startEC2FM starts it; serverArgs, given moto and the AWS client, are
// added to fm server's.
func startEC2FM(t *testing.T, serverArgs func(*ec2FM) []string) *ec2FM {
	w := &ec2FM{t: t, moto: mototest.Run(t), bin: fmBin(t), tmp: t.TempDir()}
	var err error
	w.cfg, err = config.LoadDefaultConfig(context.Background(), config.WithRegion(mototest.Region), config.WithBaseEndpoint(w.moto.URL),
		config.WithCredentialsProvider(credentials.NewStaticCredentialsProvider("testing", "testing", "")))
	if err != nil {
		t.Fatal(err)
	}
	w.api = ec2.NewFromConfig(w.cfg)
	w.data = filepath.Join(w.tmp, "fm")
	addr, natsAddr := FreePort(t), FreePort(t)
	// AWS's key, which signs machines' identity documents: FM joins the
	// machine only with the document of the one launched for its token.
	w.awsKey = imdstest.NewSigner(t)
	certs := filepath.Join(w.tmp, "aws-identity.pem")
	if err := os.WriteFile(certs, w.awsKey.CertPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	vpcs, err := w.api.DescribeVpcs(ctx, &ec2.DescribeVpcsInput{Filters: []types.Filter{{Name: aws.String("is-default"), Values: []string{"true"}}}})
	if err != nil || len(vpcs.Vpcs) == 0 {
		t.Fatalf("vpcs: %v", err)
	}
	w.vpc = aws.ToString(vpcs.Vpcs[0].VpcId)
	subnets, err := w.api.DescribeSubnets(ctx, &ec2.DescribeSubnetsInput{Filters: []types.Filter{{Name: aws.String("vpc-id"), Values: []string{w.vpc}}}})
	if err != nil || len(subnets.Subnets) < 2 {
		t.Fatalf("subnets: %v", err)
	}
	for _, sn := range subnets.Subnets {
		w.subnets = append(w.subnets, aws.ToString(sn.SubnetId))
	}
	w.subnet = w.subnets[0]
	images, err := w.api.DescribeImages(ctx, &ec2.DescribeImagesInput{Owners: []string{"amazon"}})
	if err != nil || len(images.Images) == 0 {
		t.Fatalf("images: %v", err)
	}
	w.ami = aws.ToString(images.Images[0].ImageId)
	args := []string{"server", "--data", w.data, "--listen", addr, "--nats-listen", natsAddr, "--ec2-identity-certs", certs}
	if serverArgs != nil {
		args = append(args, serverArgs(w)...)
	}
	w.server = Start(t, w.bin, nil, args...)
	w.server.WaitStdout("REST API https://"+addr, 60*time.Second)
	w.url = "https://" + addr
	w.ca = filepath.Join(w.data, "tls", "ca.pem")
	w.env = []string{"FM_URL=https://" + addr, "FM_KEY_FILE=" + filepath.Join(w.data, "admin-key.json"), "FM_CA_FILE=" + w.ca}
	creds := filepath.Join(w.tmp, "provisioner.creds")
	w.fm("nats-creds", "--role", "provisioner", "-o", creds)
	w.prov = Start(t, w.bin, w.moto.Env, "provisioner", "--backend", "ec2", "--nats-url", "tls://"+natsAddr, "--nats-creds", creds,
		"--nats-ca", w.ca, "--ec2-endpoint", w.moto.URL, "--ec2-region", mototest.Region, "--ec2-poll", "100ms",
		"--secret-key-file", filepath.Join(w.data, "secrets.key"))
	w.prov.WaitStdout("ec2 backend", 30*time.Second)
	kitPath := filepath.Join(filepath.Dir(w.bin), "kits", kit.FileName("14.0.0"))
	w.fm("image", "add", "--file", w.write("image.json", map[string]any{"id": "dss-14.0.0-aws", "label": "DSS 14 on AWS", "dssVersion": "14.0.0",
		"amis": map[string]string{mototest.Region: w.ami}, "kit": map[string]string{"path": kitPath}}))
	t.Cleanup(func() {
		for _, vol := range w.volumes {
			cmdline.Stop(cmdline.Find(vol), 5*time.Second)
		}
	})
	return w
}

func (w *ec2FM) fm(args ...string) string {
	w.t.Helper()
	out, errOut, code := Run(w.t, w.bin, w.env, args...)
	if code != 0 {
		w.t.Fatalf("fm %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

func (w *ec2FM) write(name string, v any) string { return WriteJSON(w.t, w.tmp, name, v) }

// vm waits for instance in's machine to run in EC2.
func (w *ec2FM) vm(in string) types.Instance {
	w.t.Helper()
	var vm types.Instance
	waitFor(w.t, 60*time.Second, "the machine of "+in+" in EC2", func() bool {
		out, err := w.api.DescribeInstances(context.Background(), &ec2.DescribeInstancesInput{Filters: []types.Filter{
			{Name: aws.String("tag:fm:instance"), Values: []string{in}}, {Name: aws.String("instance-state-name"), Values: []string{"running"}}}})
		if err != nil || len(out.Reservations) == 0 {
			return false
		}
		vm = out.Reservations[0].Instances[0]
		return true
	})
	return vm
}

// playMachine plays the machine moto does not boot: it takes the user data
// moto was given, checks the binary it would download, and runs that
// binary's agent with the config (and join token) written there, and the
// machine's metadata service; edit changes them first (endpoints, the
// instance profile). It returns the agent and the folder standing for its
// OS disk.
func (w *ec2FM) playMachine(vm types.Instance, edit func(map[string]any, *imdstest.IMDS)) (*Proc, string) {
	t := w.t
	t.Helper()
	attr, err := w.api.DescribeInstanceAttribute(context.Background(), &ec2.DescribeInstanceAttributeInput{InstanceId: vm.InstanceId, Attribute: types.InstanceAttributeNameUserData})
	if err != nil {
		t.Fatal(err)
	}
	userData, err := base64.StdEncoding.DecodeString(aws.ToString(attr.UserData.Value))
	if err != nil {
		t.Fatal(err)
	}
	// The download the bootstrap makes: the binary FM serves, with the
	// digest the script checks.
	m := regexp.MustCompile(`'(https://[^']+/download/fm)'`).FindStringSubmatch(string(userData))
	d := regexp.MustCompile(`([0-9a-f]{64})  /usr/local/bin/fm.download`).FindStringSubmatch(string(userData))
	if m == nil || d == nil {
		t.Fatalf("user data has no download:\n%s", userData)
	}
	name := aws.ToString(vm.InstanceId)
	machineBin := filepath.Join(w.tmp, name+"-usr-local-bin-fm")
	if got := download(t, m[1], w.ca, machineBin); got != d[1] {
		t.Fatalf("downloaded binary's digest %s, user data says %s", got, d[1])
	}
	// The machine runs what it downloaded: the slim build beside bin.
	if d[1] != fileDigest(t, AgentBin(w.bin)) {
		t.Fatal("FM served another binary than the slim agent build beside it")
	}
	agentCfg, err := cloudinit.AgentConfig(userData)
	if err != nil {
		t.Fatal(err)
	}
	var fields map[string]any
	if err := json.Unmarshal(agentCfg, &fields); err != nil {
		t.Fatal(err)
	}
	// The folder standing for the machine has no account of its own for
	// DSS: DSS runs as the test's user, as on the local backend.
	me, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	fields["dssUser"] = me.Username
	// The machine's metadata service, with its identity document.
	if fields["imdsUrl"] != "http://169.254.169.254" {
		t.Fatalf("the agent's config names the metadata service %v", fields["imdsUrl"])
	}
	imds := imdstest.Serve(t, w.awsKey.Proof(t, name), 0)
	fields["imdsUrl"] = imds.URL
	if edit != nil {
		edit(fields, imds)
	}
	if agentCfg, err = json.Marshal(fields); err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(w.tmp, name+"-agent.json")
	if err := os.WriteFile(cfgPath, agentCfg, 0o600); err != nil {
		t.Fatal(err)
	}
	root, vol := filepath.Join(w.tmp, name+"-root"), filepath.Join(w.tmp, name+"-data")
	w.volumes = append(w.volumes, vol)
	return Start(t, machineBin, nil, "agent", "--config", cfgPath, "--root", root, "--data", vol, "--package-manager", "none",
		"--data-volume-bytes", "21474836480"), root
}

// TestEC2MachineJoinsFM runs fm server and fm provisioner --backend ec2
// against moto. moto boots nothing, so the test plays the machine: it takes
// the user data moto was given, checks the binary it would download, and
// runs the agent with the config (and join token) written there. The
// instance then reaches running through FM, and a deprovision terminates
// the VM and keeps its data volume.
func TestEC2MachineJoinsFM(t *testing.T) {
	w := startEC2FM(t, nil)
	ctx := context.Background()
	vn := jsonField(t, w.fm("network", "create", "--output", "json", "--file", w.write("vn.json", map[string]any{"label": "aws",
		"awsVpcId": w.vpc, "awsSubnetId": w.subnet, "awsRegion": mototest.Region,
		"awsAutoCreateSecurityGroups": true})), "id")
	tpl := jsonField(t, w.fm("template", "create", "--label", "base", "--output", "json"), "id")
	in := jsonField(t, w.fm("instance", "create", "--label", "aws1", "--network", vn, "--template", tpl, "--image", "dss-14.0.0-aws",
		"--output", "json"), "id")
	op := strings.TrimSpace(w.fm("instance", "provision", in, "--output", "json"))
	vm := w.vm(in)
	agent, _ := w.playMachine(vm, nil)
	w.fm("op", "wait", jsonField(t, op, "jobId")) // fails the test unless the operation succeeds
	status := w.fm("instance", "status", in, "--output", "json")
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
	w.fm("instance", "deprovision", in, "--wait")
	out, err := w.api.DescribeInstances(ctx, &ec2.DescribeInstancesInput{InstanceIds: []string{aws.ToString(vm.InstanceId)}})
	if err != nil || out.Reservations[0].Instances[0].State.Name != types.InstanceStateNameTerminated {
		t.Fatalf("after deprovision: %+v %v", out, err)
	}
	vols, err := w.api.DescribeVolumes(ctx, &ec2.DescribeVolumesInput{Filters: []types.Filter{{Name: aws.String("tag:fm:instance"), Values: []string{in}},
		{Name: aws.String("tag:fm:role"), Values: []string{"data"}}}})
	if err != nil || len(vols.Volumes) != 1 || vols.Volumes[0].State != types.VolumeStateAvailable {
		t.Fatalf("data volume after deprovision: %+v %v", vols, err)
	}
	for _, p := range []*Proc{agent, w.prov, w.server} {
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
