package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// The kinds of instance operation, as futures name them.
const (
	opReprovision   = "reprovision"
	opDeprovision   = "deprovision"
	opStart         = "start"
	opStop          = "stop"
	opDelete        = "delete-instance"
	opRestartDSS    = "restart-dss"
	opReplayActions = "replay-setup-actions"
	opResetPassword = "reset-user-password"
	opDiagnosis     = "collect-diagnosis"
	opUpgradeAgent  = "upgrade-agent"
)

// action is one instance action: where it may start from, the state it
// leaves the instance in while it runs, and how long it may take.
type action struct {
	kind     string
	from     []string
	during   string // lifecycle state while it runs; "" keeps the state
	deadline time.Duration
	// prepare fills in the operation (request, command, target) and the
	// lifecycle it leads to; an error refuses the action, changing nothing.
	prepare func(ctx context.Context, in api.Instance, lc *lifecycle, op *opRecord, m protocol.MachineState) (*protocol.DesiredState, error)
}

func (s *Server) actions() map[string]action {
	return map[string]action{
		opReprovision: {kind: opReprovision, during: stateProvisioning, deadline: time.Hour,
			from:    []string{stateCreated, stateRunning, stateStopped, stateDeprovisioned, stateFailed},
			prepare: s.prepareReprovision},
		opStart: {kind: opStart, during: stateStarting, deadline: 30 * time.Minute,
			from: []string{stateStopped, stateFailed},
			prepare: func(ctx context.Context, in api.Instance, lc *lifecycle, op *opRecord, m protocol.MachineState) (*protocol.DesiredState, error) {
				if m.Status == "" || m.Status == protocol.MachineDeprovisioned || m.Status == protocol.MachineDeleted {
					return nil, precondition("instance %s has no machine to start; reprovision it", in.ID)
				}
				spec, err := s.machineSpec(in, lc.BasePort)
				if err != nil {
					return nil, err
				}
				op.Target = lc.Generation
				return nil, s.attachRequest(op, protocol.ProvisionRequest{Action: protocol.ProvisionStart, Generation: lc.Generation, Spec: spec})
			}},
		opStop: {kind: opStop, during: stateStopping, deadline: 15 * time.Minute,
			from: []string{stateRunning, stateFailed},
			prepare: func(ctx context.Context, in api.Instance, lc *lifecycle, op *opRecord, m protocol.MachineState) (*protocol.DesiredState, error) {
				if m.Status != protocol.MachineRunning && m.Status != protocol.MachineLost {
					return nil, precondition("instance %s has no running machine to stop", in.ID)
				}
				return nil, s.attachRequest(op, protocol.ProvisionRequest{Action: protocol.ProvisionStop})
			}},
		opDeprovision: {kind: opDeprovision, during: stateDeprovisioning, deadline: 30 * time.Minute,
			from: []string{stateRunning, stateStopped, stateFailed},
			prepare: func(ctx context.Context, in api.Instance, lc *lifecycle, op *opRecord, m protocol.MachineState) (*protocol.DesiredState, error) {
				if !m.HasMachine() {
					return nil, precondition("instance %s has no machine to deprovision", in.ID)
				}
				return nil, s.attachRequest(op, protocol.ProvisionRequest{Action: protocol.ProvisionDeprovision})
			}},
		opDelete: {kind: opDelete, during: stateDeleting, deadline: 30 * time.Minute,
			from: []string{stateCreated, stateRunning, stateStopped, stateDeprovisioned, stateFailed},
			prepare: func(ctx context.Context, in api.Instance, lc *lifecycle, op *opRecord, m protocol.MachineState) (*protocol.DesiredState, error) {
				opts, _ := ctx.Value(deleteOptionsKey{}).(deleteOptions)
				if m.HasMachine() && !opts.force {
					return nil, precondition("instance %s has a machine (%s); deprovision it first, or delete with force=True", in.ID, m.Status)
				}
				return nil, s.attachRequest(op, protocol.ProvisionRequest{Action: protocol.ProvisionDelete, KeepVolume: opts.keepVolume})
			}},
		opRestartDSS:    s.commandAction(opRestartDSS, protocol.CommandRestartDSS),
		opReplayActions: {kind: opReplayActions, from: []string{stateRunning}, deadline: time.Hour, prepare: s.prepareReplay},
		opResetPassword: s.commandAction(opResetPassword, protocol.CommandResetUserPassword),
		opDiagnosis:     s.commandAction(opDiagnosis, protocol.CommandCollectDiagnosis),
		opUpgradeAgent:  s.upgradeAgentAction(),
	}
}

// upgradeAgentAction is upgrade-agent: a command naming the binary FM
// serves (upgradeAgentParams; refused when it serves none), with the time
// for a download, a restart and the new agent's report window
// (agentReportWithin), which the agent keeps within the command's expiry.
// Asked of one instance or by a rollout, the action finds its params.
func (s *Server) upgradeAgentAction() action {
	a := s.commandAction(opUpgradeAgent, protocol.CommandUpgradeAgent)
	a.deadline = 30 * time.Minute
	prepare := a.prepare
	a.prepare = func(ctx context.Context, in api.Instance, lc *lifecycle, op *opRecord, m protocol.MachineState) (*protocol.DesiredState, error) {
		params, err := s.upgradeAgentParams()
		if err != nil {
			return nil, err
		}
		return prepare(context.WithValue(ctx, commandParamsKey{}, params), in, lc, op, m)
	}
	return a
}

// commandAction is an action carried out by the agent through a command.
func (s *Server) commandAction(kind string, cmd protocol.CommandKind) action {
	return action{kind: kind, from: []string{stateRunning}, deadline: 15 * time.Minute,
		prepare: func(ctx context.Context, in api.Instance, lc *lifecycle, op *opRecord, m protocol.MachineState) (*protocol.DesiredState, error) {
			c := protocol.Command{ID: op.JobID + "-cmd", Instance: in.ID, Kind: cmd, OpID: op.JobID,
				Issued: time.Now().UTC(), Expires: op.Deadline, CallID: op.CallID}
			if p, ok := ctx.Value(commandParamsKey{}).(json.RawMessage); ok {
				c.Params = p
				// Params may hold a password: the agent gets them sealed
				// when it has an instance key.
				if box := s.instanceBox(in.ID); box != nil {
					c.Params, c.SealedParams = nil, box.Seal(string(p), protocol.SealedParamsPlace(in.ID, c.ID))
				}
			}
			data, err := protocol.Encode(&c)
			if err != nil {
				return nil, internal(err, "the command could not be encoded")
			}
			op.CommandID, op.Command = c.ID, data
			return nil, nil
		}}
}

type commandParamsKey struct{}

// requestID is the id of the operation's provision request of action.
func requestID(op opRecord, action protocol.ProvisionAction) string {
	return op.JobID + "-" + string(action)
}

// attachRequest completes a provision request of the operation and keeps it
// in the operation.
func (s *Server) attachRequest(op *opRecord, req protocol.ProvisionRequest) error {
	req.ID, req.Instance, req.OpID, req.Issued, req.Order = requestID(*op, req.Action), op.Instance, op.JobID, time.Now().UTC(), op.Order
	req.CallID = op.CallID
	req.Deadline = op.Deadline
	cloud, err := s.cloudAuthOf(op.Instance, req)
	if err != nil {
		return err
	}
	req.Cloud = cloud
	data, err := protocol.Encode(&req)
	if err != nil {
		return internal(err, "the provision request could not be encoded")
	}
	op.RequestID, op.Request = req.ID, data
	return nil
}

// cloudAuth is the tenant's cloud credentials as the provisioner acts with
// them (for a network without a cloud account: cloudAuthOf), nil for FM's
// own.
func (s *Server) cloudAuth() *protocol.CloudAuth {
	cc := s.cloudCredentials()
	return s.awsIdentity(cc.AWSAuthenticationMode, cc.AWSIAMRoleARN, "", cc.AWSAccessKeyID, cc.AWSSecretAccessKey)
}

// instanceAction serves an action of the REST API on an instance.
func (s *Server) instanceAction(kind string) handlerFunc {
	return func(r *http.Request) (any, error) {
		id := r.PathValue("id")
		in, ok := s.st.instances.view(id)
		if !ok {
			return nil, notFound(kindInstance, id)
		}
		ctx := r.Context()
		switch kind {
		case opReprovision:
			allow, err := queryBool(r, "allowDowngrade", false)
			if err != nil {
				return nil, err
			}
			ctx = context.WithValue(ctx, allowDowngradeKey{}, allow)
		case opResetPassword:
			params, err := resetPasswordParams(r)
			if err != nil {
				return nil, err
			}
			ctx = context.WithValue(ctx, commandParamsKey{}, params)
		}
		f, err := s.act(ctx, in, s.actions()[kind])
		if err != nil {
			return nil, err
		}
		return f, nil
	}
}

// errInstanceBusy is what act's refusal of an instance busy with another
// operation matches (errors.Is; its apiError's kind, not a cause): what
// waits for the instance branches on it.
var errInstanceBusy = errors.New("instance busy with another operation")

type allowDowngradeKey struct{}

type deleteOptionsKey struct{}

type deleteOptions struct{ force, keepVolume bool }

// resetPasswordParams reads userName and password from a JSON body (clients
// from 13.5.4) or the query string (older clients).
func resetPasswordParams(r *http.Request) (json.RawMessage, error) {
	var p protocol.ResetUserPasswordParams
	if r.Method == http.MethodPost {
		if err := readJSON(r, &p); err != nil {
			return nil, err
		}
	} else {
		p.UserName, p.Password = r.URL.Query().Get("userName"), r.URL.Query().Get("password")
	}
	var c checker
	c.required("userName", p.UserName)
	c.required("password", p.Password)
	if err := c.err("password reset"); err != nil {
		return nil, err
	}
	b, _ := json.Marshal(p)
	return b, nil
}

// orderAfter is the order of an operation that claims the instance now:
// higher than the last claim's (kept in the lifecycle, which the claim
// writes by compare-and-set, so two claims never share one) and than every
// request the machine has seen. Requests are ordered by the bus, not a
// clock. The lifecycle's revision counts too, for records written before
// the lifecycle kept an order.
func orderAfter(lc lifecycle, rev uint64, m protocol.MachineState) uint64 {
	return max(lc.Order, rev, m.Order) + 1
}

// lifecycleOf reads an instance's lifecycle from the bucket (created if it
// has none) with its revision (0 if none).
func (s *Server) lifecycleOf(ctx context.Context, id string) (lifecycle, uint64, error) {
	lc, rev, err := s.st.lifecycle.fetch(ctx, id)
	if errors.Is(err, errNotFound) {
		return lifecycle{State: stateCreated}, 0, nil
	}
	return lc, rev, err
}

// machineOf reads an instance's machine state from the bucket's leader
// (the zero state if it has none): an action decides on it, and a copy
// lags behind the provisioner's writes.
func (s *Server) machineOf(ctx context.Context, id string) (protocol.MachineState, error) {
	m, _, err := s.st.machines.fetch(ctx, id)
	if errors.Is(err, errNotFound) {
		return protocol.MachineState{}, nil
	}
	return m, err
}

// act starts an action: it records the operation, claims the instance for
// it (a revision-checked write of its lifecycle, so that two actions never
// run at once), writes the desired state, and publishes the request or
// command. A refused action changes nothing. What prepare makes before the
// claim is harmless if the claim is lost (a join token nobody holds, which
// expires; a port claim the instance owns) and is withdrawn then.
func (s *Server) act(ctx context.Context, in api.Instance, a action) (api.Future, error) {
	for attempt := 0; attempt < 5; attempt++ {
		lc, rev, err := s.lifecycleOf(ctx, in.ID)
		if err != nil {
			return api.Future{}, unavailable(err, "the instance's state could not be read")
		}
		if lc.OpID != "" {
			busy, err := s.settleEnded(ctx, in.ID, lc, rev)
			if err != nil {
				return api.Future{}, err
			}
			if busy != nil {
				e := newAPIError(protocol.CodeFailedPrecondition, "Operation in progress",
					"instance %s is busy with %s (operation %s); wait for it to end or abort it (DELETE /futures/%s)",
					in.ID, busy.Kind, busy.JobID, busy.JobID)
				e.kind = errInstanceBusy
				return api.Future{}, e
			}
			if gone, err := s.instanceGone(ctx, in.ID); err == nil && gone {
				return api.Future{}, notFound(kindInstance, in.ID) // it was a deletion
			}
			continue // settled: look again
		}
		if !oneOfStr(lc.State, a.from...) {
			return api.Future{}, precondition("cannot %s instance %s while it is %s", a.kind, in.ID, lc.State)
		}
		m, err := s.machineOf(ctx, in.ID)
		if err != nil {
			return api.Future{}, unavailable(err, "the instance's machine could not be read")
		}
		deadline := a.deadline
		if s.cfg.OperationTimeout != 0 {
			deadline = s.cfg.OperationTimeout
		}
		op := newRunningOp(ctx, a.kind, in.ID, deadline)
		op.Order = orderAfter(lc, rev, m)
		next := lc
		next.Order = op.Order
		desired, err := a.prepare(ctx, in, &next, &op, m)
		if err != nil {
			s.withdrawJoinTokens(ctx, op.Instance, op.RequestID)
			return api.Future{}, err
		}
		if op.pendingSnapshot != nil && s.cfg.OperationTimeout == 0 {
			// The snapshot is taken first: a large volume's first EBS
			// snapshot alone can take hours.
			op.Deadline = op.Deadline.Add(snapshotDeadline)
		}
		if desired != nil {
			desired.RetryUntil = op.Deadline
			if op.Desired, err = protocol.Encode(desired); err != nil {
				s.withdrawJoinTokens(ctx, op.Instance, op.RequestID)
				return api.Future{}, internal(err, "the desired state could not be encoded")
			}
		}
		s.refreshRequestDeadline(&op)
		now := time.Now().UTC()
		next.OpID, next.OpKind, next.Error, next.UpdatedAt = op.JobID, a.kind, nil, now
		if a.during != "" && next.State != a.during {
			next.State, next.Since = a.during, now
		}
		// Not waited for in the copy: marking it claimed, below, writes the
		// same key again and is.
		recorded, err := s.st.ops.createUnwaited(ctx, op.JobID, op)
		if err != nil {
			s.withdrawJoinTokens(ctx, op.Instance, op.RequestID)
			return api.Future{}, unavailable(err, "the operation could not be recorded")
		}
		if sn := op.pendingSnapshot; sn != nil {
			if _, err := s.st.snapshots.create(ctx, sn.ID, *sn); err != nil {
				s.forgetUnstartedOp(ctx, op)
				return api.Future{}, unavailable(err, "the snapshot could not be recorded")
			}
		}
		s.crash.At("server/act/op-recorded")
		var claimed uint64
		if rev == 0 {
			claimed, err = s.st.lifecycle.create(ctx, in.ID, next)
		} else {
			claimed, err = s.st.lifecycle.update(ctx, in.ID, next, rev)
		}
		if errors.Is(err, errConflict) || errors.Is(err, errExists) {
			// Someone else acted on the instance meanwhile: forget this
			// operation (nobody has seen it) and look again.
			s.forgetUnstartedOp(ctx, op)
			continue
		}
		if err != nil {
			s.forgetUnstartedOp(ctx, op)
			return api.Future{}, unavailable(err, "the instance's state could not be written")
		}
		s.crash.At("server/act/instance-claimed")
		// The instance may have been deleted between its look-up and the
		// claim (a deletion erases it before it drops its lifecycle): an
		// operation on it must not go out.
		if _, _, err := s.st.instances.fetch(ctx, in.ID); errors.Is(err, errNotFound) {
			s.forgetUnstartedOp(ctx, op)
			_ = s.st.lifecycle.kv.Purge(ctx, in.ID)
			return api.Future{}, notFound(kindInstance, in.ID)
		}
		// A call that stalled between recording and claiming (a bus
		// electing leaders after a node is lost) may find its operation
		// ended by the sweep as never started: give the instance back, send
		// nothing, and start again with a new operation: the stall was the
		// bus's, not the caller's. Marking the operation claimed is what
		// keeps the sweep from ending it from now on (endNeverStarted).
		if cur, err := s.markClaimed(ctx, op, recorded); err != nil || cur.State != api.OpRunning {
			if _, uerr := s.st.lifecycle.update(ctx, in.ID, lc, claimed); uerr != nil {
				s.log.Warn().Err(uerr).Str("instance", in.ID).Str("op", op.JobID).Msg("the instance was not given back; the sweep settles it")
			}
			s.withdrawJoinTokens(ctx, op.Instance, op.RequestID)
			if op.pendingSnapshot != nil {
				_ = s.st.snapshots.kv.Purge(ctx, op.pendingSnapshot.ID) // nobody saw it; the next try records its own
			}
			if err != nil {
				return api.Future{}, unavailable(err, "the operation could not be marked claimed; retry")
			}
			s.log.Warn().Str("instance", in.ID).Str("op", op.JobID).Str("state", cur.State).Msg("the operation was ended before it claimed its instance; starting again")
			continue
		}
		if a.kind == opDelete {
			if err := s.refuseIfBalanced(ctx, op, lc.State); err != nil {
				return api.Future{}, err
			}
		}
		s.log.Info().Str("instance", in.ID).Str("op", op.JobID).Str("action", a.kind).Msg("instance operation started")
		if desired != nil {
			if err := s.putDesiredRaw(ctx, in.ID, op.Desired); err != nil {
				s.log.Error().Err(err).Str("instance", in.ID).Msg("desired state not written")
				_ = s.failOpTo(ctx, op, &api.Error{ErrorType: string(protocol.CodeUnavailable),
					Message: "Service unavailable", DetailedMessage: "the desired state could not be written: " + err.Error()}, lc.State)
				s.withdrawJoinTokens(ctx, op.Instance, op.RequestID)
				return api.Future{}, unavailable(err, "the desired state could not be written")
			}
			s.crash.At("server/act/desired-written")
		}
		// A failed publish is retried by the sweeper; the operation is on
		// record either way.
		s.publishOp(ctx, op)
		return op.Future, nil
	}
	return api.Future{}, conflict("instance %s is being changed by someone else; retry", in.ID)
}

// markClaimed records that the call which recorded operation op, at
// revision rev, holds its target, if the operation still runs; it returns
// the operation as it is now. It is written at rev without reading it
// back: a write in between (the sweep ending it as never started, an
// abort) is refused by the revision check, and the operation is then read
// again.
func (s *Server) markClaimed(ctx context.Context, op opRecord, rev uint64) (opRecord, error) {
	return s.st.ops.changeFrom(ctx, op.JobID, op, rev, func(o *opRecord) bool {
		if o.State != api.OpRunning || o.Claimed {
			return false
		}
		o.Claimed = true
		return true
	})
}

// settleEnded settles the instance's lifecycle now if the operation it
// names has ended (the sweep would, a moment later): a client that saw its
// operation end and sends the next action at once (stop, then start) must
// not be told the instance is still stopping. It returns the operation if
// it still runs.
func (s *Server) settleEnded(ctx context.Context, id string, lc lifecycle, rev uint64) (*opRecord, error) {
	// From the bucket: the copy may lag behind the operation's end.
	op, _, err := s.st.ops.fetch(ctx, lc.OpID)
	found := err == nil
	if err != nil && !errors.Is(err, errNotFound) {
		return nil, unavailable(err, "the instance's operation could not be read")
	}
	if found && op.State == api.OpRunning {
		return &op, nil
	}
	if err := s.settle(ctx, id, lc, rev, op, found); err != nil {
		return nil, unavailable(err, "the instance's last operation could not be settled")
	}
	return nil, nil
}

// refreshRequestDeadline gives the operation's provision request the
// operation's deadline, until which the provisioner retries what fails for
// a while.
func (s *Server) refreshRequestDeadline(op *opRecord) {
	if op.Request == nil {
		return
	}
	var req protocol.ProvisionRequest
	if protocol.Decode(op.Request, &req) != nil {
		return
	}
	req.Deadline = op.Deadline
	if data, err := protocol.Encode(&req); err == nil {
		op.Request = data
	}
}

// forgetUnstartedOp removes the records of an operation nobody has seen,
// and withdraws the join token it made.
func (s *Server) forgetUnstartedOp(ctx context.Context, op opRecord) {
	_ = s.st.ops.kv.Purge(ctx, op.JobID)
	if op.pendingSnapshot != nil {
		_ = s.st.snapshots.kv.Purge(ctx, op.pendingSnapshot.ID)
	}
	s.withdrawJoinTokens(ctx, op.Instance, op.RequestID)
}

// publishOp sends the operation's request or command.
func (s *Server) publishOp(ctx context.Context, op opRecord) {
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var err error
	switch {
	case op.Request != nil:
		var req protocol.ProvisionRequest
		_ = json.Unmarshal(op.Request, &req)
		_, err = s.js.Publish(pctx, protocol.ProvisionSubject(op.Instance, req.Action), op.Request, jetstream.WithMsgID(op.RequestID))
	case op.Command != nil:
		_, err = s.js.Publish(pctx, protocol.CommandSubject(op.Instance, op.CommandID), op.Command, jetstream.WithMsgID(op.CommandID))
	}
	if err != nil {
		s.log.Warn().Err(err).Str("op", op.JobID).Msg("operation not published yet; it will be retried")
	}
}

// putDesiredRaw writes an encoded desired state, tried again while the bus
// does not answer. A try again does not write over a later generation
// written meanwhile (the earlier try was taken and superseded).
func (s *Server) putDesiredRaw(ctx context.Context, instance string, data []byte) error {
	return untilAnswered(ctx, s.log.With().Str("bucket", protocol.BucketDesired).Str("instance", instance).Logger(), func(again bool) error {
		if again && s.desiredIsLater(ctx, instance, data) {
			return nil
		}
		_, err := s.st.desired.Put(ctx, instance, data)
		return err
	})
}

// desiredIsLater says whether the stored desired state of instance has a
// later generation than the encoded one, data.
func (s *Server) desiredIsLater(ctx context.Context, instance string, data []byte) bool {
	e, err := s.st.desired.Get(ctx, instance)
	if err != nil {
		return false
	}
	var stored, mine protocol.DesiredState
	if protocol.Decode(e.Value(), &stored) != nil || protocol.Decode(data, &mine) != nil {
		return false
	}
	return stored.Generation > mine.Generation
}

// prepareReprovision builds the next desired state and the machine spec
// from the instance's current settings, template, network and image.
func (s *Server) prepareReprovision(ctx context.Context, in api.Instance, lc *lifecycle, op *opRecord, m protocol.MachineState) (*protocol.DesiredState, error) {
	im, _, ok := s.st.images.get(in.ImageID)
	if !ok {
		return nil, precondition("image %q of instance %s no longer exists; choose another (GET /images)", in.ImageID, in.ID)
	}
	if im.Kit == nil {
		return nil, precondition("image %s has no kit: the agent needs one to install DSS", im.ID)
	}
	allow, _ := ctx.Value(allowDowngradeKey{}).(bool)
	from, restore := ctx.Value(fromSnapshotKey{}).(api.Snapshot)
	installed := lc.DSSVersion
	if restore {
		installed = from.DSSVersion // what the new volume will hold
	}
	if installed != "" && protocol.CompareVersions(im.DSSVersion, installed) < 0 && !allow {
		return nil, precondition("image %s has DSS %s, older than the %s installed on the data volume: downgrade refused "+
			"(reprovision with allowDowngrade=True to try; DSS itself may refuse)", im.ID, im.DSSVersion, installed)
	}
	tpl, _, ok := s.st.templates.get(in.InstanceSettingsTemplateID)
	if !ok {
		return nil, precondition("template %s of instance %s no longer exists", in.InstanceSettingsTemplateID, in.ID)
	}
	if lc.BasePort == 0 {
		port, err := s.allocatePort(ctx, in.ID)
		if err != nil {
			return nil, err
		}
		lc.BasePort = port
	}
	spec, err := s.machineSpec(in, lc.BasePort)
	if err != nil {
		return nil, err
	}
	vn, _, _ := s.st.networks.get(in.VirtualNetworkID) // machineSpec found it
	https, err := s.httpsTarget(in, vn, lc.BasePort)
	if err != nil {
		return nil, err
	}
	lc.Generation++
	license := tpl.License
	if license == "" {
		if cc := s.cloudCredentials(); cc.LicenseMode == api.LicenseStatic {
			license = cc.License
		}
	}
	var sealedLicense string
	awsCreds, err := dssAWSCredentials(tpl)
	if err != nil {
		return nil, err
	}
	if awsCreds != nil && awsCreds.SecretName != "" && s.cfg.LocalBackend {
		return nil, precondition("template %s keeps DSS's AWS key in AWS Secrets Manager, which the local backend's machines cannot read "+
			"(they have no instance profile): use INLINE_ENCRYPTED here", tpl.ID)
	}
	if s.cfg.Authority != nil {
		// The new machine joins with a single-use token and gets a new
		// instance key, which seals what FM and its agent tell each other;
		// the key becomes the instance's only when the machine joins.
		token, box, err := s.newJoinToken(ctx, in.ID, requestID(*op, protocol.ProvisionReprovision))
		if err != nil {
			return nil, unavailable(err, "the join token could not be stored")
		}
		if license != "" {
			license, sealedLicense = "", box.Seal(license, protocol.SealedLicensePlace(in.ID))
		}
		if https != nil && https.Certificate != "" {
			https.Certificate, https.SealedCertificate = "", box.Seal(https.Certificate, protocol.SealedCertificatePlace(in.ID))
		}
		if awsCreds != nil && awsCreds.SecretAccessKey != "" {
			awsCreds.SecretAccessKey, awsCreds.SealedSecretAccessKey = "", box.Seal(awsCreds.SecretAccessKey, protocol.SealedAWSSecretPlace(in.ID))
		}
		spec.Join = &protocol.JoinSpec{URL: s.cfg.JoinURL, SealedToken: s.box.Seal(token, protocol.SealedJoinTokenPlace(in.ID)), CACert: s.cfg.CAPEM}
	}
	d := &protocol.DesiredState{
		Instance: in.ID, Generation: lc.Generation, NodeType: in.DSSNodeType, SetupActions: setupActionsOf(tpl),
		HeartbeatSeconds: s.cfg.HeartbeatSeconds,
		DSS: protocol.DSSTarget{ImageID: im.ID, Version: im.DSSVersion, Port: lc.BasePort, License: license, SealedLicense: sealedLicense,
			AllowDowngrade: allow, HTTPS: https, AWSCredentials: awsCreds,
			Kit:   protocol.KitSource{Path: im.Kit.Path, URL: im.Kit.URL, SHA256: im.Kit.SHA256, Object: im.Kit.Object},
			Tools: toolSources(im.Tools)},
	}
	op.Target, op.TargetImageID, op.TargetDSSVersion = lc.Generation, im.ID, im.DSSVersion
	req := protocol.ProvisionRequest{Action: protocol.ProvisionReprovision, Generation: lc.Generation, Spec: spec}
	switch {
	case restore:
		req.FromSnapshot = snapshotRef(from)
	case lc.DSSVersion != "" && protocol.CompareVersions(im.DSSVersion, lc.DSSVersion) != 0 && m.VolumeID != "":
		// A change of DSS version: the volume is snapshotted first, and the
		// upgrade does not go on without it.
		sn := s.newSnapshot(in.ID, newID("snap"), fmt.Sprintf("before changing DSS from %s to %s", lc.DSSVersion, im.DSSVersion), false, *lc, m)
		sn.FutureID = op.JobID
		op.pendingSnapshot = &sn
		req.Snapshot = &protocol.SnapshotRef{ID: sn.ID}
	}
	if err := s.attachRequest(op, req); err != nil {
		return nil, err
	}
	// Only the machine this request makes acts on it; the one it replaces
	// leaves it alone while it is torn down.
	d.MachineRequest, lc.Machine = op.RequestID, op.RequestID
	return d, nil
}

// dssAWSCredentials is the key pair a template gives DSS (its
// dataikuAwsAPIAccessMode KEYPAIR), nil otherwise: kept in FM
// (INLINE_ENCRYPTED), the key itself; kept in AWS Secrets Manager, where
// the agent reads it as the machine's instance profile.
func dssAWSCredentials(tpl api.InstanceSettingsTemplate) (*protocol.AWSCredentials, error) {
	if tpl.DataikuAWSAPIAccessMode == api.AWSAPIAccessKeypair && tpl.DataikuAWSKeypairStorageMode == api.KeypairStorageSecretsManager &&
		tpl.DataikuAWSSecretAccessKeySecretName != "" {
		return &protocol.AWSCredentials{AccessKeyID: tpl.DataikuAWSAccessKeyID, SecretName: tpl.DataikuAWSSecretAccessKeySecretName,
			SecretRegion: tpl.AWSSecretsManagerRegion}, nil
	}
	if tpl.DataikuAWSAPIAccessMode != api.AWSAPIAccessKeypair || tpl.DataikuAWSKeypairStorageMode != api.KeypairStorageInline ||
		tpl.DataikuAWSAccessKeyID == "" || tpl.DataikuAWSSecretAccessKey == "" {
		return nil, nil
	}
	if !protocol.ValidAWSAccessKeyID(tpl.DataikuAWSAccessKeyID) || !protocol.ValidAWSSecret(tpl.DataikuAWSSecretAccessKey) {
		return nil, precondition("template %s's AWS key pair for DSS is not one (dataikuAwsAccessKeyId, dataikuAwsSecretAccessKey): save the template with a valid key pair", tpl.ID)
	}
	return &protocol.AWSCredentials{AccessKeyID: tpl.DataikuAWSAccessKeyID, SecretAccessKey: tpl.DataikuAWSSecretAccessKey}, nil
}

// setupActionsOf is what the agent runs of a template's setup actions.
func setupActionsOf(tpl api.InstanceSettingsTemplate) []protocol.SetupAction {
	actions := make([]protocol.SetupAction, len(tpl.SetupActions))
	for i, a := range tpl.SetupActions {
		actions[i] = protocol.SetupAction{Type: protocol.SetupActionType(a.Type), Params: a.Params, Enabled: a.Enabled == nil || *a.Enabled}
	}
	return actions
}

// prepareReplay runs the template's setup actions again on the machine as
// it is, as Dataiku's FM does: the template as it is now, so that an action
// added to a shared template reaches each of its instances without a new
// machine. It is the next generation of the instance's desired state, the
// setup actions taken from the template and nothing else changed (the
// machine, DSS's version, the license); the agent reaches it by running
// every action again, restarting DSS if its files changed, and the
// operation ends when the agent reports it.
func (s *Server) prepareReplay(ctx context.Context, in api.Instance, lc *lifecycle, op *opRecord, m protocol.MachineState) (*protocol.DesiredState, error) {
	if m.Status != protocol.MachineRunning {
		return nil, precondition("instance %s has no running machine to replay its setup actions on", in.ID)
	}
	tpl, _, ok := s.st.templates.get(in.InstanceSettingsTemplateID)
	if !ok {
		return nil, precondition("template %s of instance %s no longer exists", in.InstanceSettingsTemplateID, in.ID)
	}
	e, err := s.st.desired.Get(ctx, in.ID)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, precondition("instance %s has no desired state; reprovision it", in.ID)
	}
	if err != nil {
		return nil, unavailable(err, "the instance's desired state could not be read")
	}
	var d protocol.DesiredState
	if err := protocol.Decode(e.Value(), &d); err != nil {
		return nil, internal(err, "the instance's desired state does not decode")
	}
	lc.Generation = max(lc.Generation, d.Generation) + 1
	d.Generation, d.SetupActions = lc.Generation, setupActionsOf(tpl)
	op.Target = lc.Generation
	return &d, nil
}

// peeringOf is the VPC network vn's machines need a peering with: FM's own,
// when vn asks for it (autoCreatePeerings) and FM knows it.
func (s *Server) peeringOf(vn api.VirtualNetwork) *protocol.PeeringSpec {
	own := s.cfg.Network
	if !vn.AutoCreatePeerings || own.VpcID == "" || own.VpcID == vn.AWSVpcID {
		return nil
	}
	return &protocol.PeeringSpec{VpcID: own.VpcID, SubnetID: own.SubnetID, Region: own.Region}
}

// machineSpec is what a backend needs to build the instance's machine.
func (s *Server) machineSpec(in api.Instance, port int) (*protocol.MachineSpec, error) {
	im, _, ok := s.st.images.get(in.ImageID)
	if !ok {
		return nil, precondition("image %q of instance %s no longer exists", in.ImageID, in.ID)
	}
	vn, _, ok := s.st.networks.get(in.VirtualNetworkID)
	if !ok {
		return nil, precondition("virtual network %s of instance %s no longer exists", in.VirtualNetworkID, in.ID)
	}
	tpl, _, _ := s.st.templates.get(in.InstanceSettingsTemplateID)
	tags := map[string]string{}
	doc, _, _ := s.st.settings.get(settingsKey(api.DefaultTenant, settingCloudTags))
	for _, layer := range []map[string]string{doc.CloudTags, vn.CloudTags, in.CloudTags} {
		for k, v := range layer {
			tags[k] = v
		}
	}
	spec := &protocol.MachineSpec{
		Label: in.Label, NodeType: in.DSSNodeType, ImageID: im.ID, DSSVersion: im.DSSVersion, AMIs: im.AMIs,
		InstanceType: in.CloudInstanceType, BasePort: port, Tags: tags,
		Network: protocol.NetworkSpec{ID: vn.ID, Region: vn.AWSRegion, VpcID: vn.AWSVpcID, SubnetID: vn.AWSSubnetID,
			AutoCreateSecurityGroups: *vn.AWSAutoCreateSecurityGroups, SecurityGroups: vn.AWSSecurityGroups,
			AssignPublicIP: *vn.AWSAssignPublicIP && protocol.NetworkSpec{InternetAccess: vn.InternetAccessMode}.Public(),
			DNSStrategy:    vn.DNSStrategy, PrivateZoneID: vn.AWSRoute53PrivateIPZone, PublicZoneID: vn.AWSRoute53PublicIPZone,
			InternetAccess: vn.InternetAccessMode, WebPorts: webPorts(vn, port), Peering: s.peeringOf(vn)},
		Access: protocol.AccessSpec{KeyPairName: tpl.AWSKeyPairName, StartupInstanceProfileArn: tpl.StartupInstanceProfileArn,
			RuntimeInstanceProfileArn: tpl.RuntimeInstanceProfileArn,
			RestrictMetadataAccess:    tpl.RestrictAWSMetadataServerAccess == nil || *tpl.RestrictAWSMetadataServerAccess},
		DataVolume: protocol.VolumeSpec{Type: in.DataVolumeType, SizeGB: *in.DataVolumeSizeGB, MaxSizeGB: *in.DataVolumeSizeMaxGB,
			Encryption: in.VolumesEncryption, KMSKeyID: in.VolumesEncryptionKey},
		RootVolume: protocol.VolumeSpec{Type: in.AWSRootVolumeType},
	}
	if in.DataVolumeIOPS != nil {
		spec.DataVolume.IOPS = *in.DataVolumeIOPS
	}
	if in.DataVolumeThroughput != nil {
		spec.DataVolume.ThroughputMiBps = *in.DataVolumeThroughput
	}
	if in.AWSRootVolumeSizeGB != nil {
		spec.RootVolume.SizeGB = *in.AWSRootVolumeSizeGB
	}
	if in.AWSRootVolumeIOPS != nil {
		spec.RootVolume.IOPS = *in.AWSRootVolumeIOPS
	}
	if in.AWSAssignElasticIP && !spec.Network.Public() {
		return nil, precondition("instance %s asks for an elastic IP (awsAssignElasticIP), and its virtual network %s has internetAccessMode %s, "+
			"which gives machines no public address: turn awsAssignElasticIP off or change the network", in.ID, vn.ID, vn.InternetAccessMode)
	}
	if in.AWSAssignElasticIP {
		spec.ElasticIP = &protocol.ElasticIPSpec{AllocationID: in.AWSElasticIPAllocationID}
	}
	spec.Agent = s.agentDownload()
	if in.VolumesEncryption == api.EncryptionTenant {
		spec.DataVolume.KMSKeyID = s.cloudCredentials().AWSCMKID
	}
	return spec, nil
}

// Base ports: on the local backend every instance gets its own (DSS uses ten
// ports from its base); on a cloud every machine has its own address and
// DSS's default, 10000.
const (
	defaultBasePort = 10000
	localPortFirst  = 20000
	localPortLast   = 39990
)

// allocatePort gives the instance a base port. On the local backend the
// choice is claimed in fm_labels (kind "port"), so two instances never share
// one, and skips ports something else on this host uses.
func (s *Server) allocatePort(ctx context.Context, instance string) (int, error) {
	if !s.cfg.LocalBackend {
		return defaultBasePort, nil
	}
	for port := localPortFirst; port <= localPortLast; port += 10 {
		if !portsFree(port, 10) {
			continue
		}
		err := s.st.claims.claim(ctx, "port", strconv.Itoa(port), instance, func(ctx context.Context, owner string) (bool, error) {
			// A port is in use while its owner's lifecycle records it: a
			// claim whose action never got as far (it lost the race for the
			// instance, or the server stopped) is stale and taken over.
			lc, _, err := s.st.lifecycle.fetch(ctx, owner)
			if errors.Is(err, errNotFound) {
				return false, nil
			}
			return err == nil && lc.BasePort == port, err
		})
		if err == nil {
			return port, nil
		}
		if !errors.Is(err, errLabelTaken) {
			return 0, unavailable(err, "a port could not be reserved")
		}
	}
	return 0, newAPIError(protocol.CodeResourceExhausted, "No port left", "no free base port between %d and %d", localPortFirst, localPortLast)
}

// portsFree reports whether n ports from base are free on the loopback
// address.
func portsFree(base, n int) bool {
	for p := base; p < base+n; p++ {
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			return false
		}
		l.Close()
	}
	return true
}

// releasePort frees an instance's base port claim.
func (s *Server) releasePort(ctx context.Context, instance string, port int) {
	if port != 0 && s.cfg.LocalBackend {
		_ = s.st.claims.release(ctx, "port", strconv.Itoa(port), instance)
	}
}
