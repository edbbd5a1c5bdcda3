package ec2

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	elb "github.com/aws/aws-sdk-go-v2/service/elasticloadbalancingv2"
	elbtypes "github.com/aws/aws-sdk-go-v2/service/elasticloadbalancingv2/types"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
)

// Load balancers on EC2: an Application Load Balancer in the network's two
// subnets, named after FM's id (names are unique per region and account,
// so a crash after a create finds what it made by name rather than making
// a second); a target group per node, named after the load balancer and
// the node's host name, holding the node's machine on DSS's port; a rule
// per node on the routing listener, forwarding its host name to its target
// group; HTTPS on 443 with the certificate, and HTTP on 80 redirected to
// it (plain HTTP on 80 without a certificate). A change of nodes adds
// what is new before it removes what is gone, so the nodes that stay are
// served throughout.

var _ provisioner.Balancers = (*Backend)(nil)

// elbAPI is the part of Elastic Load Balancing (v2) the backend calls.
type elbAPI interface {
	DescribeLoadBalancers(context.Context, *elb.DescribeLoadBalancersInput, ...func(*elb.Options)) (*elb.DescribeLoadBalancersOutput, error)
	CreateLoadBalancer(context.Context, *elb.CreateLoadBalancerInput, ...func(*elb.Options)) (*elb.CreateLoadBalancerOutput, error)
	DeleteLoadBalancer(context.Context, *elb.DeleteLoadBalancerInput, ...func(*elb.Options)) (*elb.DeleteLoadBalancerOutput, error)
	DescribeTargetGroups(context.Context, *elb.DescribeTargetGroupsInput, ...func(*elb.Options)) (*elb.DescribeTargetGroupsOutput, error)
	CreateTargetGroup(context.Context, *elb.CreateTargetGroupInput, ...func(*elb.Options)) (*elb.CreateTargetGroupOutput, error)
	DeleteTargetGroup(context.Context, *elb.DeleteTargetGroupInput, ...func(*elb.Options)) (*elb.DeleteTargetGroupOutput, error)
	DescribeTargetHealth(context.Context, *elb.DescribeTargetHealthInput, ...func(*elb.Options)) (*elb.DescribeTargetHealthOutput, error)
	RegisterTargets(context.Context, *elb.RegisterTargetsInput, ...func(*elb.Options)) (*elb.RegisterTargetsOutput, error)
	DeregisterTargets(context.Context, *elb.DeregisterTargetsInput, ...func(*elb.Options)) (*elb.DeregisterTargetsOutput, error)
	DescribeListeners(context.Context, *elb.DescribeListenersInput, ...func(*elb.Options)) (*elb.DescribeListenersOutput, error)
	CreateListener(context.Context, *elb.CreateListenerInput, ...func(*elb.Options)) (*elb.CreateListenerOutput, error)
	ModifyListener(context.Context, *elb.ModifyListenerInput, ...func(*elb.Options)) (*elb.ModifyListenerOutput, error)
	DeleteListener(context.Context, *elb.DeleteListenerInput, ...func(*elb.Options)) (*elb.DeleteListenerOutput, error)
	DescribeRules(context.Context, *elb.DescribeRulesInput, ...func(*elb.Options)) (*elb.DescribeRulesOutput, error)
	CreateRule(context.Context, *elb.CreateRuleInput, ...func(*elb.Options)) (*elb.CreateRuleOutput, error)
	ModifyRule(context.Context, *elb.ModifyRuleInput, ...func(*elb.Options)) (*elb.ModifyRuleOutput, error)
	DeleteRule(context.Context, *elb.DeleteRuleInput, ...func(*elb.Options)) (*elb.DeleteRuleOutput, error)
}

var _ elbAPI = (*elb.Client)(nil)

// FM's tags on a load balancer and its target groups.
const (
	TagLoadBalancer = "fm:load-balancer" // the FM load balancer id
	TagHostname     = "fm:hostname"      // a target group's node host name

	roleLB          = "load-balancer"
	roleTargetGroup = "target-group"
)

// Load balancer state Details keys.
const (
	detailLBArn       = "loadBalancerArn"
	detailListenerArn = "listenerArn"
)

// lbName is the AWS name of FM's load balancer id (at most 32 characters:
// "fm-" and a 13-character id).
func lbName(id string) string { return "fm-" + id }

// targetGroupName is the AWS name of a node's target group: the load
// balancer's and a digest of the host name and DSS's port (32 characters
// at most). A port cannot change in a target group: a node whose port
// changed gets a new group, and its old one goes once no rule names it.
func targetGroupName(id, hostname string, port int) string {
	sum := sha256.Sum256([]byte(strings.ToLower(hostname) + ":" + strconv.Itoa(port)))
	return lbName(id) + "-" + hex.EncodeToString(sum[:])[:8]
}

// lbClients connects as the request's identity in the network's region.
func (b *Backend) lbClients(ctx context.Context, req provisioner.Request, cur protocol.BalancerState) (clients, string, error) {
	region := req.LoadBalancer.Network.Region
	if region == "" {
		region = cur.Details[detailRegion]
	}
	if region == "" {
		region = b.cfg.Region
	}
	return b.connectTo(ctx, region, req.Cloud)
}

// ApplyBalancer implements provisioner.Balancers.
func (b *Backend) ApplyBalancer(ctx context.Context, req provisioner.Request, cur protocol.BalancerState) (protocol.BalancerState, error) {
	spec := req.LoadBalancer
	c, region, err := b.lbClients(ctx, req, cur)
	if err != nil {
		return cur, err
	}
	if err := b.checkBalancer(spec); err != nil {
		return cur, err
	}
	note := func(m string) { req.Progress("security-groups", m) }
	lbGroup, err := b.ensureGroup(ctx, c, spec.Network, spec.Tags, groupWant{kind: "lb", desc: "Fleet Manager: HTTP and HTTPS to load balancers",
		ingress: b.ingressOn(80, 443)}, note)
	if err != nil {
		return cur, err
	}
	// The load balancer joins the network's members' group, which its
	// machines let in on every port; or, where FM makes no groups, the
	// network's own.
	sgs := []string{lbGroup}
	if spec.Network.AutoCreateSecurityGroups {
		members, err := b.membersGroup(ctx, c, spec.Network, spec.Tags, note)
		if err != nil {
			return cur, err
		}
		sgs = append(sgs, members)
	} else {
		sgs = append(sgs, spec.Network.SecurityGroups...)
	}
	lb, err := b.ensureLoadBalancer(ctx, c, spec, sgs)
	if err != nil {
		return cur, err
	}
	arn := aws.ToString(lb.LoadBalancerArn)
	req.Progress("load-balancer", "load balancer "+lbName(spec.ID)+" is "+string(lb.State.Code))
	if err := b.waitFor(ctx, req, "load-balancer-active", "load balancer "+lbName(spec.ID)+" to be active", func() (bool, string, error) {
		out, err := c.elb.DescribeLoadBalancers(ctx, &elb.DescribeLoadBalancersInput{LoadBalancerArns: []string{arn}})
		if err != nil {
			return false, "", cloudError("describe load balancer "+lbName(spec.ID), err)
		}
		if len(out.LoadBalancers) == 0 || out.LoadBalancers[0].State == nil {
			return false, "unknown", nil
		}
		code := out.LoadBalancers[0].State.Code
		if code == elbtypes.LoadBalancerStateEnumFailed {
			return false, "", protocol.Errorf(protocol.CodeFailedPrecondition, "load balancer %s failed: %s", lbName(spec.ID), aws.ToString(out.LoadBalancers[0].State.Reason))
		}
		return code == elbtypes.LoadBalancerStateEnumActive, string(code), nil
	}); err != nil {
		return cur, err
	}
	// Target groups first: a rule forwards to one that exists.
	targets := map[string]string{} // host name -> target group ARN
	for _, n := range spec.Nodes {
		tg, err := b.ensureTargetGroup(ctx, c, spec, n)
		if err != nil {
			return cur, err
		}
		targets[n.Hostname] = tg
	}
	// The routing listener and its rules, then the other listeners, then
	// what is no longer wanted: a node that stays is served throughout
	// (HTTP is redirected to HTTPS only once HTTPS routes).
	have, err := listeners(ctx, c, spec.ID, arn)
	if err != nil {
		return cur, err
	}
	wants := wantedListeners(spec)
	listener, err := b.ensureListener(ctx, c, spec.ID, arn, have, wants[0])
	if err != nil {
		return cur, err
	}
	if err := b.ensureRules(ctx, c, listener, targets); err != nil {
		return cur, err
	}
	for _, w := range wants[1:] {
		other, err := b.ensureListener(ctx, c, spec.ID, arn, have, w)
		if err != nil {
			return cur, err
		}
		// Its host rules (made when it routed, before a certificate came)
		// go: it redirects them all now, and they hold target groups.
		if err := b.ensureRules(ctx, c, other, nil); err != nil {
			return cur, err
		}
	}
	for port, l := range have {
		if slices.ContainsFunc(wants, func(w listenerWant) bool { return w.port == port }) {
			continue
		}
		if _, err := c.elb.DeleteListener(ctx, &elb.DeleteListenerInput{ListenerArn: l.ListenerArn}); err != nil && apiCode(err) != "ListenerNotFound" {
			return cur, cloudError(fmt.Sprintf("remove the listener on port %d of %s", port, lbName(spec.ID)), err)
		}
	}
	if err := b.removeTargetGroups(ctx, c, spec.ID, targets); err != nil {
		return cur, err
	}
	req.Progress("load-balancer-nodes", fmt.Sprintf("%d node(s) routed by host name", len(spec.Nodes)))
	return protocol.BalancerState{Address: aws.ToString(lb.DNSName), Nodes: spec.Nodes, Details: map[string]string{
		detailRegion: region, detailLBArn: arn, detailListenerArn: listener, detailSecurityGroups: strings.Join(sgs, ","),
		"scheme": string(lb.Scheme)}}, nil
}

// checkBalancer refuses, before anything is made, a load balancer AWS
// would refuse halfway.
func (b *Backend) checkBalancer(spec *protocol.BalancerSpec) error {
	var problems []string
	if spec.Network.VpcID == "" || spec.Network.SubnetID == "" {
		problems = append(problems, "the virtual network names no VPC or no subnet")
	}
	if spec.SecondSubnetID == "" {
		problems = append(problems, "the virtual network names no second subnet (awsSecondSubnetId): an AWS load balancer spans two availability zones")
	}
	for _, n := range spec.Nodes {
		if n.MachineID == "" {
			problems = append(problems, fmt.Sprintf("node %s (instance %s) has no machine", n.Hostname, n.Instance))
		}
	}
	if len(problems) > 0 {
		return protocol.Errorf(protocol.CodeFailedPrecondition, "load balancer %s cannot be made: %s", spec.ID, strings.Join(problems, "; "))
	}
	return nil
}

// findLoadBalancer finds FM's load balancer by name (nil if there is none).
func findLoadBalancer(ctx context.Context, c clients, id string) (*elbtypes.LoadBalancer, error) {
	out, err := c.elb.DescribeLoadBalancers(ctx, &elb.DescribeLoadBalancersInput{Names: []string{lbName(id)}})
	if apiCode(err) == "LoadBalancerNotFound" {
		return nil, nil
	}
	if err != nil {
		return nil, cloudError("look up load balancer "+lbName(id), err)
	}
	if len(out.LoadBalancers) == 0 {
		return nil, nil
	}
	return &out.LoadBalancers[0], nil
}

// ensureLoadBalancer finds the load balancer or makes it. One found with
// another scheme than wanted is an error: a scheme cannot change (a
// reprovision makes it again).
func (b *Backend) ensureLoadBalancer(ctx context.Context, c clients, spec *protocol.BalancerSpec, sgs []string) (*elbtypes.LoadBalancer, error) {
	scheme := elbtypes.LoadBalancerSchemeEnumInternetFacing
	if spec.Internal {
		scheme = elbtypes.LoadBalancerSchemeEnumInternal
	}
	lb, err := findLoadBalancer(ctx, c, spec.ID)
	if err != nil {
		return nil, err
	}
	if lb != nil {
		if lb.Scheme != scheme {
			return nil, protocol.Errorf(protocol.CodeFailedPrecondition,
				"load balancer %s is %s, and the settings say %s: a scheme cannot change; reprovision it to make it again", lbName(spec.ID), lb.Scheme, scheme)
		}
		return lb, nil
	}
	out, err := c.elb.CreateLoadBalancer(ctx, &elb.CreateLoadBalancerInput{
		Name: aws.String(lbName(spec.ID)), Type: elbtypes.LoadBalancerTypeEnumApplication, Scheme: scheme,
		Subnets: []string{spec.Network.SubnetID, spec.SecondSubnetID}, SecurityGroups: sgs,
		Tags: lbTags(spec, lbName(spec.ID), map[string]string{TagLoadBalancer: spec.ID, TagRole: roleLB, TagNetwork: spec.Network.ID}),
	})
	if err != nil {
		return nil, cloudError("create load balancer "+lbName(spec.ID), err)
	}
	if len(out.LoadBalancers) == 0 {
		return nil, protocol.Errorf(protocol.CodeUnavailable, "AWS made load balancer %s but did not describe it", lbName(spec.ID))
	}
	return &out.LoadBalancers[0], nil
}

// lbTags are the user's tags, a Name, and FM's, which win.
func lbTags(spec *protocol.BalancerSpec, name string, fm map[string]string) []elbtypes.Tag {
	var tags []elbtypes.Tag
	for _, t := range tagList(spec.Tags, name, fm) {
		tags = append(tags, elbtypes.Tag{Key: t.Key, Value: t.Value})
	}
	slices.SortFunc(tags, func(a, b elbtypes.Tag) int { return strings.Compare(aws.ToString(a.Key), aws.ToString(b.Key)) })
	return tags
}

// ensureTargetGroup finds or makes a node's target group, and makes its
// machine its one target.
func (b *Backend) ensureTargetGroup(ctx context.Context, c clients, spec *protocol.BalancerSpec, n protocol.BalancerNode) (string, error) {
	name := targetGroupName(spec.ID, n.Hostname, n.Port)
	var arn string
	out, err := c.elb.DescribeTargetGroups(ctx, &elb.DescribeTargetGroupsInput{Names: []string{name}})
	switch {
	case err == nil && len(out.TargetGroups) > 0:
		arn = aws.ToString(out.TargetGroups[0].TargetGroupArn)
	case err != nil && apiCode(err) != "TargetGroupNotFound":
		return "", cloudError("look up target group "+name, err)
	}
	if arn == "" {
		created, err := c.elb.CreateTargetGroup(ctx, &elb.CreateTargetGroupInput{
			Name: aws.String(name), Protocol: elbtypes.ProtocolEnumHttp, Port: aws.Int32(int32(n.Port)), VpcId: aws.String(spec.Network.VpcID),
			TargetType: elbtypes.TargetTypeEnumInstance, HealthCheckPath: aws.String("/"), Matcher: &elbtypes.Matcher{HttpCode: aws.String("200-399")},
			Tags: lbTags(spec, name, map[string]string{TagLoadBalancer: spec.ID, TagRole: roleTargetGroup, TagInstance: n.Instance, TagHostname: n.Hostname}),
		})
		if err != nil {
			return "", cloudError("create target group "+name, err)
		}
		if len(created.TargetGroups) == 0 {
			return "", protocol.Errorf(protocol.CodeUnavailable, "AWS made target group %s but did not describe it", name)
		}
		arn = aws.ToString(created.TargetGroups[0].TargetGroupArn)
	}
	// The node's machine in, any other out (a machine replaced since).
	health, err := c.elb.DescribeTargetHealth(ctx, &elb.DescribeTargetHealthInput{TargetGroupArn: aws.String(arn)})
	if err != nil {
		return "", cloudError("look at the targets of "+name, err)
	}
	var stale []elbtypes.TargetDescription
	registered := false
	for _, h := range health.TargetHealthDescriptions {
		if h.Target == nil {
			continue
		}
		if aws.ToString(h.Target.Id) == n.MachineID && aws.ToInt32(h.Target.Port) == int32(n.Port) {
			registered = true
		} else {
			stale = append(stale, *h.Target)
		}
	}
	if !registered {
		if _, err := c.elb.RegisterTargets(ctx, &elb.RegisterTargetsInput{TargetGroupArn: aws.String(arn),
			Targets: []elbtypes.TargetDescription{{Id: aws.String(n.MachineID), Port: aws.Int32(int32(n.Port))}}}); err != nil {
			return "", cloudError("register machine "+n.MachineID+" in "+name, err)
		}
	}
	if len(stale) > 0 {
		if _, err := c.elb.DeregisterTargets(ctx, &elb.DeregisterTargetsInput{TargetGroupArn: aws.String(arn), Targets: stale}); err != nil {
			return "", cloudError("deregister old machines from "+name, err)
		}
	}
	return arn, nil
}

// listenerWant is a listener as the settings want it.
type listenerWant struct {
	port     int32
	protocol elbtypes.ProtocolEnum
	cert     string
	actions  []elbtypes.Action
}

// wantedListeners are the listeners the settings want, the one that routes
// by host name first: HTTPS on 443 with the certificate and HTTP on 80
// redirecting to it, or, without a certificate, HTTP on 80.
func wantedListeners(spec *protocol.BalancerSpec) []listenerWant {
	notFound := []elbtypes.Action{{Type: elbtypes.ActionTypeEnumFixedResponse, FixedResponseConfig: &elbtypes.FixedResponseActionConfig{
		StatusCode: aws.String("404"), ContentType: aws.String("text/plain"), MessageBody: aws.String("no DSS node of this load balancer has this host name")}}}
	if spec.CertificateARN == "" {
		return []listenerWant{{80, elbtypes.ProtocolEnumHttp, "", notFound}}
	}
	redirect := []elbtypes.Action{{Type: elbtypes.ActionTypeEnumRedirect, RedirectConfig: &elbtypes.RedirectActionConfig{
		Protocol: aws.String("HTTPS"), Port: aws.String("443"), StatusCode: elbtypes.RedirectActionStatusCodeEnumHttp301}}}
	return []listenerWant{{443, elbtypes.ProtocolEnumHttps, spec.CertificateARN, notFound}, {80, elbtypes.ProtocolEnumHttp, "", redirect}}
}

// listeners looks up the load balancer's listeners by port.
func listeners(ctx context.Context, c clients, id, lbArn string) (map[int32]elbtypes.Listener, error) {
	out, err := c.elb.DescribeListeners(ctx, &elb.DescribeListenersInput{LoadBalancerArn: aws.String(lbArn)})
	if err != nil {
		return nil, cloudError("look up the listeners of "+lbName(id), err)
	}
	byPort := map[int32]elbtypes.Listener{}
	for _, l := range out.Listeners {
		byPort[aws.ToInt32(l.Port)] = l
	}
	return byPort, nil
}

// ensureListener makes the listener w, or changes the one on its port to
// be it, and returns its ARN.
func (b *Backend) ensureListener(ctx context.Context, c clients, id, lbArn string, have map[int32]elbtypes.Listener, w listenerWant) (string, error) {
	var certs []elbtypes.Certificate
	if w.cert != "" {
		certs = []elbtypes.Certificate{{CertificateArn: aws.String(w.cert)}}
	}
	l, ok := have[w.port]
	switch {
	case !ok:
		created, err := c.elb.CreateListener(ctx, &elb.CreateListenerInput{LoadBalancerArn: aws.String(lbArn), Port: aws.Int32(w.port),
			Protocol: w.protocol, Certificates: certs, DefaultActions: w.actions})
		if err != nil {
			return "", cloudError(fmt.Sprintf("create the %s listener of %s", w.protocol, lbName(id)), err)
		}
		if len(created.Listeners) == 0 {
			return "", protocol.Errorf(protocol.CodeUnavailable, "AWS made the %s listener of %s but did not describe it", w.protocol, lbName(id))
		}
		return aws.ToString(created.Listeners[0].ListenerArn), nil
	case l.Protocol != w.protocol || w.cert != "" && (len(l.Certificates) == 0 || aws.ToString(l.Certificates[0].CertificateArn) != w.cert) ||
		!sameActionType(l.DefaultActions, w.actions):
		if _, err := c.elb.ModifyListener(ctx, &elb.ModifyListenerInput{ListenerArn: l.ListenerArn, Port: aws.Int32(w.port),
			Protocol: w.protocol, Certificates: certs, DefaultActions: w.actions}); err != nil {
			return "", cloudError(fmt.Sprintf("change the listener on port %d of %s", w.port, lbName(id)), err)
		}
	}
	return aws.ToString(l.ListenerArn), nil
}

func sameActionType(a, b []elbtypes.Action) bool {
	return len(a) == len(b) && (len(a) == 0 || a[0].Type == b[0].Type)
}

// ensureRules makes the routing listener's rules say, for each host name,
// forward to its target group: a rule missing is added (at a priority
// after every other), one forwarding elsewhere is changed, and one for a
// host name no longer wanted goes last.
func (b *Backend) ensureRules(ctx context.Context, c clients, listener string, targets map[string]string) error {
	var rules []elbtypes.Rule
	for marker := (*string)(nil); ; {
		out, err := c.elb.DescribeRules(ctx, &elb.DescribeRulesInput{ListenerArn: aws.String(listener), Marker: marker})
		if err != nil {
			return cloudError("look up the routing rules", err)
		}
		rules = append(rules, out.Rules...)
		if marker = out.NextMarker; marker == nil {
			break
		}
	}
	byHost := map[string]elbtypes.Rule{}
	last := 0
	for _, r := range rules {
		if aws.ToBool(r.IsDefault) {
			continue
		}
		if p, err := strconv.Atoi(aws.ToString(r.Priority)); err == nil && p > last {
			last = p
		}
		if h := ruleHost(r); h != "" {
			byHost[h] = r
		}
	}
	hosts := make([]string, 0, len(targets))
	for h := range targets {
		hosts = append(hosts, h)
	}
	slices.Sort(hosts)
	for _, h := range hosts {
		forward := []elbtypes.Action{{Type: elbtypes.ActionTypeEnumForward, TargetGroupArn: aws.String(targets[h])}}
		r, ok := byHost[h]
		delete(byHost, h)
		switch {
		case !ok:
			last++
			if _, err := c.elb.CreateRule(ctx, &elb.CreateRuleInput{ListenerArn: aws.String(listener), Priority: aws.Int32(int32(last)),
				Conditions: []elbtypes.RuleCondition{{Field: aws.String("host-header"), HostHeaderConfig: &elbtypes.HostHeaderConditionConfig{Values: []string{h}}}},
				Actions:    forward}); err != nil {
				return cloudError("add the routing rule of "+h, err)
			}
		case len(r.Actions) != 1 || aws.ToString(r.Actions[0].TargetGroupArn) != targets[h]:
			if _, err := c.elb.ModifyRule(ctx, &elb.ModifyRuleInput{RuleArn: r.RuleArn, Actions: forward}); err != nil {
				return cloudError("change the routing rule of "+h, err)
			}
		}
	}
	for h, r := range byHost {
		if _, err := c.elb.DeleteRule(ctx, &elb.DeleteRuleInput{RuleArn: r.RuleArn}); err != nil && apiCode(err) != "RuleNotFound" {
			return cloudError("remove the routing rule of "+h, err)
		}
	}
	return nil
}

// ruleHost is the one host name a rule matches ("" for another rule).
func ruleHost(r elbtypes.Rule) string {
	for _, cond := range r.Conditions {
		if aws.ToString(cond.Field) != "host-header" {
			continue
		}
		values := cond.Values
		if cond.HostHeaderConfig != nil && len(cond.HostHeaderConfig.Values) > 0 {
			values = cond.HostHeaderConfig.Values
		}
		if len(values) == 1 {
			return strings.ToLower(values[0])
		}
	}
	return ""
}

// lbTargetGroups lists the target groups of FM's load balancer id, by
// name.
func lbTargetGroups(ctx context.Context, c clients, id string) ([]elbtypes.TargetGroup, error) {
	var groups []elbtypes.TargetGroup
	prefix := lbName(id) + "-"
	for marker := (*string)(nil); ; {
		out, err := c.elb.DescribeTargetGroups(ctx, &elb.DescribeTargetGroupsInput{Marker: marker})
		if err != nil {
			return nil, cloudError("list target groups", err)
		}
		for _, tg := range out.TargetGroups {
			if strings.HasPrefix(aws.ToString(tg.TargetGroupName), prefix) {
				groups = append(groups, tg)
			}
		}
		if marker = out.NextMarker; marker == nil {
			return groups, nil
		}
	}
}

// removeTargetGroups deletes the load balancer's target groups of nodes no
// longer wanted (keep: host name -> ARN of those wanted).
func (b *Backend) removeTargetGroups(ctx context.Context, c clients, id string, keep map[string]string) error {
	groups, err := lbTargetGroups(ctx, c, id)
	if err != nil {
		return err
	}
	wanted := map[string]bool{}
	for _, arn := range keep {
		wanted[arn] = true
	}
	for _, tg := range groups {
		if !wanted[aws.ToString(tg.TargetGroupArn)] {
			if err := b.deleteTargetGroup(ctx, c, aws.ToString(tg.TargetGroupArn), aws.ToString(tg.TargetGroupName)); err != nil {
				return err
			}
		}
	}
	return nil
}

func (b *Backend) deleteTargetGroup(ctx context.Context, c clients, arn, name string) error {
	_, err := c.elb.DeleteTargetGroup(ctx, &elb.DeleteTargetGroupInput{TargetGroupArn: aws.String(arn)})
	switch {
	case err == nil || apiCode(err) == "TargetGroupNotFound":
		return nil
	case apiCode(err) == "ResourceInUse":
		// A rule or a load balancer being deleted still names it: it goes
		// on a later try.
		return protocol.Errorf(protocol.CodeUnavailable, "target group %s is still in use; trying again", name)
	}
	return cloudError("delete target group "+name, err)
}

// DeleteBalancer implements provisioner.Balancers.
func (b *Backend) DeleteBalancer(ctx context.Context, req provisioner.Request, cur protocol.BalancerState) error {
	c, _, err := b.lbClients(ctx, req, cur)
	if err != nil {
		return err
	}
	if err := b.removeBalancer(ctx, c, req.LoadBalancer.ID); err != nil {
		return err
	}
	req.Progress("load-balancer-removed", "load balancer "+lbName(req.LoadBalancer.ID)+" and its target groups are gone")
	return nil
}

// removeBalancer deletes the load balancer (its listeners and rules go with
// it), then its target groups; what is gone already is not an error.
func (b *Backend) removeBalancer(ctx context.Context, c clients, id string) error {
	lb, err := findLoadBalancer(ctx, c, id)
	if err != nil {
		return err
	}
	if lb != nil {
		if _, err := c.elb.DeleteLoadBalancer(ctx, &elb.DeleteLoadBalancerInput{LoadBalancerArn: lb.LoadBalancerArn}); err != nil &&
			apiCode(err) != "LoadBalancerNotFound" {
			return cloudError("delete load balancer "+lbName(id), err)
		}
	}
	return b.removeTargetGroups(ctx, c, id, nil)
}
