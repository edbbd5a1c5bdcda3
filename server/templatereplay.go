package server

import (
	"context"
	"net/http"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

// templateReplayWorkers is how many instances a template-wide replay starts
// at once: each start waits on the bus most of its time.
const templateReplayWorkers = 64

// templateReplayTime bounds a template-wide replay's call, within the REST
// server's write timeout: what it has not started by then is skipped, and
// said so.
const templateReplayTime = 4 * time.Minute

// replayTemplate serves POST /instance-settings-templates/{id}/actions/
// replay-setup-actions (FM): replay-setup-actions on every instance made
// from the template, as if asked of each (the same checks and operations;
// each instance's audit trail records it), in one call, so that a change to
// a template's setup actions reaches the fleet without a call per
// instance. An instance that is not running, or busy with another
// operation (a replay this call or one before started included), is
// skipped and said so. Asked again (an answer lost, a server stopped
// mid-call), it starts what is not busy: the instances whose replay
// already ended replay again, which is what a replay is.
//
// One runs at a time on a server: each holds 64 workers and writes to the
// bus for every instance of the fleet.
func (s *Server) replayTemplate(r *http.Request) (any, error) {
	id := r.PathValue("id")
	if _, _, ok := s.st.templates.get(id); !ok {
		return nil, notFound(kindTemplate, id)
	}
	if !s.replayingTpl.TryLock() {
		return nil, conflict("a template-wide replay is under way on this server; ask again once it has answered")
	}
	defer s.replayingTpl.Unlock()
	var ids []string // in id order, as the table keeps its rows
	for _, row := range s.st.instances.rows() {
		if row.val.InstanceSettingsTemplateID == id {
			ids = append(ids, row.key)
		}
	}
	ctx, cancel := context.WithTimeout(r.Context(), templateReplayTime)
	defer cancel()
	futures := make([]api.Future, len(ids))
	refusals := make([]error, len(ids))
	eachAtOnce(templateReplayWorkers, len(ids), func(i int) { futures[i], refusals[i] = s.replayOne(ctx, r, ids[i]) })
	out := api.TemplateReplay{TemplateID: id, Futures: []api.Future{}, Skipped: []api.ReplaySkipped{}}
	for i, err := range refusals {
		if err == nil {
			out.Futures = append(out.Futures, futures[i])
			continue
		}
		ae := asAPIError(err)
		if ae.code == protocol.CodeInternal {
			s.log.Error().Err(err).Str("instance", ids[i]).Msg("setup actions not replayed")
		}
		out.Skipped = append(out.Skipped, api.ReplaySkipped{InstanceID: ids[i], Error: ae.body()})
	}
	s.log.Info().Str("template", id).Int("started", len(out.Futures)).Int("skipped", len(out.Skipped)).Msg("setup actions replayed on the template's instances")
	return out, nil
}

// replayOne starts replay-setup-actions on instance id unless the call is
// out of time (ctx, the call's budget, is looked at only before a start:
// one under way runs to its end, its writes tried again while the bus
// does not answer, as asked of one instance).
func (s *Server) replayOne(ctx context.Context, r *http.Request, id string) (api.Future, error) {
	switch {
	case r.Context().Err() != nil:
		return api.Future{}, unavailable(ctx.Err(), "not started: the caller left before this instance's turn; ask again")
	case ctx.Err() != nil:
		return api.Future{}, unavailable(ctx.Err(), "not started: the call ran out of time (%s) before this instance's turn; ask again", templateReplayTime)
	}
	in, ok := s.st.instances.view(id)
	if !ok {
		return api.Future{}, notFound(kindInstance, id)
	}
	f, err := s.act(context.WithoutCancel(r.Context()), in, s.actions()[opReplayActions])
	if err == nil {
		s.auditOn(r, auditInstances, id)
	}
	return f, err
}
