package server

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// Load balancers (/load-balancers, contract §4.4): settings a save
// changes, and what is in the cloud, which only their actions change. An
// action is an operation like an instance's: it claims the load balancer
// (one operation at a time, by revision), sends an lb-apply or lb-delete
// request, and ends when the provisioner's record of the load balancer
// (fm_balancers) says how the request ended (settleBalancer).

const kindLB = "load balancer"

// The load balancer operations.
const (
	opLBProvision   = "provision-load-balancer"
	opLBUpdate      = "update-load-balancer"
	opLBReprovision = "reprovision-load-balancer"
	opLBDeprovision = "deprovision-load-balancer"
	opLBDelete      = "delete-load-balancer"
)

// lbDeadline is how long a load balancer operation may take: an AWS one
// takes minutes to become active.
const lbDeadline = 30 * time.Minute

// maxLBNodes bounds a load balancer's nodes (an AWS listener takes 100
// rules).
const maxLBNodes = 100

var (
	reHostname       = regexp.MustCompile(`^(?i)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$`)
	reCertificateARN = regexp.MustCompile(`^arn:aws[a-z-]*:(acm|iam):[a-z0-9-]*:\d{12}:(certificate|server-certificate)/[A-Za-z0-9/_+=,.@-]+$`)
)

// lbAction is what an action on a load balancer does.
type lbAction struct {
	kind    string
	from    []string // the states it starts from
	during  string   // the state while it runs
	request protocol.ProvisionAction
	// recreate removes what exists before making it again.
	recreate bool
}

func lbActions() map[string]lbAction {
	return map[string]lbAction{
		"provision": {kind: opLBProvision, from: []string{api.LBStateNotProvisioned, api.LBStateFailed},
			during: api.LBStateProvisioning, request: protocol.ProvisionBalancerApply},
		"update": {kind: opLBUpdate, from: []string{api.LBStateProvisioned, api.LBStateFailed},
			during: api.LBStateUpdating, request: protocol.ProvisionBalancerApply},
		"reprovision": {kind: opLBReprovision, from: []string{api.LBStateNotProvisioned, api.LBStateProvisioned, api.LBStateFailed},
			during: api.LBStateProvisioning, request: protocol.ProvisionBalancerApply, recreate: true},
		"deprovision": {kind: opLBDeprovision, from: []string{api.LBStateNotProvisioned, api.LBStateProvisioned, api.LBStateFailed},
			during: api.LBStateDeprovisioning, request: protocol.ProvisionBalancerDelete},
	}
}

func (s *Server) listLBs(r *http.Request) (any, error) {
	p, err := pageOf(r.URL.Query())
	if err != nil {
		return nil, err
	}
	rows := s.st.lbs.rows()
	all := make([]api.LoadBalancer, len(rows))
	for i, row := range rows {
		all[i] = row.val
		all[i].Revision = row.rev
	}
	return pageRows(p, all, func(lb *api.LoadBalancer) string { return lb.ID }), nil
}

func (s *Server) getLB(r *http.Request) (any, error) {
	id := r.PathValue("id")
	lb, rev, ok := s.st.lbs.get(id)
	if !ok {
		return nil, notFound(kindLB, id)
	}
	lb.Revision = rev
	return lb, nil
}

func (s *Server) createLB(r *http.Request) (any, error) {
	var lb api.LoadBalancer
	if err := readJSON(r, &lb); err != nil {
		return nil, err
	}
	if err := refuseOtherCloudLB(lb); err != nil {
		return nil, err
	}
	normalizeLB(&lb)
	if err := s.validateLB(r.Context(), &lb, ""); err != nil {
		return nil, err
	}
	now := time.Now().UTC()
	lb.State, lb.OperationID, lb.Address, lb.Error, lb.Order = api.LBStateNotProvisioned, "", "", nil, 0
	lb.CreatedAt, lb.UpdatedAt, lb.Deleting = now, now, false
	for attempt := 0; ; attempt++ {
		lb.ID = newID("lb")
		rev, err := s.st.lbs.create(r.Context(), lb.ID, lb)
		if errors.Is(err, errExists) && attempt < 5 {
			continue // an id drawn twice
		}
		if err != nil {
			return nil, unavailable(err, "the load balancer could not be stored")
		}
		lb.Revision = rev
		break
	}
	// A network or an instance deleted meanwhile: its deletion read the
	// load balancers before this one was stored.
	if err := s.lbReferencesUsable(r.Context(), lb); err != nil {
		_ = s.st.lbs.kv.Purge(r.Context(), lb.ID)
		return nil, err
	}
	return lb, nil
}

// saveLB serves PUT /load-balancers/{id}: the whole object, as a client
// echoes it with its changes. FM's fields (state, operation, address) are
// kept as they are; what is in the cloud changes only with an action.
func (s *Server) saveLB(r *http.Request) (any, error) {
	id := r.PathValue("id")
	var body api.LoadBalancer
	if err := readJSON(r, &body); err != nil {
		return nil, err
	}
	if body.ID != "" && body.ID != id {
		return nil, invalid("id: the body is load balancer %q but the path names %q", body.ID, id)
	}
	if err := refuseOtherCloudLB(body); err != nil {
		return nil, err
	}
	normalizeLB(&body)
	// An operation may claim the load balancer while this is written (its
	// record holds both): the save is tried again on what it left, which
	// a full replace does not depend on.
	for attempt := 0; attempt < 5; attempt++ {
		cur, rev, err := s.st.lbs.fetch(r.Context(), id)
		if errors.Is(err, errNotFound) {
			return nil, notFound(kindLB, id)
		}
		if err != nil {
			return nil, unavailable(err, "the load balancer could not be read")
		}
		if cur.Deleting {
			return nil, precondition("load balancer %s is being deleted", id)
		}
		next := body
		next.ID, next.State, next.OperationID, next.Address, next.Error, next.Order = id, cur.State, cur.OperationID, cur.Address, cur.Error, cur.Order
		next.CreatedAt, next.UpdatedAt, next.Deleting, next.Revision = cur.CreatedAt, time.Now().UTC(), false, 0
		if next.VirtualNetworkID != cur.VirtualNetworkID && cur.State != api.LBStateNotProvisioned {
			return nil, precondition("load balancer %s is in the cloud on virtual network %s: deprovision it before it moves to another", id, cur.VirtualNetworkID)
		}
		if err := s.validateLB(r.Context(), &next, id); err != nil {
			return nil, err
		}
		newRev, err := s.st.lbs.update(r.Context(), id, next, rev)
		if errors.Is(err, errConflict) {
			continue
		}
		if err != nil {
			return nil, unavailable(err, "the load balancer could not be stored")
		}
		if err := s.lbReferencesUsable(r.Context(), next); err != nil {
			// Put back as it was: a node whose instance went meanwhile.
			if _, uerr := s.st.lbs.update(r.Context(), id, cur, newRev); uerr != nil {
				s.log.Warn().Err(uerr).Str("load_balancer", id).Msg("a save naming an instance being deleted was not undone")
			}
			return nil, err
		}
		next.Revision = newRev
		return next, nil
	}
	return nil, conflict("load balancer %s is being changed by someone else; retry", id)
}

// deleteLB serves DELETE /load-balancers/{id}: one never made in the cloud
// goes at once; otherwise an operation removes it from the cloud first,
// and the load balancer goes when it succeeds.
func (s *Server) deleteLB(r *http.Request) (any, error) {
	id := r.PathValue("id")
	lb, rev, err := s.st.lbs.fetch(r.Context(), id)
	if errors.Is(err, errNotFound) {
		return nil, notFound(kindLB, id)
	}
	if err != nil {
		return nil, unavailable(err, "the load balancer could not be read")
	}
	if lb.State == api.LBStateNotProvisioned && lb.OperationID == "" {
		if err := s.st.lbs.remove(r.Context(), id, rev); errors.Is(err, errConflict) {
			return nil, conflict("load balancer %s is being changed by someone else; retry", id)
		} else if err != nil {
			return nil, unavailable(err, "the load balancer could not be deleted")
		}
		return s.finishedOp(r, opLBDelete, "loadBalancer", id, map[string]any{"id": id, "name": lb.Name}, nil)
	}
	return s.actOnLB(r.Context(), id, lbAction{kind: opLBDelete,
		from:   []string{api.LBStateNotProvisioned, api.LBStateProvisioned, api.LBStateFailed},
		during: api.LBStateDeprovisioning, request: protocol.ProvisionBalancerDelete})
}

// lbAction serves POST /load-balancers/{id}/actions/{action}.
func (s *Server) lbAction(name string) func(r *http.Request) (any, error) {
	a := lbActions()[name]
	return func(r *http.Request) (any, error) {
		return s.actOnLB(r.Context(), r.PathValue("id"), a)
	}
}

// actOnLB records the operation, claims the load balancer for it and
// sends its request. A server that stops in between leaves an operation
// that never claimed it (ended by the sweep as never started) or a claim
// whose request is sent again by the sweep.
func (s *Server) actOnLB(ctx context.Context, id string, a lbAction) (any, error) {
	for attempt := 0; attempt < 5; attempt++ {
		lb, rev, err := s.st.lbs.fetch(ctx, id)
		if errors.Is(err, errNotFound) {
			return nil, notFound(kindLB, id)
		}
		if err != nil {
			return nil, unavailable(err, "the load balancer could not be read")
		}
		if lb.OperationID != "" {
			op, _, err := s.st.ops.fetch(ctx, lb.OperationID)
			if err == nil && op.State == api.OpRunning {
				return nil, newAPIError(protocol.CodeFailedPrecondition, "Operation in progress",
					"load balancer %s is busy with %s (operation %s); wait for it to end", id, op.Kind, op.JobID)
			}
			if err != nil && !errors.Is(err, errNotFound) {
				return nil, unavailable(err, "the load balancer's operation could not be read")
			}
			if err := s.settleBalancer(ctx, id); err != nil {
				return nil, unavailable(err, "the load balancer's last operation could not be settled")
			}
			continue
		}
		if lb.Deleting || !slices.Contains(a.from, lb.State) {
			return nil, precondition("cannot %s load balancer %s while it is %s", strings.TrimSuffix(a.kind, "-load-balancer"), id, lbStateName(lb))
		}
		spec, cloud, err := s.balancerSpec(ctx, lb, a.request == protocol.ProvisionBalancerApply)
		if err != nil {
			return nil, err
		}
		spec.Recreate = a.recreate
		op := newRunningOp(ctx, a.kind, "", lbDeadline)
		op.TargetKind, op.TargetID, op.LoadBalancer = "loadBalancer", id, id
		req := protocol.ProvisionRequest{ID: protocol.NewID("req"), Action: a.request, OpID: op.JobID,
			CallID: op.CallID, Issued: time.Now().UTC(), Order: lb.Order + 1, Deadline: op.Deadline, Cloud: cloud, LoadBalancer: spec}
		if op.Request, err = protocol.Encode(&req); err != nil {
			return nil, internal(err, "the load balancer's request could not be encoded")
		}
		op.RequestID = req.ID
		// Not waited for in the copy: marking it claimed, below, writes the
		// same key again and is.
		recorded, err := s.st.ops.createUnwaited(ctx, op.JobID, op)
		if err != nil {
			return nil, unavailable(err, "the operation could not be recorded")
		}
		s.crash.At("server/lb/op-recorded")
		next := lb
		next.OperationID, next.State, next.Order, next.Error, next.UpdatedAt = op.JobID, a.during, req.Order, nil, time.Now().UTC()
		next.Deleting = a.kind == opLBDelete
		claimed, err := s.st.lbs.update(ctx, id, next, rev)
		if err != nil {
			_ = s.st.ops.kv.Purge(ctx, op.JobID) // nobody saw it
			if errors.Is(err, errConflict) {
				continue
			}
			return nil, unavailable(err, "the load balancer could not be claimed")
		}
		s.crash.At("server/lb/claimed")
		// A call that stalled between recording and claiming may find its
		// operation ended by the sweep as never started: its request must
		// not go out (a load balancer made for an operation that says
		// nothing was done). Give the load balancer back and start again.
		// Marking the operation claimed keeps the sweep from ending it from
		// now on (endNeverStarted).
		if cur, err := s.markClaimed(ctx, op, recorded); err != nil || cur.State != api.OpRunning {
			if _, uerr := s.st.lbs.update(ctx, id, lb, claimed); uerr != nil {
				s.log.Warn().Err(uerr).Str("load_balancer", id).Str("op", op.JobID).Msg("the load balancer was not given back; the sweep settles it")
			}
			if err != nil {
				return nil, unavailable(err, "the operation could not be marked claimed; retry")
			}
			s.log.Warn().Str("load_balancer", id).Str("op", op.JobID).Str("state", cur.State).Msg("the operation was ended before it claimed its load balancer; starting again")
			continue
		}
		s.log.Info().Str("load_balancer", id).Str("op", op.JobID).Str("action", a.kind).Msg("load balancer operation started")
		s.publishLBOp(ctx, op)
		return op.Future, nil
	}
	return nil, conflict("load balancer %s is being changed by someone else; retry", id)
}

func (s *Server) publishLBOp(ctx context.Context, op opRecord) {
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var req protocol.ProvisionRequest
	if err := protocol.Decode(op.Request, &req); err != nil {
		s.log.Error().Err(err).Str("op", op.JobID).Msg("the load balancer's request does not decode")
		return
	}
	if _, err := s.js.Publish(pctx, protocol.ProvisionSubject(op.LoadBalancer, req.Action), op.Request, jetstream.WithMsgID(op.RequestID)); err != nil {
		s.log.Warn().Err(err).Str("op", op.JobID).Msg("load balancer request not published yet; it will be retried")
	}
}

// lbStateName says a load balancer's state for a refusal.
func lbStateName(lb api.LoadBalancer) string {
	if lb.Deleting {
		return "being deleted"
	}
	return strings.ToLower(strings.ReplaceAll(lb.State, "_", " "))
}

// balancerSpec is what the provisioner needs to make lb (withNodes) or to
// remove it: its network, and each node's machine and the port DSS
// answers on. A node whose instance has no machine running is refused:
// there would be nothing to send its requests to. Removing needs no node.
func (s *Server) balancerSpec(ctx context.Context, lb api.LoadBalancer, withNodes bool) (*protocol.BalancerSpec, *protocol.CloudAuth, error) {
	vn, _, err := s.st.networks.getOrFetch(ctx, lb.VirtualNetworkID)
	if errors.Is(err, errNotFound) {
		return nil, nil, precondition("the virtual network %s of load balancer %s does not exist", lb.VirtualNetworkID, lb.ID)
	} else if err != nil {
		return nil, nil, unavailable(err, "the virtual network could not be read")
	}
	cloud, err := s.cloudAuthOfNetwork(ctx, vn)
	if err != nil {
		return nil, nil, err
	}
	tags := map[string]string{}
	doc, _, _ := s.st.settings.get(settingsKey(api.DefaultTenant, settingCloudTags))
	for _, layer := range []map[string]string{doc.CloudTags, vn.CloudTags, lb.CloudTags} {
		maps.Copy(tags, layer)
	}
	spec := &protocol.BalancerSpec{ID: lb.ID, Name: lb.Name, Internal: lb.PublicIPMode == api.LBNoPublicIP,
		CertificateARN: lb.AWSCertificateARN, Tags: tags, SecondSubnetID: vn.AWSSecondSubnetID, Nodes: []protocol.BalancerNode{},
		Network: protocol.NetworkSpec{ID: vn.ID, Region: vn.AWSRegion, VpcID: vn.AWSVpcID, SubnetID: vn.AWSSubnetID,
			AutoCreateSecurityGroups: vn.AWSAutoCreateSecurityGroups == nil || *vn.AWSAutoCreateSecurityGroups,
			SecurityGroups:           vn.AWSSecurityGroups}}
	if !withNodes {
		return spec, cloud, nil
	}
	if !s.cfg.LocalBackend {
		// What AWS would refuse halfway, refused before anything is made.
		var problems []string
		if vn.AWSSecondSubnetID == "" {
			problems = append(problems, fmt.Sprintf("virtual network %s has no second subnet (awsSecondSubnetId): an AWS load balancer spans two availability zones", vn.ID))
		}
		if !spec.Network.AutoCreateSecurityGroups && len(vn.AWSSecurityGroups)+1 > maxLBSecurityGroups {
			problems = append(problems, fmt.Sprintf("virtual network %s names %d security groups; with FM's own a load balancer may have %d", vn.ID, len(vn.AWSSecurityGroups), maxLBSecurityGroups))
		}
		if len(tags) > maxLBUserTags {
			problems = append(problems, fmt.Sprintf("the tenant's, the network's and the load balancer's cloud tags are %d together; at most %d (AWS allows 50, FM adds its own)", len(tags), maxLBUserTags))
		}
		if len(problems) > 0 {
			return nil, nil, precondition("load balancer %s cannot be made on AWS: %s", lb.ID, strings.Join(problems, "; "))
		}
	}
	var missing []string
	for _, n := range lb.Nodes {
		m, _, err := s.st.machines.fetch(ctx, n.InstanceID)
		if err != nil && !errors.Is(err, errNotFound) {
			return nil, nil, unavailable(err, "the machine of instance %s could not be read", n.InstanceID)
		}
		if m.Status != protocol.MachineRunning {
			missing = append(missing, n.InstanceID)
			continue
		}
		// The port FM gave the instance: not what its agent says, which a
		// compromised machine could point at another's.
		lc, _, _ := s.st.lifecycle.get(n.InstanceID)
		port := lc.BasePort
		if port <= 0 || port > 65535 {
			port = defaultDSSPort
		}
		spec.Nodes = append(spec.Nodes, protocol.BalancerNode{Hostname: strings.ToLower(n.Hostname), Instance: n.InstanceID,
			MachineID: m.MachineID, Address: firstNonEmpty(m.PrivateIP, m.PrivateDNS), Port: port})
	}
	if len(missing) > 0 {
		return nil, nil, precondition("instances %s of load balancer %s have no running machine to send requests to: provision or start them, or remove them from its nodes",
			describeUsers(missing), lb.ID)
	}
	return spec, cloud, nil
}

// What an AWS load balancer allows: 5 security groups; 50 tags on each
// thing made, of which FM's take at most 5 (a target group's: Name,
// fm:load-balancer, fm:role, fm:instance, fm:hostname; provisioner/ec2).
const (
	maxLBSecurityGroups = 5
	maxLBUserTags       = 45
)

// defaultDSSPort is DSS's port when nothing says otherwise.
const defaultDSSPort = 10000

// settleBalancers ends the load balancers' operations that the provisioner
// finished, fails those past their deadline, sends again a request not
// taken yet, ends operations that never claimed their load balancer, and
// gives each load balancer its operation's outcome (every sweep).
func (s *Server) settleBalancers(ctx context.Context) {
	for _, row := range s.st.lbs.rows() {
		if row.val.OperationID != "" && !s.balancerUnderWay(row.key, row.val.OperationID) {
			if err := s.settleBalancer(ctx, row.key); err != nil && ctx.Err() == nil {
				s.log.Warn().Err(err).Str("load_balancer", row.key).Msg("load balancer not settled; will retry")
			}
		}
	}
	now := time.Now()
	for _, row := range s.st.ops.rowsOf(api.OpRunning) {
		op := row.val
		if op.LoadBalancer == "" || now.Sub(op.StartedAt) <= 3*s.cfg.RepublishAfter {
			continue
		}
		if lb, _, ok := s.st.lbs.get(op.LoadBalancer); ok && lb.OperationID == op.JobID {
			continue
		}
		// From the bucket: the copy may lag behind a claim just made.
		if lb, _, err := s.st.lbs.fetch(ctx, op.LoadBalancer); (err == nil && lb.OperationID != op.JobID) || errors.Is(err, errNotFound) {
			s.endNeverStarted(ctx, op, op.LoadBalancer)
		}
	}
}

// balancerUnderWay reports, from the copies, that a load balancer's
// operation is running with its deadline ahead, its request taken by the
// provisioner and not finished, or not taken and not due to be sent again:
// nothing for the sweep to do, so no bus call (settleBalancer reads three
// buckets). A copy lagging behind says false, and the buckets decide.
func (s *Server) balancerUnderWay(id, opID string) bool {
	op, _, ok := s.st.ops.get(opID)
	if !ok || op.State != api.OpRunning || !time.Now().Before(op.Deadline) {
		return false
	}
	phys, _, _ := s.st.balancers.get(id)
	if phys.RequestID == op.RequestID {
		return phys.Status == protocol.BalancerApplying || phys.Status == protocol.BalancerDeleting
	}
	return time.Since(op.StartedAt) <= s.cfg.RepublishAfter
}

// settleBalancer brings a load balancer and its operation in line with
// what the provisioner recorded: an operation whose request ended is ended
// with its outcome, and a load balancer whose operation ended takes the
// state it leads to (a deleted one goes).
func (s *Server) settleBalancer(ctx context.Context, id string) error {
	lb, rev, err := s.st.lbs.fetch(ctx, id)
	if errors.Is(err, errNotFound) {
		return nil
	}
	if err != nil || lb.OperationID == "" {
		return err
	}
	op, _, err := s.st.ops.fetch(ctx, lb.OperationID)
	found := err == nil
	if err != nil && !errors.Is(err, errNotFound) {
		return err
	}
	phys, _, err := s.st.balancers.fetch(ctx, id)
	if err != nil && !errors.Is(err, errNotFound) {
		return err
	}
	if found && op.State == api.OpRunning {
		done := phys.RequestID == op.RequestID && phys.Status != protocol.BalancerApplying && phys.Status != protocol.BalancerDeleting
		var err error
		switch {
		case done && phys.Status == protocol.BalancerFailed:
			op, err = s.endOp(ctx, op.JobID, nil, apiErrorOf(phys.Error, "The load balancer operation failed"))
		case done:
			result := lb
			result.State, result.OperationID, result.Address = lbEndState(op.Kind, true), "", phys.Address
			op, err = s.endOp(ctx, op.JobID, result, nil)
		case time.Now().After(op.Deadline):
			op, err = s.endOp(ctx, op.JobID, nil, &api.Error{ErrorType: string(protocol.CodeDeadlineExceeded), Message: "Operation timed out",
				DetailedMessage: op.Kind + " of " + id + " did not finish by " + op.Deadline.Format(time.RFC3339)})
		default:
			if phys.RequestID != op.RequestID && time.Since(op.StartedAt) > s.cfg.RepublishAfter && s.shouldRepublish(op.JobID) {
				s.log.Info().Str("op", op.JobID).Msg("load balancer request not taken yet; publishing it again")
				s.publishLBOp(ctx, op)
			}
			return nil
		}
		if err != nil {
			// Not ended (the write failed, or another replica's came
			// first): the load balancer is settled from what the bucket
			// says, next time.
			return err
		}
	}
	succeeded := found && op.State == api.OpSucceeded
	if succeeded && op.Kind == opLBDelete {
		if err := s.st.lbs.remove(ctx, id, rev); err != nil && !errors.Is(err, errConflict) {
			return err
		}
		s.log.Info().Str("load_balancer", id).Msg("load balancer deleted")
		return nil
	}
	next := lb
	next.OperationID, next.Deleting, next.UpdatedAt = "", false, time.Now().UTC()
	next.State = lbEndState(op.Kind, succeeded)
	if !found {
		next.State = api.LBStateFailed
	}
	next.Error = nil
	if !succeeded && found && op.Error != nil {
		next.Error = op.Error
	}
	if phys.RequestID != "" {
		next.Address = phys.Address
	}
	if next.State == api.LBStateNotProvisioned {
		next.Address = ""
	}
	if _, err := s.st.lbs.update(ctx, id, next, rev); err != nil && !errors.Is(err, errConflict) {
		return err
	}
	return nil
}

// lbEndState is the state an operation of kind leaves its load balancer
// in.
func lbEndState(kind string, succeeded bool) string {
	switch {
	case !succeeded:
		return api.LBStateFailed
	case kind == opLBDeprovision || kind == opLBDelete:
		return api.LBStateNotProvisioned
	}
	return api.LBStateProvisioned
}

// lbPhysicalStatus serves GET /load-balancers/{id}/physical/status: what
// the provisioner last made of it.
func (s *Server) lbPhysicalStatus(r *http.Request) (any, error) {
	id := r.PathValue("id")
	lb, _, ok := s.st.lbs.get(id)
	if !ok {
		return nil, notFound(kindLB, id)
	}
	out := api.LoadBalancerPhysicalStatus{ID: id, State: lb.State, Status: "none", Nodes: []api.LoadBalancerNode{}}
	phys, _, err := s.st.balancers.fetch(r.Context(), id)
	if errors.Is(err, errNotFound) {
		return out, nil
	}
	if err != nil {
		return nil, unavailable(err, "the load balancer's state could not be read")
	}
	out.Backend, out.Status, out.Address, out.Details = phys.Backend, string(phys.Status), phys.Address, phys.Details
	out.Error = apiErrorOf(phys.Error, "The load balancer operation failed")
	if phys.Error == nil {
		out.Error = nil
	}
	for _, n := range phys.Nodes {
		out.Nodes = append(out.Nodes, api.LoadBalancerNode{Hostname: n.Hostname, InstanceID: n.Instance})
	}
	updated := phys.Updated
	out.Updated = &updated
	return out, nil
}

// refuseOtherCloudLB refuses an Azure load balancer clearly.
func refuseOtherCloudLB(lb api.LoadBalancer) error {
	azure := lb.CertificateMode == api.LBCertificateAzureSecret ||
		lb.PublicIPMode == api.LBStaticPublicIP
	for k, v := range lb.Extra {
		set := string(v) != "null" && string(v) != `""`
		if set && (strings.EqualFold(k, "tier") || strings.HasPrefix(strings.ToLower(k), "azure")) {
			azure = true
		}
	}
	if azure {
		return newAPIError(protocol.CodeUnimplemented, "Not supported",
			"Azure load balancers are not supported by this Fleet Manager, which manages AWS only: create an AWS load balancer (certificateMode AWS_ARN)")
	}
	return nil
}

func normalizeLB(lb *api.LoadBalancer) {
	lb.Name = trim(lb.Name)
	lb.Description = trim(lb.Description)
	lb.VirtualNetworkID = trim(lb.VirtualNetworkID)
	lb.AWSCertificateARN = trim(lb.AWSCertificateARN)
	lb.PublicIPMode = trim(lb.PublicIPMode)
	switch {
	case lb.AWSCertificateARN != "":
		defaultString(&lb.CertificateMode, api.LBCertificateAWSARN)
	case lb.CertificateMode == api.LBCertificateAWSARN:
		// Dataiku's client sets the mode with a certificate and has no
		// setter to clear it: a certificate emptied means none.
		lb.CertificateMode = ""
	}
	if lb.FMTags == nil {
		lb.FMTags = []string{}
	}
	for i := range lb.FMTags {
		lb.FMTags[i] = trim(lb.FMTags[i])
	}
	if lb.Nodes == nil {
		lb.Nodes = []api.LoadBalancerNode{}
	}
	for i := range lb.Nodes {
		lb.Nodes[i].Hostname = strings.ToLower(trim(lb.Nodes[i].Hostname))
		lb.Nodes[i].InstanceID = trim(lb.Nodes[i].InstanceID)
	}
}

// validateLB checks a load balancer's settings, and that its network and
// its nodes' instances exist (and are not being deleted), the instances
// on its network; id is the load balancer's ("" for a new one).
func (s *Server) validateLB(ctx context.Context, lb *api.LoadBalancer, id string) error {
	var c checker
	if c.required("name", lb.Name) {
		c.maxLen("name", lb.Name, 255)
	}
	c.maxLen("description", lb.Description, 2000)
	if lb.PublicIPMode != "" {
		c.oneOf("publicIpMode", lb.PublicIPMode, api.LBNoPublicIP, api.LBDynamicPublicIP)
	}
	if lb.CertificateMode != "" {
		c.oneOf("certificateMode", lb.CertificateMode, api.LBCertificateAWSARN)
	}
	if lb.AWSCertificateARN != "" {
		c.match("awsCertificateARN", lb.AWSCertificateARN, reCertificateARN, "an ACM or IAM certificate ARN")
	}
	c.cloudTags("cloudTags", lb.CloudTags)
	c.fmTags("fmTags", lb.FMTags)
	extra := 0
	for k, v := range lb.Extra {
		extra += len(k) + len(v)
	}
	if extra > maxExtraKeys {
		c.fail("(other keys)", "the keys FM does not know take %d bytes; at most %d are kept", extra, maxExtraKeys)
	}
	if len(lb.Nodes) > maxLBNodes {
		c.fail("nodes", "has %d nodes; at most %d are allowed", len(lb.Nodes), maxLBNodes)
	}
	hosts := map[string]bool{}
	for i, n := range lb.Nodes {
		field := fmt.Sprintf("nodes[%d]", i)
		switch {
		case !reHostname.MatchString(n.Hostname) || len(n.Hostname) > 128:
			c.fail(field+".hostname", "%q is not a host name (such as design.example.com)", n.Hostname)
		case hosts[n.Hostname]:
			c.fail(field+".hostname", "%q is listed twice; each node has a host name of its own", n.Hostname)
		}
		hosts[n.Hostname] = true
		if c.required(field+".instanceId", n.InstanceID) {
			in, _, err := s.st.instances.getOrFetch(ctx, n.InstanceID)
			switch {
			case errors.Is(err, errNotFound):
				c.fail(field+".instanceId", "instance %q does not exist", n.InstanceID)
			case err != nil:
				return unavailable(err, "the instance %s could not be read", n.InstanceID)
			case lb.VirtualNetworkID != "" && in.VirtualNetworkID != lb.VirtualNetworkID:
				c.fail(field+".instanceId", "instance %s is on virtual network %s, not on the load balancer's (%s)", n.InstanceID, in.VirtualNetworkID, lb.VirtualNetworkID)
			}
		}
	}
	if c.required("virtualNetworkId", lb.VirtualNetworkID) {
		if _, _, err := s.st.networks.getOrFetch(ctx, lb.VirtualNetworkID); errors.Is(err, errNotFound) {
			c.fail("virtualNetworkId", "virtual network %q does not exist", lb.VirtualNetworkID)
		} else if err != nil {
			return unavailable(err, "the virtual network could not be read")
		}
	}
	return c.err(kindLB)
}

// lbReferencesUsable checks, from the buckets themselves, right after a
// load balancer naming them was written, that its network is not being
// deleted and that no instance of its nodes is: a deletion that began
// before the write did not see it.
func (s *Server) lbReferencesUsable(ctx context.Context, lb api.LoadBalancer) error {
	if err := ensureUsable(ctx, s.st.networks, lb.VirtualNetworkID); err != nil {
		return err
	}
	for _, n := range lb.Nodes {
		if _, _, err := s.st.instances.fetch(ctx, n.InstanceID); errors.Is(err, errNotFound) {
			return precondition("instance %s of node %s no longer exists", n.InstanceID, n.Hostname)
		} else if err != nil {
			return unavailable(err, "the instance %s could not be read", n.InstanceID)
		}
		if lc, _, err := s.st.lifecycle.fetch(ctx, n.InstanceID); err == nil && (lc.OpKind == opDelete || lc.State == stateDeleting) {
			return precondition("instance %s of node %s is being deleted", n.InstanceID, n.Hostname)
		}
	}
	return nil
}

// lbsUsing lists the load balancers whose nodes name an instance, in their
// settings or as made (a node removed from the settings is served until
// an update), as the bus holds them now: an instance one uses cannot be
// deleted.
func (s *Server) lbsUsing(ctx context.Context, instance string) ([]string, error) {
	if err := s.st.lbs.sync(ctx); err != nil {
		return nil, unavailable(err, "the load balancers could not be read")
	}
	if err := s.st.balancers.sync(ctx); err != nil {
		return nil, unavailable(err, "the load balancers could not be read")
	}
	var ids []string
	for _, row := range s.st.lbs.rows() {
		phys, _, _ := s.st.balancers.get(row.key)
		if slices.ContainsFunc(row.val.Nodes, func(n api.LoadBalancerNode) bool { return n.InstanceID == instance }) ||
			phys.Status != protocol.BalancerDeleted && slices.ContainsFunc(phys.Nodes, func(n protocol.BalancerNode) bool { return n.Instance == instance }) {
			ids = append(ids, row.key)
		}
	}
	return ids, nil
}

// checkUnbalanced refuses the deletion of an instance a load balancer uses.
func (s *Server) checkUnbalanced(ctx context.Context, instance string) error {
	lbs, err := s.lbsUsing(ctx, instance)
	if err != nil {
		return err
	}
	if len(lbs) > 0 {
		return precondition("instance %s is a node of load balancer %s: remove it from its nodes and update it first", instance, describeUsers(lbs))
	}
	return nil
}

// refuseIfBalanced, once a deletion has claimed its instance, looks again
// for a load balancer using it: a save that named the instance before the
// claim has written it by now (one after the claim is undone by
// lbReferencesUsable). Found, the deletion fails, the instance back in
// state. A look that could not be made (the bus away) leaves the
// deletion claimed and unsent: the sweep looks again before it sends it
// (balancedDeletion), or before it ends one without a machine.
func (s *Server) refuseIfBalanced(ctx context.Context, op opRecord, state string) error {
	err := s.checkUnbalanced(ctx, op.Instance)
	if err == nil || asAPIError(err).code != protocol.CodeFailedPrecondition {
		return err
	}
	if ferr := s.failOpTo(ctx, op, balancedError(err), state); ferr != nil {
		s.log.Warn().Err(ferr).Str("op", op.JobID).Msg("a deletion refused for a load balancer was not ended; the sweep looks again")
	}
	s.withdrawJoinTokens(ctx, op.Instance, op.RequestID)
	return err
}

func balancedError(err error) *api.Error {
	e := asAPIError(err)
	return &api.Error{ErrorType: string(e.code), Message: "Not allowed now", DetailedMessage: e.detail}
}

// balancedDeletion, for the sweep, about a deletion of op.Instance it is
// about to send again or to end: true if it must not go on, because a load
// balancer uses the instance (the deletion is failed then) or that could
// not be told (asked again next time). A server killed between a
// deletion's claim and its look at the load balancers left it to this.
func (s *Server) balancedDeletion(ctx context.Context, op opRecord) bool {
	err := s.checkUnbalanced(ctx, op.Instance)
	switch {
	case err == nil:
		return false
	case asAPIError(err).code == protocol.CodeFailedPrecondition:
		if ferr := s.failOp(ctx, op, balancedError(err)); ferr != nil {
			s.log.Warn().Err(ferr).Str("op", op.JobID).Msg("a deletion refused for a load balancer was not ended yet")
		}
	default:
		s.log.Warn().Err(err).Str("op", op.JobID).Msg("the load balancers of a deletion's instance could not be read; asked again")
	}
	return true
}

// lbsOnNetwork lists the load balancers on a network.
func (s *Server) lbsOnNetwork(ctx context.Context, network string) ([]string, error) {
	if err := s.st.lbs.sync(ctx); err != nil {
		return nil, unavailable(err, "the load balancers could not be read")
	}
	var ids []string
	for _, row := range s.st.lbs.rows() {
		if row.val.VirtualNetworkID == network {
			ids = append(ids, row.key)
		}
	}
	return ids, nil
}
