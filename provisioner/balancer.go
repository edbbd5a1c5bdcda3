package provisioner

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// Balancers is what a backend that makes load balancers does besides
// machines. Both methods are idempotent, as Backend's are: asked again
// with the same request (a redelivery, a crash in the middle), they find
// what they made and go on from there, never making it twice.
type Balancers interface {
	// ApplyBalancer makes the load balancer req.LoadBalancer describes, or
	// changes the one made to match it without taking it down (with
	// Recreate, it removes it first). cur is what was recorded of it.
	ApplyBalancer(ctx context.Context, req Request, cur protocol.BalancerState) (protocol.BalancerState, error)
	// DeleteBalancer removes the load balancer and what was made for it.
	DeleteBalancer(ctx context.Context, req Request, cur protocol.BalancerState) error
}

// handleBalancer carries out a load balancer's request: the record in
// fm_balancers says first that it is under way, then how it ended, and
// the server ends the operation from it. Handled already, a request is
// acknowledged without being done again; older than the last one handled
// (a late copy), or past its deadline, it is not carried out.
func (p *Provisioner) handleBalancer(ctx context.Context, m jetstream.Msg, req protocol.ProvisionRequest, log zerolog.Logger) {
	id := req.LoadBalancer.ID
	cur, rev, err := p.balancerState(ctx, id)
	if err != nil {
		log.Warn().Err(err).Msg("load balancer state unreadable; retrying")
		_ = m.NakWithDelay(2 * time.Second)
		return
	}
	underWay := cur.Status == protocol.BalancerApplying || cur.Status == protocol.BalancerDeleting
	if cur.RequestID == req.ID && !underWay {
		log.Info().Msg("request already handled; acknowledging it again")
		p.ack(ctx, m, req, log)
		return
	}
	resumed := cur.RequestID == req.ID
	if req.Order != 0 && req.Order < cur.Order && !resumed {
		// A late copy of a request handled before the last one: doing it
		// now would undo what came after it. Its operation has ended.
		log.Warn().Uint64("order", req.Order).Uint64("last", cur.Order).Msg("superseded load balancer request not carried out")
		p.ack(ctx, m, req, log)
		return
	}
	var refusal *protocol.Error
	b, ok := p.cfg.Backend.(Balancers)
	switch {
	case !time.Now().Before(p.deadline(req)) && !resumed:
		// The server has failed its operation; nothing was begun.
		log.Warn().Msg("load balancer request past its deadline not carried out")
		p.ack(ctx, m, req, log)
		return
	case !time.Now().Before(p.deadline(req)):
		refusal = protocol.Errorf(protocol.CodeDeadlineExceeded, "%s of load balancer %s was not carried out by its deadline", req.Action, id)
	case !ok:
		refusal = protocol.Errorf(protocol.CodeUnimplemented, "the %s backend makes no load balancers", p.cfg.Backend.Name())
	}
	if refusal != nil {
		log.Warn().Err(refusal).Msg("load balancer request not carried out")
		next := cur
		next.Status, next.Error, next.RequestID, next.Action = protocol.BalancerFailed, refusal, req.ID, req.Action
		next.Order = max(cur.Order, req.Order)
		if _, err := p.putBalancer(ctx, id, next, rev); err != nil {
			_ = m.NakWithDelay(2 * time.Second)
			return
		}
		p.ack(ctx, m, req, log)
		return
	}
	working, done := p.keepInProgress(ctx, m)
	defer done()
	point := "provisioner/" + string(req.Action)
	pending := cur
	pending.Status, pending.RequestID, pending.Action, pending.Error = protocol.BalancerApplying, req.ID, req.Action, nil
	if req.Action == protocol.ProvisionBalancerDelete {
		pending.Status = protocol.BalancerDeleting
	}
	pending.Order = max(cur.Order, req.Order)
	if err := p.crash.Around(point+"/pending-state", func() (err error) {
		rev, err = p.putBalancer(ctx, id, pending, rev)
		return err
	}); err != nil {
		log.Warn().Err(err).Msg("load balancer state not written; retrying")
		_ = m.NakWithDelay(2 * time.Second)
		return
	}
	if p.deposed(m, log) {
		return
	}
	log.Info().Bool("resumed", resumed).Msg("load balancer operation started")
	breq := Request{ProvisionRequest: req, Progress: func(step, msg string) {
		p.crash.At("provisioner/" + string(req.Action) + "/progress " + step)
		log.Info().Str("step", step).Msg(msg)
	}}
	began := time.Now()
	next := cur
	var opErr error
	switch {
	case req.Action == protocol.ProvisionBalancerDelete:
		opErr = b.DeleteBalancer(working, breq, cur)
		next.Status, next.Address, next.Nodes, next.Details = protocol.BalancerDeleted, "", nil, nil
	case req.LoadBalancer.Recreate && cur.Details[detailRecreatedFor] != req.ID:
		// Removed once per request: a retry or a redelivery after the
		// removal goes on to make it, not to remove the one it made.
		if opErr = b.DeleteBalancer(working, breq, cur); opErr != nil {
			break
		}
		pending.Address, pending.Nodes, pending.Details = "", nil, map[string]string{detailRecreatedFor: req.ID}
		if err := p.crash.Around("provisioner/"+string(req.Action)+"/removed-state", func() (err error) {
			rev, err = p.putBalancer(ctx, id, pending, rev)
			return err
		}); err != nil {
			opErr = protocol.Errorf(protocol.CodeUnavailable, "the load balancer's removal was not recorded: %v", err)
			break
		}
		cur = pending
		fallthrough
	default:
		spec := *req.LoadBalancer
		spec.Recreate = false
		breq.LoadBalancer = &spec
		next, opErr = b.ApplyBalancer(working, breq, cur)
		next.Status = protocol.BalancerActive
	}
	p.metrics.observe(p.cfg.Backend.Name(), string(req.Action), began, opErr)
	if ctx.Err() != nil {
		_ = m.Nak() // stopping: the next holder goes on from the pending state
		return
	}
	if opErr != nil && isTransient(opErr) && time.Now().Before(p.deadline(req)) {
		delay := min(p.retryDelay(m), max(time.Until(p.deadline(req)), time.Second))
		log.Warn().Err(opErr).Dur("retry_in", delay).Msg("load balancer operation failed for now; retrying")
		pending.Error = asProtocolError(opErr)
		_, _ = p.putBalancer(ctx, id, pending, rev)
		_ = m.NakWithDelay(delay)
		return
	}
	if opErr != nil {
		// What is in the cloud is as the backend left it; the record keeps
		// what was known before, marked failed.
		next = cur
		next.Status, next.Error = protocol.BalancerFailed, asProtocolError(opErr)
		log.Warn().Err(opErr).Msg("load balancer operation failed")
	} else {
		next.Error = nil
		log.Info().Str("status", string(next.Status)).Str("address", next.Address).Msg("load balancer operation done")
	}
	next.RequestID, next.Action, next.Order = req.ID, req.Action, max(cur.Order, req.Order)
	if err := p.crash.Around(point+"/result-state", func() error {
		_, err := p.putBalancer(ctx, id, next, rev)
		return err
	}); err != nil {
		log.Error().Err(err).Msg("load balancer state not recorded; the request will be delivered again")
		_ = m.NakWithDelay(2 * time.Second)
		return
	}
	p.ack(ctx, m, req, log)
}

// detailRecreatedFor, in a load balancer's state, names the request whose
// removal of it (a reprovision's first step) is done.
const detailRecreatedFor = "recreatedFor"

// balancerState reads a load balancer's record in fm_balancers (zero if
// none).
func (p *Provisioner) balancerState(ctx context.Context, id string) (protocol.BalancerState, uint64, error) {
	var st protocol.BalancerState
	e, err := p.balancers.Get(ctx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return st, 0, nil
	}
	if err != nil {
		return st, 0, err
	}
	if err := protocol.Decode(e.Value(), &st); err != nil {
		p.log.Error().Err(err).Str("load_balancer", id).Msg("load balancer state unreadable; it will be rewritten")
		return protocol.BalancerState{}, e.Revision(), nil
	}
	return st, e.Revision(), nil
}

// putBalancer writes the record with a revision check (0: it must not
// exist).
func (p *Provisioner) putBalancer(ctx context.Context, id string, st protocol.BalancerState, rev uint64) (uint64, error) {
	st.ID, st.Backend, st.Updated = id, p.cfg.Backend.Name(), time.Now().UTC()
	data, err := protocol.Encode(&st)
	if err != nil {
		return 0, fmt.Errorf("encode the load balancer's state: %w", err)
	}
	if rev == 0 {
		return p.balancers.Create(ctx, id, data)
	}
	return p.balancers.Update(ctx, id, data, rev)
}
