package server

import (
	"context"
	"errors"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// sweep fails operations past their deadline, republishes requests that
// were lost, writes again a desired state a crash lost, ends operations
// that never claimed their instance (a crash between recording and
// claiming), and reconciles every instance with an operation under way.
func (s *Server) sweep(ctx context.Context) {
	now := time.Now()
	s.fold.mu.Lock()
	for id := range s.fold.beats {
		if _, _, ok := s.st.instances.get(id); !ok {
			delete(s.fold.beats, id) // deleted, maybe by another replica
		}
	}
	for op, at := range s.fold.republished {
		if now.Sub(at) >= 3*s.cfg.RepublishAfter {
			delete(s.fold.republished, op) // shouldRepublish allows it again anyway
		}
	}
	s.fold.mu.Unlock()
	for _, row := range s.st.ops.rowsOf(api.OpRunning) {
		op := row.val
		if op.Instance == "" {
			continue
		}
		if now.After(op.Deadline) {
			_ = s.failOp(ctx, op, &api.Error{ErrorType: string(protocol.CodeDeadlineExceeded), Message: "Operation timed out",
				DetailedMessage: op.Kind + " of " + op.Instance + " did not finish by " + op.Deadline.Format(time.RFC3339)})
			continue
		}
		old := now.Sub(op.StartedAt) > s.cfg.RepublishAfter
		if !op.lifecycleFree() {
			// Nothing goes out for an operation that does not hold its
			// instance: it was never under way (the server stopped between
			// recording and claiming), and sending its request would replace
			// the machine of whatever holds the instance now.
			if lc, _, ok := s.st.lifecycle.get(op.Instance); !ok || lc.OpID != op.JobID {
				if now.Sub(op.StartedAt) > 3*s.cfg.RepublishAfter {
					s.endUnclaimed(ctx, op)
				}
				continue
			}
		}
		if _, _, ok := s.st.instances.get(op.Instance); !ok && !op.lifecycleFree() && op.Kind != opDelete {
			// Gone, or not in the copy yet: reconcile looks in the bucket
			// and ends the operation if it is gone; nothing goes out.
			s.enqueue(op.Instance)
			continue
		}
		if op.Request != nil && old {
			// An operation beside the lifecycle is taken once the provisioner
			// reported a step; the others once the machine record names
			// their request.
			taken := len(op.Progress.Steps) > 1
			if !op.lifecycleFree() {
				m, _, _ := s.st.machines.get(op.Instance)
				taken = m.RequestID == op.RequestID
			}
			if !taken && s.shouldRepublish(op.JobID) && (op.Kind != opDelete || !s.balancedDeletion(ctx, op)) {
				s.log.Info().Str("op", op.JobID).Msg("provision request not taken yet; publishing it again")
				s.ensureDesired(ctx, op)
				s.publishOp(ctx, op)
			}
		}
		if op.Command != nil && old && s.shouldRepublish(op.JobID) {
			s.ensureCommandPublished(ctx, op)
		}
		if op.Request == nil && op.Command == nil && op.Desired != nil && old && s.shouldRepublish(op.JobID) {
			// A replay: its desired state is all there is to send.
			s.ensureDesired(ctx, op)
		}
		s.enqueue(op.Instance)
	}
	for _, row := range s.st.lifecycle.rowsOf(lifecycleBusy) {
		s.enqueue(row.key)
	}
	// Running instances whose credentials FM lacks are asked again at most
	// every 30 s (requestSecrets): looked for every 15th sweep, not through
	// the whole fleet every 2 s.
	if s.fold.sweeps++; s.fold.sweeps%15 == 1 {
		for _, row := range s.st.lifecycle.rowsOf(stateRunning) {
			if !s.hasSecrets(row.key) {
				s.enqueue(row.key)
			}
		}
	}
	s.settleSnapshots(ctx)
	s.settleBalancers(ctx)
}

// endUnclaimed ends an operation recorded but never given its instance (the
// server stopped in between, or lost the race and could not forget it):
// nothing was sent for it, so nothing was done.
func (s *Server) endUnclaimed(ctx context.Context, op opRecord) {
	// From the bucket: the copy may lag behind a claim just made.
	if lc, _, err := s.st.lifecycle.fetch(ctx, op.Instance); err == nil && lc.OpID == op.JobID {
		return
	} else if err != nil && !errors.Is(err, errNotFound) {
		return
	}
	s.endNeverStarted(ctx, op, op.Instance)
	s.withdrawJoinTokens(ctx, op.Instance, op.RequestID)
}

// endNeverStarted ends an operation that never claimed its target (an
// instance or a load balancer): the server stopped before it was under
// way, and nothing was done.
//
// An operation its call claimed meanwhile (opRecord.Claimed) is left to
// run: the call has seen it running and sends its request.
func (s *Server) endNeverStarted(ctx context.Context, op opRecord, target string) {
	_, ended, err := s.endOpIf(ctx, op.JobID, func(o opRecord) bool { return !o.Claimed }, nil,
		&api.Error{ErrorType: string(protocol.CodeAborted), Message: "Operation never started",
			DetailedMessage: "the server stopped before " + op.Kind + " of " + target + " was under way; nothing was done: start it again"}, "")
	if ended && err == nil {
		s.log.Warn().Str("op", op.JobID).Str("target", target).Msg("an operation that never started is ended")
	}
}

// ensureDesired writes the operation's desired state again if fm_desired
// does not hold its generation (the server stopped between claiming the
// instance and writing it).
func (s *Server) ensureDesired(ctx context.Context, op opRecord) {
	if op.Desired == nil {
		return
	}
	var cur protocol.DesiredState
	if e, err := s.st.desired.Get(ctx, op.Instance); err == nil && protocol.Decode(e.Value(), &cur) == nil && cur.Generation >= op.Target {
		return
	} else if err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		return
	}
	if err := s.putDesiredRaw(ctx, op.Instance, op.Desired); err != nil {
		s.log.Warn().Err(err).Str("op", op.JobID).Msg("desired state not written again yet")
		return
	}
	s.log.Info().Str("op", op.JobID).Msg("desired state was missing; written again")
}

func (s *Server) hasSecrets(id string) bool {
	sec, _, _ := s.st.secrets.get(id)
	return sec.InitialPassword != "" && sec.AdminAPIKey != ""
}

// shouldRepublish allows one republication of an operation every three
// RepublishAfter (30 s).
func (s *Server) shouldRepublish(opID string) bool {
	s.fold.mu.Lock()
	defer s.fold.mu.Unlock()
	if time.Since(s.fold.republished[opID]) < 3*s.cfg.RepublishAfter {
		return false
	}
	s.fold.republished[opID] = time.Now()
	return true
}

// ensureCommandPublished publishes a command again if FM_COMMANDS does not
// hold it (a crash between recording the operation and publishing).
func (s *Server) ensureCommandPublished(ctx context.Context, op opRecord) {
	if _, err := s.commands.GetLastMsgForSubject(ctx, protocol.CommandSubject(op.Instance, op.CommandID)); errors.Is(err, jetstream.ErrMsgNotFound) {
		s.log.Info().Str("op", op.JobID).Msg("command missing from FM_COMMANDS; publishing it again")
		s.publishOp(ctx, op)
	}
}
