package server

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

// templateReplayWorkers is how many instances a template-wide replay starts
// at once: each start waits on the bus most of its time.
const templateReplayWorkers = 64

// templateReplayWait is how long a template-wide replay tries an instance
// whose start the bus did not answer, before it reports it skipped.
const templateReplayWait = 30 * time.Second

// replayTemplate serves POST /instance-settings-templates/{id}/actions/
// replay-setup-actions (FM): replay-setup-actions on every instance made
// from the template, as if asked of each (the same checks, operations and
// audit of the operation's outcome), in one call: a change to a template's
// setup actions reaches the fleet without a call per instance. An instance
// that is not running, or busy with another operation, is skipped and said
// so; asked again, the call starts what it did not (and replays again those
// whose replay already ended).
func (s *Server) replayTemplate(r *http.Request) (any, error) {
	id := r.PathValue("id")
	if _, _, ok := s.st.templates.get(id); !ok {
		return nil, notFound(kindTemplate, id)
	}
	var ids []string
	for _, row := range s.st.instances.rows() {
		if row.val.InstanceSettingsTemplateID == id {
			ids = append(ids, row.key)
		}
	}
	slices.Sort(ids)
	futures := make([]api.Future, len(ids))
	refusals := make([]error, len(ids))
	work := make(chan int)
	var wg sync.WaitGroup
	for range min(templateReplayWorkers, len(ids)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				futures[i], refusals[i] = s.replayOne(r.Context(), ids[i])
			}
		}()
	}
	for i := range ids {
		work <- i
	}
	close(work)
	wg.Wait()
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

// replayOne starts replay-setup-actions on instance id, tried again while
// the bus does not answer, for at most templateReplayWait.
func (s *Server) replayOne(ctx context.Context, id string) (api.Future, error) {
	deadline := time.Now().Add(templateReplayWait)
	for backoff := 100 * time.Millisecond; ; backoff = min(2*backoff, 2*time.Second) {
		in, ok := s.st.instances.view(id)
		if !ok {
			return api.Future{}, notFound(kindInstance, id)
		}
		f, err := s.act(ctx, in, s.actions()[opReplayActions])
		var ae *apiError
		if err == nil || !errors.As(err, &ae) || ae.code != protocol.CodeUnavailable || !time.Now().Add(backoff).Before(deadline) {
			return f, err
		}
		select {
		case <-ctx.Done():
			return f, err
		case <-time.After(backoff):
		}
	}
}
