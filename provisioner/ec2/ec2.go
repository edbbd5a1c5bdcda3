package ec2

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/fleetmanager/fm/internal/crashpoint"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/provisioner"
)

// Config configures the EC2 backend.
type Config struct {
	// Region is used when a network names none.
	Region string
	// Endpoint, if set, replaces AWS's endpoints (EC2, Route53, STS): an
	// AWS-compatible service, or moto in tests.
	Endpoint string
	// AgentNATSURL is the bus as the machines reach it.
	AgentNATSURL string
	// IngressCIDRs may reach the machines' SSH, HTTP and HTTPS ports
	// through the security group FM creates (default 0.0.0.0/0, as
	// Dataiku's FM does).
	IngressCIDRs []string
	// OpenSecret opens the sealed secret of key pair cloud credentials (FM's
	// secret key); nil refuses them.
	OpenSecret func(sealed, where string) (string, error)
	// Poll is how often a waiter looks (default 5s); Timeout bounds each
	// wait (default 10 minutes).
	Poll    time.Duration
	Timeout time.Duration
	// Crash is passed a crash point before and after every AWS call that
	// changes something (tests).
	Crash crashpoint.Hook
}

// Backend is the EC2 backend.
type Backend struct {
	cfg     Config
	connect connector

	mu   sync.Mutex
	auth map[string]*protocol.CloudAuth // per instance, the identity of its last request
	// peering holds one lock per pair of VPCs: two provisions of one
	// network's machines make one peering (ensurePeering).
	peering sync.Map // string -> *sync.Mutex
}

var _ provisioner.Backend = (*Backend)(nil)

// New checks the configuration.
func New(cfg Config) (*Backend, error) {
	if cfg.AgentNATSURL == "" {
		return nil, errors.New("ec2 backend: the bus URL machines use is required")
	}
	if len(cfg.IngressCIDRs) == 0 {
		cfg.IngressCIDRs = []string{"0.0.0.0/0"}
	}
	for _, c := range cfg.IngressCIDRs {
		if !validCIDR(c) {
			return nil, fmt.Errorf("ec2 backend: ingress CIDR %q is not an IPv4 CIDR", c)
		}
	}
	if cfg.Poll <= 0 {
		cfg.Poll = 5 * time.Second
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Minute
	}
	return &Backend{cfg: cfg, connect: awsConnector(cfg.Endpoint, cfg.OpenSecret), auth: map[string]*protocol.CloudAuth{}}, nil
}

// Name implements provisioner.Backend.
func (b *Backend) Name() string { return protocol.BackendEC2 }

// FM's tags on what it makes.
const (
	TagInstance   = "fm:instance"   // the FM instance id
	TagRole       = "fm:role"       // machine, data, eip, security-group
	TagRequest    = "fm:request"    // the provision request that made it
	TagGeneration = "fm:generation" // the desired generation a machine is for
	TagNetwork    = "fm:network"    // the virtual network (security groups)

	roleMachine = "machine"
	roleData    = "data"
	roleEIP     = "eip"
	roleSG      = "security-group"

	// dataDevice is where the data volume is attached.
	dataDevice = "/dev/sdf"
)

// machine-state Details keys.
const (
	detailRegion         = "region"
	detailSecurityGroups = "securityGroups"
	detailAllocation     = "eipAllocation"
	detailAllocatedByFM  = "eipAllocatedByFM"
	detailDNSNames       = "dnsNames"
	detailAZ             = "availabilityZone"
	// detailIdentity names (no secret) the cloud identity the machine was
	// made as, when it is not the provisioner's own.
	detailIdentity = "identity"
)

// tagsFor builds an AWS tag list: the user's tags (tenant -> network ->
// instance, already merged), a Name, then FM's, which win.
func tagsFor(spec *protocol.MachineSpec, name string, fm map[string]string) []types.Tag {
	var user map[string]string
	if spec != nil {
		user = spec.Tags
	}
	return tagList(user, name, fm)
}

// tagList builds an AWS tag list from the user's tags, a Name and FM's,
// which win.
func tagList(user map[string]string, name string, fm map[string]string) []types.Tag {
	all := maps.Clone(user)
	if all == nil {
		all = map[string]string{}
	}
	if _, ok := all["Name"]; !ok && name != "" {
		all["Name"] = name
	}
	for k, v := range fm {
		all[k] = v
	}
	tags := make([]types.Tag, 0, len(all))
	for k, v := range all {
		tags = append(tags, types.Tag{Key: aws.String(k), Value: aws.String(v)})
	}
	return tags
}

func tagSpec(rt types.ResourceType, tags []types.Tag) []types.TagSpecification {
	return []types.TagSpecification{{ResourceType: rt, Tags: tags}}
}

func tagFilter(key, value string) types.Filter {
	return types.Filter{Name: aws.String("tag:" + key), Values: []string{value}}
}

func tagValue(tags []types.Tag, key string) string {
	for _, t := range tags {
		if aws.ToString(t.Key) == key {
			return aws.ToString(t.Value)
		}
	}
	return ""
}

// region is the network's region, or the backend's.
func (b *Backend) region(spec *protocol.MachineSpec, cur protocol.MachineState) string {
	if spec != nil && spec.Network.Region != "" {
		return spec.Network.Region
	}
	if r := cur.Details[detailRegion]; r != "" {
		return r
	}
	return b.cfg.Region
}

// clientsFor connects as the request's identity in its region, and
// remembers the identity for Alive, which has no request.
func (b *Backend) clientsFor(ctx context.Context, req provisioner.Request, cur protocol.MachineState) (clients, string, error) {
	b.mu.Lock()
	b.auth[req.Instance] = req.Cloud
	b.mu.Unlock()
	return b.connectTo(ctx, b.region(req.Spec, cur), req.Cloud)
}

func (b *Backend) connectTo(ctx context.Context, region string, auth *protocol.CloudAuth) (clients, string, error) {
	if region == "" {
		return clients{}, "", protocol.Errorf(protocol.CodeInvalidArgument,
			"no AWS region: the virtual network names none and the provisioner has no --ec2-region")
	}
	c, err := b.connect(ctx, region, auth)
	return c.withCrashPoints(b.cfg.Crash), region, err
}

// Reprovision implements provisioner.Backend. It checks everything the
// machine needs before it changes anything, then: the network's security
// groups, the end of the previous machine, the data volume (kept, or created
// once), the new machine, its volume attachment, its elastic IP and DNS
// records.
func (b *Backend) Reprovision(ctx context.Context, req provisioner.Request, cur protocol.MachineState) (protocol.MachineState, error) {
	spec := req.Spec
	c, region, err := b.clientsFor(ctx, req, cur)
	if err != nil {
		return cur, err
	}
	// What another request's restore left unfinished is undone first: the
	// volumes in place are then the instance's own again, for the checks
	// and for what follows.
	if err := b.abandonRestores(ctx, c, req); err != nil {
		return cur, err
	}
	pl, err := b.plan(ctx, c, region, req)
	if err != nil {
		return cur, err
	}
	var fromSnapshot *types.Snapshot
	if req.FromSnapshot != nil {
		if fromSnapshot, err = checkSnapshot(ctx, c, *req.FromSnapshot); err != nil {
			return cur, provisioner.Untouched(err)
		}
		req.Progress("verify-snapshot", fmt.Sprintf("EBS snapshot %s of %s is complete (%d GB)", req.FromSnapshot.Ref, req.FromSnapshot.ID, aws.ToInt32(fromSnapshot.VolumeSize)))
	}
	req.Progress("checks", fmt.Sprintf("AMI %s, %s, subnet %s in %s", pl.ami, spec.InstanceType, spec.Network.SubnetID, pl.az))
	sgs, err := b.securityGroups(ctx, c, spec, pl, func(m string) { req.Progress("security-groups", m) })
	if err != nil {
		return cur, err
	}
	if err := b.ensurePeering(ctx, c, region, req, pl); err != nil {
		return cur, err
	}
	next := cur
	next.Details = map[string]string{detailRegion: region, detailAZ: pl.az, detailSecurityGroups: strings.Join(sgs, ",")}
	if req.Cloud != nil && req.Cloud.Mode != protocol.CloudAuthSameAsFM {
		next.Details[detailIdentity] = authKey(req.Cloud)
	}
	for _, k := range []string{detailAllocation, detailAllocatedByFM, detailDNSNames} {
		if v := cur.Details[k]; v != "" {
			next.Details[k] = v
		}
	}

	mine, others, err := b.findMachines(ctx, c, req.Instance, req.ID)
	if err != nil {
		return cur, err
	}
	for _, old := range others {
		req.Progress("end-old-machine", "terminating the previous machine "+aws.ToString(old.InstanceId))
		if err := b.terminate(ctx, c, req, aws.ToString(old.InstanceId)); err != nil {
			return next, err
		}
	}
	vol := pl.volume
	switch {
	case fromSnapshot != nil:
		if vol, err = b.restoredVolume(ctx, c, req, pl.az, fromSnapshot); err != nil {
			return next, err
		}
	case vol == nil:
		if vol, err = b.createVolume(ctx, c, req, pl.az, nil, roleData); err != nil {
			return next, err
		}
	default:
		req.Progress("data-volume", fmt.Sprintf("data volume %s kept (%d GB)", aws.ToString(vol.VolumeId), aws.ToInt32(vol.Size)))
	}
	next.VolumeID, next.VolumeSizeGB = aws.ToString(vol.VolumeId), int(aws.ToInt32(vol.Size))
	if mine == nil {
		if mine, err = b.runInstance(ctx, c, req, pl, sgs, next.VolumeID); err != nil {
			return next, err
		}
	} else {
		req.Progress("adopt", "the machine of this request exists: "+aws.ToString(mine.InstanceId))
	}
	id := aws.ToString(mine.InstanceId)
	next.MachineID = id
	next.Details[protocol.DetailMadeBy] = req.ID
	startup, runtime := spec.Access.StartupInstanceProfileArn, spec.Access.RuntimeInstanceProfileArn
	if p := firstSet(startup, runtime); p != "" {
		next.Details[protocol.DetailInstanceProfile] = p
	}
	if startup != "" && runtime != "" && startup != runtime {
		// Swapped by the provisioner once DSS is set up (UseRuntimeProfile).
		next.Details[protocol.DetailRuntimeProfile] = runtime
	}
	if mine, err = b.waitInstance(ctx, c, req, id, types.InstanceStateNameRunning); err != nil {
		return next, err
	}
	if err := b.attachVolume(ctx, c, req, next.VolumeID, id); err != nil {
		return next, err
	}
	if spec.ElasticIP != nil {
		alloc, byFM, ip, err := b.associateAddress(ctx, c, req, id, spec.ElasticIP.AllocationID, cur)
		if err != nil {
			return next, err
		}
		next.Details[detailAllocation] = alloc
		if byFM {
			next.Details[detailAllocatedByFM] = "true"
		} else {
			delete(next.Details, detailAllocatedByFM)
		}
		mine.PublicIpAddress = aws.String(ip)
	} else if cur.Details[detailAllocatedByFM] == "true" {
		// The instance no longer wants the address FM allocated for it.
		if err := b.releaseAddress(ctx, c, req, cur.Details[detailAllocation]); err != nil {
			return next, err
		}
		delete(next.Details, detailAllocation)
		delete(next.Details, detailAllocatedByFM)
	}
	b.fillAddresses(&next, mine)
	if err := b.publishDNS(ctx, c, req, spec, &next); err != nil {
		return next, err
	}
	next.Status = protocol.MachineRunning
	return next, nil
}

// Start implements provisioner.Backend.
func (b *Backend) Start(ctx context.Context, req provisioner.Request, cur protocol.MachineState) (protocol.MachineState, error) {
	if cur.MachineID == "" {
		return cur, protocol.Errorf(protocol.CodeFailedPrecondition, "the instance has no machine; reprovision it")
	}
	c, _, err := b.clientsFor(ctx, req, cur)
	if err != nil {
		return cur, err
	}
	if _, err := c.ec2.StartInstances(ctx, &ec2.StartInstancesInput{InstanceIds: []string{cur.MachineID}}); err != nil {
		return cur, cloudError("start the machine", err)
	}
	inst, err := b.waitInstance(ctx, c, req, cur.MachineID, types.InstanceStateNameRunning)
	if err != nil {
		return cur, err
	}
	next := cur
	next.Details = maps.Clone(cur.Details)
	b.fillAddresses(&next, inst)
	// A machine without an elastic IP has a new public address.
	if err := b.publishDNS(ctx, c, req, req.Spec, &next); err != nil {
		return next, err
	}
	next.Status = protocol.MachineRunning
	return next, nil
}

// Stop implements provisioner.Backend: the machine stops, its disks stay.
func (b *Backend) Stop(ctx context.Context, req provisioner.Request, cur protocol.MachineState) (protocol.MachineState, error) {
	next := cur
	next.Status = protocol.MachineStopped
	if cur.MachineID == "" {
		return next, nil
	}
	c, _, err := b.clientsFor(ctx, req, cur)
	if err != nil {
		return cur, err
	}
	if _, err := c.ec2.StopInstances(ctx, &ec2.StopInstancesInput{InstanceIds: []string{cur.MachineID}}); err != nil && !isNotFound(err) {
		return cur, cloudError("stop the machine", err)
	}
	if _, err := b.waitInstance(ctx, c, req, cur.MachineID, types.InstanceStateNameStopped); err != nil {
		return cur, err
	}
	next.PublicIP = keepIfElastic(cur)
	return next, nil
}

// keepIfElastic is the public address a stopped machine keeps: its elastic
// IP's, if it has one.
func keepIfElastic(cur protocol.MachineState) string {
	if cur.Details[detailAllocation] != "" {
		return cur.PublicIP
	}
	return ""
}

// Deprovision implements provisioner.Backend: DNS records and the machine
// go; the data volume and an elastic IP stay for the next machine.
func (b *Backend) Deprovision(ctx context.Context, req provisioner.Request, cur protocol.MachineState) (protocol.MachineState, error) {
	c, _, err := b.clientsFor(ctx, req, cur)
	if err != nil {
		return cur, err
	}
	next := cur
	next.Details = maps.Clone(cur.Details)
	if err := b.withdrawDNS(ctx, c, req, &next); err != nil {
		return next, err
	}
	_, machines, err := b.findMachines(ctx, c, req.Instance, "")
	if err != nil {
		return next, err
	}
	for _, m := range machines {
		if err := b.terminate(ctx, c, req, aws.ToString(m.InstanceId)); err != nil {
			return next, err
		}
	}
	req.Progress("terminate", fmt.Sprintf("%d machine(s) terminated; data volume %s kept", len(machines), cur.VolumeID))
	next.Status, next.MachineID = protocol.MachineDeprovisioned, ""
	next.PrivateIP, next.PublicIP, next.PrivateDNS, next.PublicDNS = "", "", "", ""
	return next, nil
}

// Delete implements provisioner.Backend: the machine, the data volume
// (unless req.KeepVolume) and the elastic IP FM allocated go. An elastic IP
// the user gave stays theirs.
func (b *Backend) Delete(ctx context.Context, req provisioner.Request, cur protocol.MachineState) (protocol.MachineState, error) {
	next, err := b.Deprovision(ctx, req, cur)
	if err != nil {
		return next, err
	}
	c, _, err := b.clientsFor(ctx, req, cur)
	if err != nil {
		return next, err
	}
	// Every address FM allocated for the instance, found by its tags: one
	// allocated by a reprovision that failed before it was recorded too.
	if err := b.releaseAllocated(ctx, c, req); err != nil {
		return next, err
	}
	delete(next.Details, detailAllocation)
	delete(next.Details, detailAllocatedByFM)
	vols, err := b.findVolumes(ctx, c, req.Instance, roleData, rolePreviousData, roleRestoring)
	if err != nil {
		return next, err
	}
	for _, v := range vols {
		id := aws.ToString(v.VolumeId)
		if req.KeepVolume {
			req.Progress("data-volume", "data volume kept: "+id)
			continue
		}
		if err := b.deleteVolume(ctx, c, req, id); err != nil {
			return next, err
		}
		req.Progress("data-volume", "data volume deleted: "+id)
	}
	if !req.KeepVolume {
		next.VolumeID = ""
	}
	next.Status = protocol.MachineDeleted
	return next, nil
}

// Alive implements provisioner.Backend: the machines are running (one
// stopped or terminated behind FM's back is not). It makes one filtered
// DescribeInstances call (and its pages) per region and identity, whatever
// the number of machines.
func (b *Backend) Alive(ctx context.Context, machines []protocol.MachineState) (map[string]bool, error) {
	type group struct {
		region string
		auth   *protocol.CloudAuth
		ids    map[string]string // machine id -> instance
	}
	groups := map[string]*group{}
	out := make(map[string]bool, len(machines))
	b.mu.Lock()
	for _, m := range machines {
		if m.MachineID == "" {
			out[m.Instance] = false
			continue
		}
		// The identity of the instance's last request. After a restart,
		// until one comes, a machine made as another identity is unknown:
		// asked as the provisioner's own, another account's machine would
		// look gone.
		auth, region := b.auth[m.Instance], b.region(nil, m)
		if auth == nil && m.Details[detailIdentity] != "" {
			continue
		}
		key := region + "|" + authKey(auth)
		g := groups[key]
		if g == nil {
			g = &group{region: region, auth: auth, ids: map[string]string{}}
			groups[key] = g
		}
		g.ids[m.MachineID] = m.Instance
	}
	b.mu.Unlock()
	var errs []error
	for _, g := range groups {
		c, _, err := b.connectTo(ctx, g.region, g.auth)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		ids := make([]string, 0, len(g.ids))
		for id := range g.ids {
			ids = append(ids, id)
		}
		running, err := runningMachines(ctx, c, ids)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for id, instance := range g.ids {
			out[instance] = running[id]
		}
	}
	return out, errors.Join(errs...)
}

// runningMachines returns which of the machines are running or pending. A
// filter, unlike a list of ids, does not fail the call for an id that no
// longer exists (a machine terminated long ago): it is simply not running.
func runningMachines(ctx context.Context, c clients, ids []string) (map[string]bool, error) {
	running := map[string]bool{}
	const perCall = 200 // the number of values a filter takes
	for start := 0; start < len(ids); start += perCall {
		chunk := ids[start:min(start+perCall, len(ids))]
		pages := ec2.NewDescribeInstancesPaginator(c.ec2, &ec2.DescribeInstancesInput{Filters: []types.Filter{
			{Name: aws.String("instance-id"), Values: chunk},
			{Name: aws.String("instance-state-name"), Values: []string{"pending", "running"}},
		}})
		for pages.HasMorePages() {
			page, err := pages.NextPage(ctx)
			if err != nil {
				return nil, cloudError("look at the machines", err)
			}
			for _, r := range page.Reservations {
				for _, inst := range r.Instances {
					running[aws.ToString(inst.InstanceId)] = true
				}
			}
		}
	}
	return running, nil
}

// authKey tells identities apart for grouping calls (the sealed secret is
// randomised, so a key pair is known by its access key id).
func authKey(a *protocol.CloudAuth) string {
	if a == nil {
		return ""
	}
	return a.Mode + "|" + a.RoleARN + "|" + a.ExternalID + "|" + a.AccessKeyID
}

func (b *Backend) fillAddresses(st *protocol.MachineState, inst *types.Instance) {
	st.PrivateIP, st.PublicIP = aws.ToString(inst.PrivateIpAddress), aws.ToString(inst.PublicIpAddress)
	st.PrivateDNS, st.PublicDNS = aws.ToString(inst.PrivateDnsName), aws.ToString(inst.PublicDnsName)
}

// waitFor polls check every Poll until it reports done, for at most
// Timeout, reporting each new status it gives as progress.
func (b *Backend) waitFor(ctx context.Context, req provisioner.Request, step, what string, check func() (done bool, status string, err error)) error {
	return b.waitWithin(ctx, req, step, what, b.cfg.Timeout, check)
}

func (b *Backend) waitWithin(ctx context.Context, req provisioner.Request, step, what string, timeout time.Duration, check func() (done bool, status string, err error)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	t := time.NewTicker(b.cfg.Poll)
	defer t.Stop()
	last := ""
	for {
		done, status, err := check()
		if err != nil {
			return err
		}
		if status != last {
			req.Progress(step, what+": "+status)
			last = status
		}
		if done {
			return nil
		}
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return protocol.Errorf(protocol.CodeDeadlineExceeded, "%s: still %s after %s", what, last, timeout)
			}
			return ctx.Err()
		case <-t.C:
		}
	}
}

func generation(req provisioner.Request) string { return strconv.FormatUint(req.Generation, 10) }
