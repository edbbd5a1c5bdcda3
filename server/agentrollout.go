package server

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"time"
	"unicode/utf8"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

// An agent rollout (POST /agent-upgrade) brings the agents of the tenant's
// instances to the binary FM serves, BatchSize instances at a time: each
// gets an upgrade-agent operation, as if asked of it, and the next batch
// starts once every operation of the batch has ended; more failures than
// MaxFailures stop it. An agent that does not report after its upgrade is
// rolled back on its machine (agent/selfupgrade.go), and its operation
// fails: the rollout stops before the fleet follows it.
//
// The record (fm_settings "<tenant>.agent-upgrade") is the whole state. One
// server at a time advances it (the agent-rollout lease), each step written
// by compare-and-set before the next, so that a server killed anywhere, or
// another taking over, resumes it: an instance put in the batch with no
// operation yet gets its operation then, adopting the one already started
// if the kill came between the start and the write. An upgrade-agent asked
// twice is harmless: the agent answers that it runs the binary already.
const (
	settingAgentUpgrade = "agent-upgrade"
	agentRolloutLease   = "agent-rollout"
	// maxRolloutBatch bounds a batch: the record holds it.
	maxRolloutBatch = 500
	// maxRolloutInstances bounds a rollout's instances, and
	// maxRolloutListed the failed and skipped ones it lists (it counts
	// them all): the record is one value of at most 1 MiB.
	maxRolloutInstances = 20000
	maxRolloutListed    = 200
	// rolloutBusyWait is how long an instance busy with another operation
	// is waited for before it counts as failed.
	rolloutBusyWait = 30 * time.Minute
)

// The states of a rollout.
const (
	rolloutRunning   = "running"
	rolloutSucceeded = "succeeded"
	rolloutFailed    = "failed"
	rolloutAborted   = "aborted"
)

func agentUpgradeKey() string { return settingsKey(api.DefaultTenant, settingAgentUpgrade) }

// runAgentRollouts advances the tenant's rollout while this server holds
// the rollout's lease, until ctx ends.
func (s *Server) runAgentRollouts(ctx context.Context) {
	s.runLeased(ctx, agentRolloutLease, "agent rollout", s.cfg.RolloutInterval, func() tickFunc { return s.advanceRollout })
}

// getAgentUpgrade serves GET /agent-upgrade: the last rollout.
func (s *Server) getAgentUpgrade(r *http.Request) (any, error) {
	doc, _, ok := s.st.settings.get(agentUpgradeKey())
	if !ok || doc.AgentUpgrade == nil {
		return nil, newAPIError(protocol.CodeNotFound, "Not found", "no agent upgrade was started (POST /agent-upgrade starts one)")
	}
	return doc.AgentUpgrade, nil
}

// startAgentUpgrade serves POST /agent-upgrade.
func (s *Server) startAgentUpgrade(r *http.Request) (any, error) {
	if s.agent == nil {
		return nil, precondition("this Fleet Manager serves no agent binary to upgrade agents to (fm server --agent-binary)")
	}
	var req api.AgentUpgradeRequest
	if err := readJSON(r, &req); err != nil {
		return nil, err
	}
	if req.BatchSize == 0 {
		req.BatchSize = 1
	}
	if req.BatchSize < 1 || req.BatchSize > maxRolloutBatch {
		return nil, invalid("batchSize must be between 1 and %d", maxRolloutBatch)
	}
	if req.MaxFailures < 0 {
		return nil, invalid("maxFailures must not be negative")
	}
	var ids []string
	if len(req.InstanceIDs) > 0 {
		for _, id := range req.InstanceIDs {
			if _, ok := s.st.instances.view(id); !ok {
				return nil, notFound(kindInstance, id)
			}
			if !slices.Contains(ids, id) {
				ids = append(ids, id)
			}
		}
	} else {
		for _, row := range s.st.instances.rows() { // in id order
			ids = append(ids, row.key)
		}
	}
	if len(ids) == 0 {
		return nil, precondition("there is no instance to upgrade the agent of")
	}
	if len(ids) > maxRolloutInstances {
		return nil, invalid("an agent upgrade takes at most %d instances (%d asked): name them in instanceIds, in several upgrades", maxRolloutInstances, len(ids))
	}
	ru := api.AgentUpgrade{ID: newID("au"), State: rolloutRunning, StartedBy: principalID(r.Context()), StartedAt: time.Now().UTC(),
		Version: s.agent.version(), SHA256: s.agent.sha256, BatchSize: req.BatchSize, MaxFailures: req.MaxFailures,
		Pending: ids, Batch: []api.AgentUpgradeEntry{}, Failed: []api.AgentUpgradeEntry{}, Skipped: []api.AgentUpgradeEntry{}}
	key := agentUpgradeKey()
	doc, rev, err := s.st.settings.fetch(r.Context(), key)
	switch {
	case errors.Is(err, errNotFound):
		_, err = s.st.settings.create(r.Context(), key, settingsDoc{AgentUpgrade: &ru})
	case err != nil:
	case doc.AgentUpgrade != nil && doc.AgentUpgrade.State == rolloutRunning:
		return nil, conflict("agent upgrade %s is under way; wait for it to end, or stop it (DELETE /agent-upgrade)", doc.AgentUpgrade.ID)
	default:
		_, err = s.st.settings.update(r.Context(), key, settingsDoc{AgentUpgrade: &ru}, rev)
	}
	if errors.Is(err, errConflict) || errors.Is(err, errExists) {
		return nil, conflict("another agent upgrade was started meanwhile; look at GET /agent-upgrade")
	}
	if err != nil {
		return nil, unavailable(err, "the agent upgrade could not be stored")
	}
	s.log.Info().Str("rollout", ru.ID).Int("instances", len(ids)).Int("batch", ru.BatchSize).Str("sha256", ru.SHA256).Msg("agent upgrade started")
	return ru, nil
}

// abortAgentUpgrade serves DELETE /agent-upgrade: no batch starts after
// the one under way, whose operations run to their end.
func (s *Server) abortAgentUpgrade(r *http.Request) (any, error) {
	var ended string
	doc, err := s.st.settings.change(r.Context(), agentUpgradeKey(), func(d *settingsDoc) bool {
		switch {
		case d.AgentUpgrade == nil:
			return false
		case d.AgentUpgrade.State != rolloutRunning:
			ended = d.AgentUpgrade.State
			return false
		}
		d.AgentUpgrade.AbortRequested = true
		return true
	})
	switch {
	case errors.Is(err, errNotFound) || err == nil && doc.AgentUpgrade == nil:
		return nil, newAPIError(protocol.CodeNotFound, "Not found", "no agent upgrade was started")
	case err != nil:
		return nil, unavailable(err, "the agent upgrade could not be stopped; retry")
	case ended != "":
		return nil, precondition("agent upgrade %s has already ended (%s)", doc.AgentUpgrade.ID, ended)
	}
	return doc.AgentUpgrade, nil
}

// advanceRollout is the rollout lease's tick: it moves the running rollout
// on as far as it can, writing each step before taking the next.
//
// The record is read once a tick, from the bucket's leader; each step is
// written at the revision the last write gave, so that a change made
// meanwhile (a stop asked, another server) refuses the write, and the next
// tick reads it.
func (s *Server) advanceRollout(ctx context.Context, now time.Time, held func() bool) {
	key := agentUpgradeKey()
	doc, rev, err := s.st.settings.fetch(ctx, key)
	if err != nil || doc.AgentUpgrade == nil || doc.AgentUpgrade.State != rolloutRunning {
		return
	}
	ru := doc.AgentUpgrade // decoded for this tick alone
	save := func(ru *api.AgentUpgrade) bool {
		next, err := s.st.settings.update(ctx, key, settingsDoc{AgentUpgrade: ru}, rev)
		if err != nil {
			if !errors.Is(err, errConflict) {
				s.log.Warn().Err(err).Str("rollout", ru.ID).Msg("agent upgrade not moved on; trying again")
			}
			return false
		}
		rev = next
		return true
	}
	for range 3 * maxRolloutBatch { // bounded: each pass writes one step
		if ctx.Err() != nil || !held() {
			return
		}
		if !s.rolloutStep(ctx, ru, held, save) || !save(ru) {
			return // waiting for operations, or written meanwhile
		}
		s.crash.At("server/agent-rollout/step-stored")
		if ru.State != rolloutRunning {
			s.log.Info().Str("rollout", ru.ID).Str("state", ru.State).Int("upgraded", ru.Upgraded).Int("already_current", ru.AlreadyCurrent).
				Int("failed", ru.FailedCount).Int("skipped", ru.SkippedCount).Msg("agent upgrade ended")
			return
		}
	}
}

// rolloutStep makes one change to ru, and says whether it made one: the
// next instance of the batch without an operation gets one; ended
// operations leave the batch; an empty batch ends the rollout or takes
// the next one from Pending.
//
// save writes ru as it is (a step within the step), false if it could not.
func (s *Server) rolloutStep(ctx context.Context, ru *api.AgentUpgrade, held func() bool, save func(*api.AgentUpgrade) bool) bool {
	now := time.Now().UTC()
	if k, _, ok := s.st.keys.get(ru.StartedBy); ok && k.RevokedAt != nil {
		// Its operations are the starter's: not after the key is revoked.
		s.endRollout(ru, rolloutFailed, now)
		failed(ru, api.AgentUpgradeEntry{Since: now, Message: "the API key that started this upgrade was revoked; no further operation is started"})
		return true
	}
	if s.agent == nil || s.agent.sha256 != ru.SHA256 {
		// FM restarted with another binary (or none): what the batches
		// would send is not what the rollout names.
		s.endRollout(ru, rolloutFailed, now)
		failed(ru, api.AgentUpgradeEntry{Since: now,
			Message: "the agent binary Fleet Manager serves changed since this upgrade started; start a new one"})
		return true
	}
	// The batch's operations are started together: the batch is written
	// as being started once, then once with their ids; an instance busy
	// with another operation waits without holding up the others.
	fresh := map[string]bool{}
	for i := range ru.Batch {
		if e := &ru.Batch[i]; e.JobID == "" && !e.Starting {
			e.Starting, fresh[e.InstanceID] = true, true
		}
	}
	if len(fresh) > 0 && !save(ru) {
		return false
	}
	changed := false
	var known map[string]api.Future // the upgrade-agent operations, read once a step
	started := func(id string, since time.Time) string {
		if known == nil {
			known = s.startedUpgrades(ctx)
		}
		if op, ok := known[id]; ok && !op.StartedAt.Before(since) {
			return op.JobID
		}
		return ""
	}
	for i := 0; i < len(ru.Batch); i++ {
		if e := ru.Batch[i]; e.JobID == "" {
			if !held() {
				return changed
			}
			done, removed := s.startRolloutOp(ctx, ru, i, now, fresh[e.InstanceID], started)
			if removed {
				i--
			}
			changed = changed || done
		}
	}
	if changed {
		return true
	}
	for i := 0; i < len(ru.Batch); i++ {
		e := ru.Batch[i]
		if e.JobID == "" {
			continue // waiting to start
		}
		// From the bucket when the copy lacks it: an operation just
		// started may not be in the copy yet.
		op, _, err := s.st.ops.getOrFetch(ctx, e.JobID)
		if err != nil && !errors.Is(err, errNotFound) {
			return changed // the bus: next tick
		}
		if err == nil && op.State == api.OpRunning {
			continue
		}
		switch {
		case err != nil:
			e.Message = "its operation " + e.JobID + " is gone"
			failed(ru, e)
		case op.State == api.OpSucceeded:
			ru.Upgraded++
		case op.Error != nil && op.Error.ErrorType == string(protocol.CodeUnimplemented):
			// An agent that does not upgrade itself (one of the fm
			// package, or older than upgrade-agent): not a failure of
			// the binary.
			e.Message = clip(firstNonEmpty(op.Error.DetailedMessage, op.Error.Message))
			skipped(ru, e)
		default:
			e.Message = string(op.State)
			if op.Error != nil {
				e.Message = clip(firstNonEmpty(op.Error.DetailedMessage, op.Error.Message))
			}
			failed(ru, e)
		}
		ru.Batch = slices.Delete(ru.Batch, i, i+1)
		i--
		changed = true
	}
	if changed || len(ru.Batch) > 0 {
		return changed
	}
	switch {
	case ru.FailedCount > ru.MaxFailures:
		s.endRollout(ru, rolloutFailed, now)
		return true
	case ru.AbortRequested:
		s.endRollout(ru, rolloutAborted, now)
		return true
	case len(ru.Pending) == 0:
		s.endRollout(ru, rolloutSucceeded, now)
		return true
	}
	// The next batch: instances whose agent needs the binary and can take
	// it; the others are counted now.
	ru.Batches++
	for len(ru.Batch) < ru.BatchSize && len(ru.Pending) > 0 {
		id := ru.Pending[0]
		ru.Pending = ru.Pending[1:]
		e := api.AgentUpgradeEntry{InstanceID: id, Since: now}
		if why := s.notUpgradable(id, ru.SHA256); why == "current" {
			ru.AlreadyCurrent++
		} else if why != "" {
			e.Message = why
			skipped(ru, e)
		} else {
			ru.Batch = append(ru.Batch, e)
		}
	}
	return true
}

// notUpgradable says why instance id gets no operation: "current" when its
// agent runs the binary already, otherwise what stands in the way; "" when
// none does.
func (s *Server) notUpgradable(id, sha string) string {
	if _, ok := s.st.instances.view(id); !ok {
		return "the instance was deleted"
	}
	st := s.statusOf(id)
	switch {
	case st.State != stateRunning:
		return "the instance is " + st.State + ", not running"
	case st.Agent != nil && st.Agent.SHA256 == sha:
		return "current"
	case !st.AgentResponding:
		return "its agent is not responding"
	case st.Agent == nil || st.Agent.SHA256 == "":
		// It reports no digest: it is older than upgrade-agent.
		return "its agent (version " + agentVersionOf(st) + ") cannot upgrade itself; reprovision the instance for the agent FM serves"
	}
	return ""
}

// startRolloutOp starts the upgrade-agent operation of ru.Batch[i],
// which the record says is being started. One that was already (fresh is
// false: a server killed before it wrote the operation's id) is looked for,
// and adopted. changed says ru changed; removed, that the entry left the
// batch (skipped or failed). An instance busy with another operation
// waits, up to rolloutBusyWait.
func (s *Server) startRolloutOp(ctx context.Context, ru *api.AgentUpgrade, i int, now time.Time, fresh bool, started func(string, time.Time) string) (changed, removed bool) {
	e := &ru.Batch[i]
	leave := func(msg string, to func(*api.AgentUpgrade, api.AgentUpgradeEntry)) (bool, bool) {
		e.Message, e.Starting = msg, false
		to(ru, *e)
		ru.Batch = slices.Delete(ru.Batch, i, i+1)
		return true, true
	}
	if !fresh {
		if id := started(e.InstanceID, e.Since); id != "" {
			e.JobID, e.Starting = id, false
			return true, false
		}
		// Looked at again (a fresh entry was, as its batch was made): it
		// may have changed while it waited (stopped, or upgraded by hand).
		switch why := s.notUpgradable(e.InstanceID, ru.SHA256); why {
		case "":
		case "current":
			ru.AlreadyCurrent++
			ru.Batch = slices.Delete(ru.Batch, i, i+1)
			return true, true
		default:
			return leave(why, skipped)
		}
	}
	in, ok := s.st.instances.view(e.InstanceID)
	if !ok {
		return leave("the instance was deleted", skipped)
	}
	// The operations are the rollout's starter's, as if they had asked.
	octx := context.WithValue(ctx, principalKey{}, &Principal{KeyID: ru.StartedBy, Role: RoleAdmin})
	s.crash.At("server/agent-rollout/start-op:before")
	f, err := s.act(octx, in, s.actions()[opUpgradeAgent])
	if err == nil {
		s.crash.At("server/agent-rollout/start-op:after")
		e.JobID, e.Starting = f.JobID, false
		return true, false
	}
	ae := asAPIError(err)
	switch {
	case errors.Is(err, errInstanceBusy) && now.Sub(e.Since) < rolloutBusyWait:
		return false, false // another operation: waited for
	case ae.code == protocol.CodeFailedPrecondition || ae.code == protocol.CodeNotFound:
		return leave(clip("not started: "+ae.detail), failed)
	}
	s.log.Warn().Err(err).Str("rollout", ru.ID).Str("instance", e.InstanceID).Msg("upgrade-agent not started; trying again")
	return false, false
}

// startedUpgrades is each instance's last upgrade-agent operation: what a
// server killed between starting one and writing its id left (looked for
// only then: every operation is read).
func (s *Server) startedUpgrades(ctx context.Context) map[string]api.Future {
	// A server that took the rollout over reads every operation the
	// bucket has, those of the server it follows included.
	if err := s.st.ops.sync(ctx); err != nil {
		s.log.Warn().Err(err).Msg("operations not read up to date; looking at those known")
	}
	last := map[string]api.Future{}
	for _, row := range s.st.ops.rows() {
		op := row.val
		if op.Kind == opUpgradeAgent && op.StartedAt.After(last[op.Instance].StartedAt) {
			last[op.Instance] = op.Future
		}
	}
	return last
}

func (s *Server) endRollout(ru *api.AgentUpgrade, state string, now time.Time) {
	ru.State, ru.EndedAt = state, &now
}

// maxRolloutMessage bounds what a rollout keeps of an entry's message:
// an agent words its own errors, and the record is one value.
const maxRolloutMessage = 1024

func clip(msg string) string {
	if len(msg) <= maxRolloutMessage {
		return msg
	}
	cut := maxRolloutMessage
	for cut > 0 && !utf8.RuneStart(msg[cut]) {
		cut--
	}
	return msg[:cut] + "…"
}

func failed(ru *api.AgentUpgrade, e api.AgentUpgradeEntry) {
	ru.FailedCount++
	if len(ru.Failed) < maxRolloutListed {
		ru.Failed = append(ru.Failed, e)
	}
}

func skipped(ru *api.AgentUpgrade, e api.AgentUpgradeEntry) {
	ru.SkippedCount++
	if len(ru.Skipped) < maxRolloutListed {
		ru.Skipped = append(ru.Skipped, e)
	}
}

func agentVersionOf(st instanceStatus) string {
	if st.Agent == nil || st.Agent.Version == "" {
		return "unknown"
	}
	return st.Agent.Version
}
