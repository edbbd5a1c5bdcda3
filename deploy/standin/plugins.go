package main

import (
	"errors"
	"net/http"
	"os"
	"regexp"
	"sort"
)

// Plugins, installed from the stand-in's store under
// plugins/installed/<id>/plugin.json, and the futures (jobs) DSS answers
// long actions with.

// storeCatalog is the stand-in's plugin store: the plugins it can
// install, at the version it has of each. The versions are the
// stand-in's own, not the real store's.
var storeCatalog = map[string]string{
	"eks-clusters":           "2.3.1",
	"aks-clusters":           "2.1.4",
	"gke-clusters":           "1.6.2",
	"googlesheets":           "1.4.0",
	"geoadmin":               "1.3.2",
	"timeseries-preparation": "2.0.5",
	"pi-system":              "1.9.0",
	"tesseract-ocr":          "1.1.3",
	"sharepoint-online":      "1.2.7",
	"snowflake-tools":        "1.0.8",
}

var rePluginID = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,63}$`)

// installedPlugin is plugins/installed/<id>/plugin.json.
type installedPlugin struct {
	ID      string `json:"id"`
	Version string `json:"version"`
	Source  string `json:"source"`
}

func (d dataDir) pluginFile(id string) string {
	return d.path("plugins", "installed", id, "plugin.json")
}

func (s *service) listPlugins(r *http.Request) (any, error) {
	entries, err := os.ReadDir(s.dir.path("plugins", "installed"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	type listed struct {
		ID      string `json:"id"`
		Version string `json:"version"`
		IsDev   bool   `json:"isDev"`
	}
	out := []listed{}
	for _, e := range entries {
		var p installedPlugin
		found, err := readJSONFile(s.dir.pluginFile(e.Name()), &p)
		if err != nil {
			return nil, err
		}
		if found {
			out = append(out, listed{ID: p.ID, Version: p.Version})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// installFromStore installs a plugin of the store. DSS refuses to install
// one that is there already (an update is another action), and so does
// the stand-in.
func (s *service) installFromStore(r *http.Request) (any, error) {
	var req struct {
		PluginID string `json:"pluginId"`
	}
	if err := decodeBody(r, &req); err != nil {
		return nil, err
	}
	if !rePluginID.MatchString(req.PluginID) {
		return nil, badRequest("pluginId %q is not a plugin id (%s)", req.PluginID, rePluginID)
	}
	v, ok := storeCatalog[req.PluginID]
	if !ok {
		return nil, notFound("Plugin %s not found in the store", req.PluginID)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if fileExists(s.dir.pluginFile(req.PluginID)) {
		return nil, badRequest("Plugin %s is already installed", req.PluginID)
	}
	if _, err := writeJSONFile(s.dir.pluginFile(req.PluginID), installedPlugin{ID: req.PluginID, Version: v, Source: "store"}, 0o644); err != nil {
		return nil, err
	}
	return s.finishedFuture(map[string]string{"pluginId": req.PluginID, "version": v}), nil
}

// future is DSS's answer to a long action, which the client polls at
// /public/api/futures/{jobId}. The stand-in's actions are done before it
// answers, but it answers as DSS does, with a job still running: its
// result is there at the first poll, so that clients are seen to poll.
type future struct {
	JobID     string `json:"jobId"`
	HasResult bool   `json:"hasResult"`
	Alive     bool   `json:"alive"`
	Result    any    `json:"result"`
}

// finishedFuture records a finished job (in memory, as DSS keeps them) and
// returns DSS's first answer for it, the job under way; s.mu must be held.
func (s *service) finishedFuture(result any) future {
	f := future{JobID: randomHex(8), HasResult: true, Result: result}
	if s.futures == nil {
		s.futures = map[string]future{}
	}
	s.futures[f.JobID] = f
	return future{JobID: f.JobID, Alive: true}
}

func (s *service) getFuture(r *http.Request) (any, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f, ok := s.futures[r.PathValue("jobId")]
	if !ok {
		return nil, notFound("Job %s not found", r.PathValue("jobId"))
	}
	return f, nil
}
