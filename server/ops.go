package server

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

const kindOp = "operation"

// finishedOp records an operation that completed during the request (object
// deletion) and returns its future, already resolved, so that the caller's
// wait_for_result() returns without polling. A failure is answered as an
// HTTP error right away and leaves no record: nothing was done.
func (s *Server) finishedOp(r *http.Request, kind, targetKind, targetID string, result any, err error) (any, error) {
	if err != nil {
		return nil, err
	}
	now := time.Now().UTC()
	res, jerr := json.Marshal(result)
	if jerr != nil {
		return nil, internal(jerr, "the result of the operation could not be encoded")
	}
	op := opRecord{Future: api.Future{
		JobID: newID("op"), HasResult: true, Result: res,
		Kind: kind, TargetKind: targetKind, TargetID: targetID, State: api.OpSucceeded,
		StartedAt: now, EndedAt: &now, StartedBy: principalID(r.Context()),
	}}
	op.step(kind, string(protocol.StatusOK), "", now)
	if _, err := s.st.ops.create(r.Context(), op.JobID, op); err != nil {
		// The work is done; only its record is missing. The caller still gets
		// the resolved future and never polls for it.
		s.log.Error().Err(err).Str("op", op.JobID).Str("kind", kind).Msg("operation record not stored")
	}
	s.metrics.observeOp(kind, op.State, 0)
	return op.Future, nil
}

func principalID(ctx context.Context) string {
	if p := principalFrom(ctx); p != nil {
		return p.KeyID
	}
	return ""
}

// newRunningOp is an operation just started on an instance.
func newRunningOp(ctx context.Context, kind, instance string, deadline time.Duration) opRecord {
	now := time.Now().UTC()
	op := opRecord{Future: api.Future{
		JobID: newID("op"), Alive: true, Kind: kind, TargetKind: "instance", TargetID: instance,
		State: api.OpRunning, StartedBy: principalID(ctx), StartedAt: now,
	}, Instance: instance, Deadline: now.Add(deadline), CallID: callIDFrom(ctx)}
	op.step(kind, string(protocol.StatusStarted), "", now)
	return op
}

// addStep records what an event says as a step of a running operation.
func (s *Server) addStep(ctx context.Context, id, name string, e protocol.Event) error {
	return s.addStepTo(ctx, id, name, e, false)
}

// foldLateStep files an agent's step that FM folds after the operation of
// its generation succeeded (the agent's status, which ends it, and its
// events are followed apart; the agent reports a generation reached only
// after its steps): the operation shows it. Only the operation the
// instance's lifecycle names, or the one that ended last, may take it, and
// only one that succeeded: a failed or aborted one's generation may be
// tried again by the agent after its end. Start, retry and progress
// reports, and other generations' steps, are dropped.
func (s *Server) foldLateStep(ctx context.Context, e protocol.Event, lc lifecycle) error {
	id := lc.OpID
	if id == "" {
		id = lc.LastOpID
	}
	if id == "" {
		return nil
	}
	op, _, ok := s.st.ops.get(id)
	if !ok || !lateStep(e, op) {
		return nil
	}
	return s.addStepTo(ctx, op.JobID, e.Step, e, true)
}

// lateStep reports whether e may be filed in op after op ended: op made a
// generation and succeeded, and e is its agent's step of that generation
// that ended (not a start, a retry or progress).
func lateStep(e protocol.Event, op opRecord) bool {
	// Only the operations that made their generation: a start's is its
	// instance's current one, a replay's or reprovision's before it.
	made := op.Kind == opReprovision || op.Kind == opReplayActions && op.CommandID == ""
	return made && op.State == api.OpSucceeded && op.Instance == e.Instance && e.Generation != 0 && e.Generation == op.Target &&
		e.Kind == protocol.EventStep && e.Source == protocol.SourceAgent &&
		e.Status != protocol.StatusStarted && e.Status != protocol.StatusProgress && e.Status != protocol.StatusRetrying
}

// addStepTo is addStep; late files the step in an operation that ended, in
// the order of the steps' times.
func (s *Server) addStepTo(ctx context.Context, id, name string, e protocol.Event, late bool) error {
	_, err := s.st.ops.change(ctx, id, func(o *opRecord) bool {
		again := slices.ContainsFunc(o.Progress.Steps, func(st api.ProgressStep) bool {
			return st.Name == name && st.Status == string(e.Status) && st.Message == e.Message && st.Time.Equal(e.Time)
		})
		if again {
			return false // an event delivered again
		}
		if !late && o.State != api.OpRunning && lateStep(e, *o) {
			// Ended since FM's copies said it ran.
			late = true
		}
		if late {
			if !lateStep(e, *o) || len(o.Progress.Steps) >= maxSteps {
				return false // a full record keeps what it has
			}
			// Before the operation's end (its last step), after the agent's
			// steps of earlier times; the agent's clock is compared with
			// its own steps' only.
			steps := o.Progress.Steps
			end := len(steps)
			if end > 0 && steps[end-1].Name == o.Kind {
				end--
			}
			at := end
			for at > 1 && steps[at-1].Name != o.Kind && steps[at-1].Time.After(e.Time) {
				at--
			}
			o.Progress.Steps = slices.Insert(steps, at, api.ProgressStep{Name: name, Status: string(e.Status), Message: e.Message, Time: e.Time})
			return true
		}
		if o.State != api.OpRunning {
			return false // ended
		}
		if e.Status == protocol.StatusProgress {
			// A step's progress replaces the one it said before: a long
			// download says how far it got every few seconds. One that
			// comes after the step ended (delivered late) is dropped.
			if slices.ContainsFunc(o.Progress.Steps, func(st api.ProgressStep) bool {
				return st.Name == name && !st.Time.Before(e.Time) && st.Status != string(protocol.StatusProgress) &&
					st.Status != string(protocol.StatusStarted)
			}) {
				return false
			}
			if n := len(o.Progress.Steps); n > 0 {
				last := &o.Progress.Steps[n-1]
				if last.Name == name && last.Status == string(protocol.StatusProgress) {
					if !e.Time.After(last.Time) {
						return false // older than what is shown (delivered late)
					}
					last.Message, last.Time = e.Message, e.Time
					return true
				}
			}
		}
		o.step(name, string(e.Status), e.Message, e.Time)
		return true
	})
	if errors.Is(err, errNotFound) {
		return nil // expired from fm_ops
	}
	return err
}

// endOp ends a running operation with a result or an error; an operation
// that already ended is left alone.
func (s *Server) endOp(ctx context.Context, id string, result any, failure *api.Error) (opRecord, error) {
	op, _, err := s.endOpTo(ctx, id, result, failure, "")
	return op, err
}

// endOpTo is endOp recording the lifecycle state the instance goes to
// (settle moves it there).
func (s *Server) endOpTo(ctx context.Context, id string, result any, failure *api.Error, state string) (opRecord, bool, error) {
	return s.endOpIf(ctx, id, nil, result, failure, state)
}

// endOpIf is endOpTo for an operation that still passes guard (nil: any),
// checked in the same compare-and-set write as the end.
func (s *Server) endOpIf(ctx context.Context, id string, guard func(opRecord) bool, result any, failure *api.Error, state string) (opRecord, bool, error) {
	ended := false
	op, err := s.st.ops.change(ctx, id, func(op *opRecord) bool {
		ended = false
		if op.State != api.OpRunning || guard != nil && !guard(*op) {
			return false
		}
		ended = true
		now := time.Now().UTC()
		op.Alive, op.EndedAt, op.EndState = false, &now, state
		if op.Kind == opReprovision && op.TargetImageID == "" {
			// Started by an FM from before the target was recorded: it is
			// in the request.
			var req protocol.ProvisionRequest
			if json.Unmarshal(op.Request, &req) == nil && req.Spec != nil {
				op.TargetImageID, op.TargetDSSVersion = req.Spec.ImageID, req.Spec.DSSVersion
			}
		}
		// What was sent is no longer needed, and may hold a join token or a
		// password: drop it.
		op.Request, op.Command, op.Desired = nil, nil, nil
		if failure != nil {
			op.State, op.Error = api.OpFailed, failure
			op.step(op.Kind, string(protocol.StatusFailed), failure.DetailedMessage, now)
		} else {
			op.State, op.HasResult = api.OpSucceeded, true
			op.Result, _ = json.Marshal(result)
			op.step(op.Kind, string(protocol.StatusOK), "", now)
		}
		return true
	})
	if ended && err == nil {
		// Once, after the write (the change may be tried more than once).
		s.metrics.observeOp(op.Kind, op.State, op.EndedAt.Sub(op.StartedAt))
	}
	return op, ended && err == nil, err
}

// apiErrorOf turns a bus error into a REST error body.
func apiErrorOf(e *protocol.Error, message string) *api.Error {
	if e == nil {
		return &api.Error{ErrorType: string(protocol.CodeInternal), Message: message, DetailedMessage: message}
	}
	return &api.Error{ErrorType: string(e.Code), Message: message, DetailedMessage: e.Message}
}

// getFuture serves GET /futures/{id}. Dataiku's client treats only an HTTP
// error as a failed job, so a failed or aborted operation is answered with
// one (unless peeking); a finished one answers the same way on every read
// while fm_ops keeps it.
func (s *Server) getFuture(r *http.Request) (any, error) {
	id := r.PathValue("id")
	peek, err := queryBool(r, "peek", false)
	if err != nil {
		return nil, err
	}
	// From the bus when this replica's copy lacks it: a client polls the
	// replica a load balancer picks, which may not be the one that made
	// the operation a moment ago.
	notFound := newAPIError(protocol.CodeNotFound, "Not found",
		"operation %q does not exist, or finished more than the retention period ago", id)
	if !protocol.ValidToken(id) {
		return nil, notFound
	}
	op, _, err := s.st.ops.getOrFetch(r.Context(), id)
	if errors.Is(err, errNotFound) {
		return nil, notFound
	}
	if err != nil {
		return nil, unavailable(err, "operation %q could not be read from the bus; try again", id)
	}
	if !peek && (op.State == api.OpFailed || op.State == api.OpAborted) {
		return nil, futureError(op.Future)
	}
	return s.futureOf(op), nil
}

// futureOf is op as its future is told. A deletion that ended while its
// instance is not gone yet from this replica's copy (erased a moment after
// the end, or by the sweep after a crash in between) is told as still
// under way: a client that sees its deletion done and lists the instances
// must not find it there.
func (s *Server) futureOf(op opRecord) api.Future {
	f := op.Future
	if op.State == api.OpSucceeded && op.EndState == stateDeleted && op.Instance != "" {
		if _, _, ok := s.st.instances.get(op.Instance); ok {
			f.State, f.HasResult, f.Alive, f.EndedAt, f.Result = api.OpRunning, false, true, nil, nil
		}
	}
	return f
}

func futureError(f api.Future) error {
	if f.Error == nil {
		return newAPIError(protocol.CodeAborted, "Operation aborted", "operation %s was aborted", f.JobID)
	}
	return &apiError{code: protocol.Code(f.Error.ErrorType), message: f.Error.Message, detail: f.Error.DetailedMessage}
}

// abortFuture serves DELETE /futures/{id}: a running operation stops being
// waited for and the instance is left failed (a retry or reprovision takes
// it from there); what the machine was doing may still finish. A finished
// operation is left as it is.
func (s *Server) abortFuture(r *http.Request) (any, error) {
	id := r.PathValue("id")
	if _, _, ok := s.st.ops.get(id); !ok {
		return nil, notFound(kindOp, id)
	}
	var aborted bool // by this call, in the try that was written
	op, err := s.st.ops.change(r.Context(), id, func(op *opRecord) bool {
		aborted = op.State == api.OpRunning
		if !aborted {
			return false
		}
		now := time.Now().UTC()
		op.State, op.Alive, op.Aborted, op.EndedAt = api.OpAborted, false, true, &now
		op.Request, op.Command, op.Desired = nil, nil, nil
		op.Error = &api.Error{ErrorType: string(protocol.CodeAborted), Message: "Operation aborted",
			DetailedMessage: "operation " + id + " was aborted"}
		if by := principalID(r.Context()); by != "" {
			op.Error.DetailedMessage += " by key " + by
		}
		op.step(op.Kind, "aborted", op.Error.DetailedMessage, now)
		return true
	})
	if err != nil {
		return nil, unavailable(err, "the operation could not be aborted")
	}
	if aborted {
		s.metrics.observeOp(op.Kind, op.State, op.EndedAt.Sub(op.StartedAt))
	}
	if op.Instance != "" && op.State == api.OpAborted {
		s.enqueue(op.Instance) // settle the instance's state
	}
	return op.Future, nil
}

// listFutures serves GET /futures (an FM addition), newest first, optionally
// filtered by targetId and state.
func (s *Server) listFutures(r *http.Request) (any, error) {
	q := r.URL.Query()
	target, state := q.Get("targetId"), q.Get("state")
	if state != "" && !oneOfStr(state, api.OpRunning, api.OpSucceeded, api.OpFailed, api.OpAborted) {
		return nil, invalid("query parameter state: %q is not one of running, succeeded, failed, aborted", state)
	}
	p, err := pageOf(q)
	if err != nil {
		return nil, err
	}
	if p.after != "" && !protocol.ValidToken(p.after) {
		return nil, invalid("query parameter after: %q is not an operation id", p.after)
	}
	var ops []opRecord
	if state != "" {
		// Operations are grouped by state: the running ones are found
		// without a look at every operation of the last week.
		for _, row := range s.st.ops.rowsOf(state) {
			if target == "" || row.val.TargetID == target {
				ops = append(ops, row.val)
			}
		}
	} else {
		ops = s.st.ops.filter(func(op opRecord) bool { return target == "" || op.TargetID == target })
	}
	slices.SortFunc(ops, newerOpFirst)
	if p.after != "" {
		// A page follows the list's own order, newest first: it starts
		// after the operation named, wherever it now stands.
		// The copy may lag behind another replica's new operation: the
		// bucket says whether it is gone. One gone (an operation is kept a
		// week after its last change) ends the list: the pages are walked
		// again from the first.
		ref, _, err := s.st.ops.getOrFetch(r.Context(), p.after)
		switch {
		case errors.Is(err, errNotFound):
			return []api.Future{}, nil
		case err != nil:
			return nil, unavailable(err, "the operations could not be read")
		}
		ops = ops[sort.Search(len(ops), func(i int) bool { return newerOpFirst(ref, ops[i]) < 0 }):]
	}
	if p.limit > 0 && len(ops) > p.limit {
		ops = ops[:p.limit]
	}
	out := make([]api.Future, len(ops))
	for i := range ops {
		out[i] = ops[i].Future
	}
	return out, nil
}

// newerOpFirst orders operations as their list shows them: newest first,
// by id when started at the same instant.
func newerOpFirst(a, b opRecord) int {
	if c := b.StartedAt.Compare(a.StartedAt); c != 0 {
		return c
	}
	return strings.Compare(a.JobID, b.JobID)
}
