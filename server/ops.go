package server

import (
	"encoding/json"
	"errors"
	"net/http"
	"sort"
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
	f := api.Future{
		JobID: newID("op"), HasResult: true, Result: res,
		Kind: kind, TargetKind: targetKind, TargetID: targetID, State: api.OpSucceeded,
		Progress:  api.Progress{Steps: []api.ProgressStep{{Name: kind, Status: string(protocol.StatusOK), Time: now}}},
		StartedAt: now, EndedAt: &now,
	}
	if p := principalFrom(r.Context()); p != nil {
		f.StartedBy = p.KeyID
	}
	if _, err := s.st.ops.create(r.Context(), f.JobID, f); err != nil {
		// The work is done; only its record is missing. The caller still gets
		// the resolved future and never polls for it.
		s.log.Error().Err(err).Str("op", f.JobID).Str("kind", kind).Msg("operation record not stored")
	}
	s.metrics.observeOp(kind, f.State, 0)
	return f, nil
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
	f, _, ok := s.st.ops.get(id)
	if !ok {
		return nil, newAPIError(protocol.CodeNotFound, "Not found",
			"operation %q does not exist, or finished more than the retention period ago", id)
	}
	if !peek && (f.State == api.OpFailed || f.State == api.OpAborted) {
		return nil, futureError(f)
	}
	return f, nil
}

func futureError(f api.Future) error {
	if f.Error == nil {
		return newAPIError(protocol.CodeAborted, "Operation aborted", "operation %s was aborted", f.JobID)
	}
	return &apiError{code: protocol.Code(f.Error.ErrorType), message: f.Error.Message, detail: f.Error.DetailedMessage}
}

// abortFuture serves DELETE /futures/{id}. A finished operation is left as
// it is.
func (s *Server) abortFuture(r *http.Request) (any, error) {
	id := r.PathValue("id")
	f, rev, ok := s.st.ops.get(id)
	if !ok {
		return nil, notFound(kindOp, id)
	}
	if f.State != api.OpRunning {
		return f, nil
	}
	now := time.Now().UTC()
	f.State, f.Alive, f.Aborted, f.EndedAt = api.OpAborted, false, true, &now
	f.Error = &api.Error{ErrorType: string(protocol.CodeAborted), Message: "Operation aborted",
		DetailedMessage: "operation " + id + " was aborted"}
	if p := principalFrom(r.Context()); p != nil {
		f.Error.DetailedMessage += " by key " + p.KeyID
	}
	if _, err := s.st.ops.update(r.Context(), id, f, rev); err != nil {
		if errors.Is(err, errConflict) {
			return nil, conflict("operation %s changed while it was being aborted; read it again", id)
		}
		return nil, unavailable(err, "the operation could not be aborted")
	}
	return f, nil
}

// listFutures serves GET /futures (an FM addition), newest first, optionally
// filtered by targetId and state.
func (s *Server) listFutures(r *http.Request) (any, error) {
	q := r.URL.Query()
	target, state := q.Get("targetId"), q.Get("state")
	if state != "" && !oneOfStr(state, api.OpRunning, api.OpSucceeded, api.OpFailed, api.OpAborted) {
		return nil, invalid("query parameter state: %q is not one of running, succeeded, failed, aborted", state)
	}
	ops := s.st.ops.filter(func(f api.Future) bool {
		return (target == "" || f.TargetID == target) && (state == "" || f.State == state)
	})
	sortNewestFirst(ops)
	return ops, nil
}

func sortNewestFirst(ops []api.Future) {
	sort.SliceStable(ops, func(i, j int) bool { return ops[i].StartedAt.After(ops[j].StartedAt) })
}
