package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/fleetmanager/fm/protocol"
)

// The setup actions that add to DSS through its admin API: plugins from
// Dataiku's store, code environments from presets.

// pluginsFromStore installs the plugins of the store DSS does not have yet;
// one it has is left at its version (DSS refuses to install it twice).
func (r *actionRunner) pluginsFromStore(ctx context.Context, p *protocol.InstallDSSPluginsFromStoreParams) actionResult {
	have, err := r.plugins(ctx)
	if err != nil {
		return failed("", err)
	}
	var added, already []string
	for _, id := range p.Plugins {
		if have[id] {
			already = append(already, id)
			continue
		}
		var fut dssFuture
		// DSS refuses a plugin it has: one a lost answer (or a killed
		// agent) left installed counts as installed.
		installed := func() (bool, error) {
			ids, err := r.plugins(ctx)
			return ids[id], err
		}
		if err := r.create(ctx, dssAdminAttempt, "/plugins/actions/installFromStore", map[string]string{"pluginId": id}, &fut, installed); err != nil {
			return failed("", fmt.Errorf("install plugin %s: %w", id, err))
		}
		if fut.JobID != "" || fut.HasResult {
			if err := r.waitFuture(ctx, fut); err != nil {
				return failed("", fmt.Errorf("install plugin %s: %w", id, err))
			}
		}
		added = append(added, id)
	}
	switch {
	case len(added) == 0:
		return ok("plugins already installed: %s", strings.Join(already, ", "))
	case len(already) == 0:
		return ok("plugins installed: %s", strings.Join(added, ", "))
	}
	return ok("plugins installed: %s (already: %s)", strings.Join(added, ", "), strings.Join(already, ", "))
}

// plugins are the ids of the plugins DSS has.
func (r *actionRunner) plugins(ctx context.Context) (map[string]bool, error) {
	var list []struct {
		ID string `json:"id"`
	}
	if err := r.adminAPI(ctx, http.MethodGet, "/plugins/", nil, &list); err != nil {
		return nil, fmt.Errorf("list DSS's plugins: %w", err)
	}
	have := map[string]bool{}
	for _, pl := range list {
		have[pl.ID] = true
	}
	return have, nil
}

// codeEnvTime bounds DSS's making of a code environment, which installs
// its packages before DSS answers.
const codeEnvTime = 30 * time.Minute

// dssFuture is a long task of DSS's (dataikuapi's DSSFuture).
type dssFuture struct {
	JobID     string          `json:"jobId"`
	HasResult bool            `json:"hasResult"`
	Alive     bool            `json:"alive"`
	Result    json.RawMessage `json:"result"`
}

// futureWait bounds a DSS task the agent waits for.
const futureWait = 30 * time.Minute

// waitFuture polls a DSS task until it has a result or is no longer alive.
func (r *actionRunner) waitFuture(ctx context.Context, f dssFuture) error {
	ctx, cancel := context.WithTimeout(ctx, futureWait)
	defer cancel()
	for !f.HasResult {
		if f.JobID == "" {
			return errors.New("DSS answered no task")
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("DSS's task %s did not end: %w", f.JobID, ctx.Err())
		case <-time.After(time.Second):
		}
		var next dssFuture
		if err := r.adminAPI(ctx, http.MethodGet, "/futures/"+url.PathEscape(f.JobID), nil, &next); err != nil {
			return err
		}
		if !next.HasResult && !next.Alive {
			return fmt.Errorf("DSS's task %s ended without a result", f.JobID)
		}
		f = next
	}
	return nil
}

// codeEnvPreset makes DSS's internal code environment of a preset, or
// updates it in place when the action allows it; DSS changes nothing when
// it is already as the preset says.
func (r *actionRunner) codeEnvPreset(ctx context.Context, p *protocol.InstallCodeEnvWithPresetParams) actionResult {
	preset := p.PresetName()
	allowUpdate := p.AllowInPlaceUpdate == nil || *p.AllowInPlaceUpdate
	existing := func() (string, error) {
		var envs []struct {
			EnvName string `json:"envName"`
			Preset  string `json:"preset"`
		}
		if err := r.adminAPI(ctx, http.MethodGet, "/admin/code-envs/", nil, &envs); err != nil {
			return "", fmt.Errorf("list DSS's code environments: %w", err)
		}
		for _, e := range envs {
			if e.Preset == preset {
				return e.EnvName, nil
			}
		}
		return "", nil
	}
	if !allowUpdate {
		name, err := existing()
		if err != nil {
			return failed("", err)
		}
		if name != "" {
			return ok("code environment %s (preset %s) already exists; in-place update not allowed", name, preset)
		}
	}
	q := url.Values{"allowUpdate": {fmt.Sprint(allowUpdate)}}
	if p.Interpreter != "" {
		q.Set("interpreter", p.Interpreter)
	}
	var res struct {
		EnvName  string `json:"envName"`
		Created  bool   `json:"created"`
		Updated  bool   `json:"updated"`
		Messages struct {
			Error    bool              `json:"error"`
			Messages []json.RawMessage `json:"messages"`
		} `json:"messages"`
	}
	// A making that DSS may have done without answering is looked for
	// before it is asked again; an update in place is not asked twice (the
	// first may still run): it fails, and the next replay asks again.
	var made func() (bool, error)
	if !allowUpdate {
		made = func() (bool, error) {
			name, err := existing()
			return name != "", err
		}
	}
	if err := r.create(ctx, codeEnvTime, "/admin/code-envs/from-python-preset/"+url.PathEscape(preset)+"?"+q.Encode(), nil, &res, made); err != nil {
		return failed("", fmt.Errorf("code environment from preset %s: %w", preset, err))
	}
	if res.EnvName == "" {
		res.EnvName, _ = existing()
	}
	if res.Messages.Error {
		var msgs []string
		for _, m := range res.Messages.Messages {
			msgs = append(msgs, string(m))
		}
		return failed(strings.Join(msgs, "\n"), fmt.Errorf("DSS could not make the code environment of preset %s", preset))
	}
	switch {
	case res.Created:
		return ok("code environment %s made from preset %s", res.EnvName, preset)
	case res.Updated:
		return ok("code environment %s updated in place from preset %s", res.EnvName, preset)
	}
	return ok("code environment %s already as preset %s says", res.EnvName, preset)
}
