package ec2

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	elb "github.com/aws/aws-sdk-go-v2/service/elasticloadbalancingv2"
	elbtypes "github.com/aws/aws-sdk-go-v2/service/elasticloadbalancingv2/types"
	"github.com/aws/aws-sdk-go-v2/service/iam"
	"github.com/fleetmanager/fm/internal/certtest"
	"github.com/fleetmanager/fm/internal/crashpoint"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
	"github.com/fleetmanager/fm/provisioner/ec2/mototest"
)

// lbWorld is moto with two machines in two subnets of the default VPC.
type lbWorld struct {
	*world
	elb      *elb.Client
	subnet2  string
	machines []string
}

func newLBWorld(t *testing.T) *lbWorld {
	t.Helper()
	w := &lbWorld{world: newWorld(t)}
	cfg, err := config.LoadDefaultConfig(context.Background(), config.WithRegion(mototest.Region), config.WithBaseEndpoint(w.moto.URL))
	if err != nil {
		t.Fatal(err)
	}
	w.elb = elb.NewFromConfig(cfg)
	ctx := context.Background()
	subnets, err := w.ec2.DescribeSubnets(ctx, &ec2.DescribeSubnetsInput{Filters: []types.Filter{{Name: aws.String("vpc-id"), Values: []string{w.vpc}}}})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range subnets.Subnets {
		if aws.ToString(s.SubnetId) != w.subnet && aws.ToString(s.AvailabilityZone) != zoneOf(subnets.Subnets, w.subnet) {
			w.subnet2 = aws.ToString(s.SubnetId)
			break
		}
	}
	if w.subnet2 == "" {
		t.Fatal("moto's default VPC has no second zone")
	}
	run, err := w.ec2.RunInstances(ctx, &ec2.RunInstancesInput{ImageId: aws.String(w.ami), MinCount: aws.Int32(2), MaxCount: aws.Int32(2),
		InstanceType: types.InstanceTypeM5Large, SubnetId: aws.String(w.subnet)})
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range run.Instances {
		w.machines = append(w.machines, aws.ToString(in.InstanceId))
	}
	return w
}

// certificate uploads a certificate to IAM (which a load balancer takes as
// ACM's) and returns its ARN.
func (w *lbWorld) certificate(t *testing.T, name string) string {
	t.Helper()
	chain := certtest.NewChain(t, "*.example.com")
	out, err := w.iam.UploadServerCertificate(context.Background(), &iam.UploadServerCertificateInput{ServerCertificateName: aws.String(name),
		CertificateBody: aws.String(chain.LeafPEM), CertificateChain: aws.String(chain.CAPEM), PrivateKey: aws.String(chain.KeyPEM)})
	if err != nil {
		t.Fatal(err)
	}
	return aws.ToString(out.ServerCertificateMetadata.Arn)
}

func zoneOf(subnets []types.Subnet, id string) string {
	for _, s := range subnets {
		if aws.ToString(s.SubnetId) == id {
			return aws.ToString(s.AvailabilityZone)
		}
	}
	return ""
}

// lbSpec is a load balancer of the first n machines.
func (w *lbWorld) lbSpec(n int, cert string) *protocol.BalancerSpec {
	spec := &protocol.BalancerSpec{ID: "lb-front00001", Name: "front", CertificateARN: cert, SecondSubnetID: w.subnet2,
		Network: protocol.NetworkSpec{ID: "vn-lab", Region: mototest.Region, VpcID: w.vpc, SubnetID: w.subnet, AutoCreateSecurityGroups: true},
		Tags:    map[string]string{"team": "data"}}
	for i := range n {
		spec.Nodes = append(spec.Nodes, protocol.BalancerNode{Hostname: fmt.Sprintf("node%d.example.com", i), Instance: fmt.Sprintf("in-node%07d", i),
			MachineID: w.machines[i], Port: 10000})
	}
	return spec
}

func (w *lbWorld) lbRequest(id string, action protocol.ProvisionAction, spec *protocol.BalancerSpec) provisioner.Request {
	return provisioner.Request{ProvisionRequest: protocol.ProvisionRequest{ID: id, Action: action, LoadBalancer: spec},
		Progress: func(string, string) {}}
}

// lbFound is what moto holds of FM's load balancer.
type lbFound struct {
	lbs       []elbtypes.LoadBalancer
	groups    map[string][]string // target group name -> its targets
	listeners map[int32]elbtypes.Listener
	hosts     map[string]string // rule host -> target group ARN
	hostPort  map[string]int32  // rule host -> its listener's port
	arnToName map[string]string
}

func (w *lbWorld) found(t *testing.T, id string) lbFound {
	t.Helper()
	ctx := context.Background()
	f := lbFound{groups: map[string][]string{}, listeners: map[int32]elbtypes.Listener{}, hosts: map[string]string{}, hostPort: map[string]int32{},
		arnToName: map[string]string{}}
	all, err := w.elb.DescribeLoadBalancers(ctx, &elb.DescribeLoadBalancersInput{})
	if err != nil {
		t.Fatal(err)
	}
	for _, lb := range all.LoadBalancers {
		if aws.ToString(lb.LoadBalancerName) == lbName(id) {
			f.lbs = append(f.lbs, lb)
		}
	}
	tgs, err := w.elb.DescribeTargetGroups(ctx, &elb.DescribeTargetGroupsInput{})
	if err != nil {
		t.Fatal(err)
	}
	for _, tg := range tgs.TargetGroups {
		name := aws.ToString(tg.TargetGroupName)
		if !strings.HasPrefix(name, lbName(id)) {
			continue
		}
		f.arnToName[aws.ToString(tg.TargetGroupArn)] = name
		health, err := w.elb.DescribeTargetHealth(ctx, &elb.DescribeTargetHealthInput{TargetGroupArn: tg.TargetGroupArn})
		if err != nil {
			t.Fatal(err)
		}
		f.groups[name] = []string{}
		for _, h := range health.TargetHealthDescriptions {
			f.groups[name] = append(f.groups[name], aws.ToString(h.Target.Id))
		}
	}
	if len(f.lbs) != 1 {
		return f
	}
	ls, err := w.elb.DescribeListeners(ctx, &elb.DescribeListenersInput{LoadBalancerArn: f.lbs[0].LoadBalancerArn})
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range ls.Listeners {
		f.listeners[aws.ToInt32(l.Port)] = l
		rules, err := w.elb.DescribeRules(ctx, &elb.DescribeRulesInput{ListenerArn: l.ListenerArn})
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rules.Rules {
			if h := ruleHost(r); h != "" {
				if _, twice := f.hosts[h]; twice {
					t.Errorf("two rules for %s", h)
				}
				f.hosts[h] = aws.ToString(r.Actions[0].TargetGroupArn)
				f.hostPort[h] = aws.ToInt32(l.Port)
			}
		}
	}
	return f
}

// check says what is wrong with f for spec (nothing made if spec is nil).
func (f lbFound) check(t *testing.T, spec *protocol.BalancerSpec) {
	t.Helper()
	if spec == nil {
		if len(f.lbs) != 0 || len(f.groups) != 0 {
			t.Fatalf("left after a delete: %d load balancers, target groups %v", len(f.lbs), f.groups)
		}
		return
	}
	if len(f.lbs) != 1 {
		t.Fatalf("%d load balancers, want 1", len(f.lbs))
	}
	if len(f.groups) != len(spec.Nodes) || len(f.hosts) != len(spec.Nodes) {
		t.Fatalf("target groups %v and rules %v for %d nodes", f.groups, f.hosts, len(spec.Nodes))
	}
	for _, n := range spec.Nodes {
		name := f.arnToName[f.hosts[n.Hostname]]
		if name != targetGroupName(spec.ID, n.Hostname, n.Port) || !slices.Equal(f.groups[name], []string{n.MachineID}) {
			t.Fatalf("node %s: rule to %q holding %v", n.Hostname, name, f.groups[name])
		}
	}
	routing := int32(80)
	if spec.CertificateARN != "" {
		routing = 443
		if l := f.listeners[443]; l.Protocol != elbtypes.ProtocolEnumHttps || len(l.Certificates) != 1 || aws.ToString(l.Certificates[0].CertificateArn) != spec.CertificateARN {
			t.Fatalf("HTTPS listener %+v", l)
		}
		if l := f.listeners[80]; len(l.DefaultActions) != 1 || l.DefaultActions[0].Type != elbtypes.ActionTypeEnumRedirect {
			t.Fatalf("HTTP is not redirected: %+v", l.DefaultActions)
		}
	}
	if len(f.listeners) != map[bool]int{true: 2, false: 1}[spec.CertificateARN != ""] || f.listeners[routing].ListenerArn == nil {
		t.Fatalf("listeners %v", f.listeners)
	}
	for h, port := range f.hostPort {
		if port != routing {
			t.Fatalf("the rule of %s is on port %d, not on the routing listener's %d", h, port, routing)
		}
	}
	wantScheme := elbtypes.LoadBalancerSchemeEnumInternetFacing
	if spec.Internal {
		wantScheme = elbtypes.LoadBalancerSchemeEnumInternal
	}
	if f.lbs[0].Scheme != wantScheme {
		t.Fatalf("scheme %s, want %s", f.lbs[0].Scheme, wantScheme)
	}
}

// TestLoadBalancerOnMoto: a load balancer made, asked again (a
// redelivery), changed (a node added, then one removed), made again from
// scratch, and deleted, with nothing duplicated or left; tagged as FM tags
// what it makes.
func TestLoadBalancerOnMoto(t *testing.T) {
	w := newLBWorld(t)
	ctx := context.Background()
	cert := w.certificate(t, "front")
	spec := w.lbSpec(1, cert)
	st, err := w.backend.ApplyBalancer(ctx, w.lbRequest("req-1", protocol.ProvisionBalancerApply, spec), protocol.BalancerState{})
	if err != nil {
		t.Fatal(err)
	}
	if st.Address == "" || st.Details[detailLBArn] == "" {
		t.Fatalf("state %+v", st)
	}
	f := w.found(t, spec.ID)
	f.check(t, spec)
	tags, err := w.elb.DescribeTags(ctx, &elb.DescribeTagsInput{ResourceArns: []string{aws.ToString(f.lbs[0].LoadBalancerArn)}})
	if err != nil || len(tags.TagDescriptions) != 1 {
		t.Fatalf("tags: %v", err)
	}
	got := map[string]string{}
	for _, tag := range tags.TagDescriptions[0].Tags {
		got[aws.ToString(tag.Key)] = aws.ToString(tag.Value)
	}
	if got[TagLoadBalancer] != spec.ID || got["team"] != "data" || got[TagRole] != roleLB || got["Name"] != lbName(spec.ID) {
		t.Fatalf("load balancer tags %v", got)
	}

	// Asked again: nothing more.
	if _, err := w.backend.ApplyBalancer(ctx, w.lbRequest("req-1", protocol.ProvisionBalancerApply, spec), st); err != nil {
		t.Fatal(err)
	}
	w.found(t, spec.ID).check(t, spec)

	// A node added, then the first removed (its group goes too).
	spec = w.lbSpec(2, cert)
	if st, err = w.backend.ApplyBalancer(ctx, w.lbRequest("req-2", protocol.ProvisionBalancerApply, spec), st); err != nil {
		t.Fatal(err)
	}
	w.found(t, spec.ID).check(t, spec)
	// A node's DSS port changed: a new group, the old one gone.
	spec.Nodes[1].Port = 10443
	if st, err = w.backend.ApplyBalancer(ctx, w.lbRequest("req-2b", protocol.ProvisionBalancerApply, spec), st); err != nil {
		t.Fatal(err)
	}
	w.found(t, spec.ID).check(t, spec)
	spec.Nodes = spec.Nodes[1:]
	if st, err = w.backend.ApplyBalancer(ctx, w.lbRequest("req-3", protocol.ProvisionBalancerApply, spec), st); err != nil {
		t.Fatal(err)
	}
	w.found(t, spec.ID).check(t, spec)

	// Without a certificate: plain HTTP on 80, the HTTPS listener gone.
	spec.CertificateARN = ""
	if st, err = w.backend.ApplyBalancer(ctx, w.lbRequest("req-4", protocol.ProvisionBalancerApply, spec), st); err != nil {
		t.Fatal(err)
	}
	w.found(t, spec.ID).check(t, spec)

	// A certificate again: the host rules move to HTTPS, HTTP redirects
	// them all (no rule left on 80 to route around it).
	spec.CertificateARN = cert
	if st, err = w.backend.ApplyBalancer(ctx, w.lbRequest("req-4b", protocol.ProvisionBalancerApply, spec), st); err != nil {
		t.Fatal(err)
	}
	w.found(t, spec.ID).check(t, spec)

	// A scheme cannot change in place; a reprovision (the provisioner
	// removes it, then makes it) makes it again.
	spec.Internal = true
	if _, err := w.backend.ApplyBalancer(ctx, w.lbRequest("req-5", protocol.ProvisionBalancerApply, spec), st); err == nil || !strings.Contains(err.Error(), "reprovision") {
		t.Fatalf("a scheme changed in place: %v", err)
	}
	if err := w.backend.DeleteBalancer(ctx, w.lbRequest("req-6", protocol.ProvisionBalancerApply, spec), st); err != nil {
		t.Fatal(err)
	}
	if st, err = w.backend.ApplyBalancer(ctx, w.lbRequest("req-6", protocol.ProvisionBalancerApply, spec), protocol.BalancerState{}); err != nil {
		t.Fatal(err)
	}
	w.found(t, spec.ID).check(t, spec)

	if err := w.backend.DeleteBalancer(ctx, w.lbRequest("req-7", protocol.ProvisionBalancerDelete, spec), st); err != nil {
		t.Fatal(err)
	}
	w.found(t, spec.ID).check(t, nil)
	// Deleted again (a redelivery): nothing to do, no error.
	if err := w.backend.DeleteBalancer(ctx, w.lbRequest("req-7", protocol.ProvisionBalancerDelete, spec), st); err != nil {
		t.Fatal(err)
	}

	// Refused before anything is made: no second subnet, a node without a
	// machine.
	bad := w.lbSpec(1, "")
	bad.SecondSubnetID, bad.Nodes[0].MachineID = "", ""
	_, err = w.backend.ApplyBalancer(ctx, w.lbRequest("req-8", protocol.ProvisionBalancerApply, bad), protocol.BalancerState{})
	if err == nil || !strings.Contains(err.Error(), "second subnet") || !strings.Contains(err.Error(), "has no machine") {
		t.Fatalf("a load balancer that cannot be made: %v", err)
	}
	w.found(t, bad.ID).check(t, nil)
}

// TestLoadBalancerCrashes: a provisioner killed right after each ELB call
// that changes something, then asked again, leaves exactly what one
// uninterrupted apply (or delete) leaves: no duplicate load balancer,
// target group, listener or rule.
func TestLoadBalancerCrashes(t *testing.T) {
	w := newLBWorld(t)
	cert := w.certificate(t, "crash")
	// The points an apply of two nodes, then a delete, pass.
	var rec crashpoint.Recorder
	recorded := w.withCrash(t, rec.Hook())
	spec := w.lbSpec(2, cert)
	st, err := recorded.ApplyBalancer(context.Background(), w.lbRequest("req-r", protocol.ProvisionBalancerApply, spec), protocol.BalancerState{})
	if err != nil {
		t.Fatal(err)
	}
	if err := recorded.DeleteBalancer(context.Background(), w.lbRequest("req-rd", protocol.ProvisionBalancerDelete, spec), st); err != nil {
		t.Fatal(err)
	}
	var points []string
	for _, p := range rec.Points() {
		if strings.HasPrefix(p, "elb/") && strings.HasSuffix(p, ":after") && !slices.Contains(points, p) {
			points = append(points, p)
		}
	}
	if len(points) < 6 {
		t.Fatalf("only %v were passed", points)
	}
	for _, point := range points {
		t.Run(point, func(t *testing.T) {
			deleting := strings.Contains(point, "Delete")
			ctx := context.Background()
			var st protocol.BalancerState
			if deleting {
				// Made first, then deleted by a provisioner killed there.
				var err error
				if st, err = w.backend.ApplyBalancer(ctx, w.lbRequest("req-a", protocol.ProvisionBalancerApply, spec), st); err != nil {
					t.Fatal(err)
				}
			}
			killed := w.withCrash(t, func(p string) {
				if p == point {
					panic(errKilled) // the provisioner died there
				}
			})
			action, call := protocol.ProvisionBalancerApply, func(b *Backend, req provisioner.Request) error {
				_, err := b.ApplyBalancer(ctx, req, st)
				return err
			}
			if deleting {
				action, call = protocol.ProvisionBalancerDelete, func(b *Backend, req provisioner.Request) error {
					return b.DeleteBalancer(ctx, req, st)
				}
			}
			req := w.lbRequest("req-k", action, spec)
			if !diedAt(func() { _ = call(killed, req) }) {
				t.Fatalf("never passed %s", point)
			}
			if err := call(w.backend, req); err != nil {
				t.Fatalf("asked again after a kill at %s: %v", point, err)
			}
			if deleting {
				w.found(t, spec.ID).check(t, nil)
				return
			}
			w.found(t, spec.ID).check(t, spec)
			if err := w.backend.DeleteBalancer(ctx, w.lbRequest("req-d", protocol.ProvisionBalancerDelete, spec), st); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// diedAt runs fn and reports whether it died at the crash point.
func diedAt(fn func()) (died bool) {
	defer func() {
		if r := recover(); r != nil {
			if r != errKilled {
				panic(r)
			}
			died = true
		}
	}()
	fn()
	return false
}

// withCrash is the world's backend with a crash hook.
func (w *lbWorld) withCrash(t *testing.T, hook crashpoint.Hook) *Backend {
	t.Helper()
	b, err := New(Config{Region: mototest.Region, Endpoint: w.moto.URL, AgentNATSURL: "tls://fm.example.com:4222",
		IngressCIDRs: []string{"203.0.113.0/24"}, Poll: 20 * time.Millisecond, Timeout: 30 * time.Second, Crash: hook})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestLoadBalancerAsTheAccountsRole: a load balancer is made and removed as
// its network's cloud account: the role assumed with the account's
// external id, and every EC2 and ELB call signed with the credentials it
// gave, none with the provisioner's own.
func TestLoadBalancerAsTheAccountsRole(t *testing.T) {
	w := newLBWorld(t)
	own := os.Getenv("AWS_ACCESS_KEY_ID")
	if own == "" {
		t.Fatal("moto's environment names no access key")
	}
	target, err := url.Parse(w.moto.URL)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var assumed, asOwn []string
	calls := 0
	forward := httputil.NewSingleHostReverseProxy(target)
	proxy := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		form, _ := url.ParseQuery(string(body))
		mu.Lock()
		if form.Get("Action") == "AssumeRole" {
			assumed = append(assumed, form.Get("RoleArn")+" "+form.Get("ExternalId"))
		} else {
			calls++
			if strings.Contains(r.Header.Get("Authorization"), "Credential="+own+"/") {
				asOwn = append(asOwn, form.Get("Action"))
			}
		}
		mu.Unlock()
		r.Body = io.NopCloser(bytes.NewReader(body))
		forward.ServeHTTP(rw, r)
	}))
	t.Cleanup(proxy.Close)
	b, err := New(Config{Region: mototest.Region, Endpoint: proxy.URL, AgentNATSURL: "nats://fm:4222",
		Poll: 20 * time.Millisecond, Timeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	spec := w.lbSpec(2, w.certificate(t, "account"))
	auth := &protocol.CloudAuth{Mode: protocol.CloudAuthIAMRole, RoleARN: "arn:aws:iam::123456789012:role/fm-account", ExternalID: "fm-0123abcd"}
	req := w.lbRequest("req-acct", protocol.ProvisionBalancerApply, spec)
	req.Cloud = auth
	st, err := b.ApplyBalancer(context.Background(), req, protocol.BalancerState{})
	if err != nil {
		t.Fatal(err)
	}
	w.found(t, spec.ID).check(t, spec)
	del := w.lbRequest("req-acct-del", protocol.ProvisionBalancerDelete, spec)
	del.Cloud = auth
	if err := b.DeleteBalancer(context.Background(), del, st); err != nil {
		t.Fatal(err)
	}
	w.found(t, spec.ID).check(t, nil)
	mu.Lock()
	defer mu.Unlock()
	if !slices.Contains(assumed, "arn:aws:iam::123456789012:role/fm-account fm-0123abcd") {
		t.Fatalf("roles assumed (ARN, external id): %q", assumed)
	}
	if len(asOwn) > 0 || calls < 10 {
		t.Fatalf("%d calls; as the provisioner's own identity: %v", calls, asOwn)
	}
}
