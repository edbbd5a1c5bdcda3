package main

import (
	"errors"
	"net/http"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// Code environments, each in code-envs/python/<envName>/desc.json. The
// stand-in creates them from DSS's Python presets and installs nothing in
// them.

// pythonPresets are the presets the stand-in knows.
var pythonPresets = map[string]bool{
	"VISUAL_ML_CPU":              true,
	"VISUAL_ML_GPU":              true,
	"TIMESERIES_FORECASTING_CPU": true,
	"TIMESERIES_FORECASTING_GPU": true,
}

// pythonInterpreters are the interpreters a code env can be built with.
var pythonInterpreters = map[string]bool{"PYTHON39": true, "PYTHON310": true, "PYTHON311": true, "PYTHON312": true}

const defaultInterpreter = "PYTHON311"

var reEnvPrefix = regexp.MustCompile(`^[a-z0-9_]{0,20}$`)

// codeEnvDesc is a code env's desc.json. Its presetVersion is the DSS
// version that wrote it: an upgraded DSS updates the env.
type codeEnvDesc struct {
	EnvName        string `json:"envName"`
	EnvLang        string `json:"envLang"`
	DeploymentMode string `json:"deploymentMode"`
	Preset         string `json:"preset"`
	Interpreter    string `json:"interpreter"`
	PresetVersion  string `json:"presetVersion"`
}

func (d dataDir) codeEnvFile(name string) string {
	return d.path("code-envs", "python", name, "desc.json")
}

func (s *service) listCodeEnvs(r *http.Request) (any, error) {
	entries, err := os.ReadDir(s.dir.path("code-envs", "python"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	out := []codeEnvDesc{}
	for _, e := range entries {
		var desc codeEnvDesc
		found, err := readJSONFile(s.dir.codeEnvFile(e.Name()), &desc)
		if err != nil {
			return nil, err
		}
		if found {
			out = append(out, desc)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].EnvName < out[j].EnvName })
	return out, nil
}

// codeEnvFromPreset creates the code env of a preset, or with
// allowUpdate brings an existing one to this DSS's preset version and the
// interpreter asked for; an env already so is left alone.
func (s *service) codeEnvFromPreset(r *http.Request) (any, error) {
	preset := r.PathValue("preset")
	if !pythonPresets[preset] {
		return nil, notFound("Preset %s not found", preset)
	}
	q := r.URL.Query()
	allowUpdate := false
	if v := q.Get("allowUpdate"); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return nil, badRequest("allowUpdate must be true or false, not %q", v)
		}
		allowUpdate = b
	}
	interpreter := q.Get("interpreter")
	if interpreter == "" {
		interpreter = defaultInterpreter
	}
	if !pythonInterpreters[interpreter] {
		return nil, badRequest("interpreter %q is not one of PYTHON39, PYTHON310, PYTHON311, PYTHON312", interpreter)
	}
	prefix := q.Get("prefix")
	if !reEnvPrefix.MatchString(prefix) {
		return nil, badRequest("prefix %q must match %s", prefix, reEnvPrefix)
	}
	want := codeEnvDesc{
		EnvName:        prefix + strings.ToLower(preset),
		EnvLang:        "PYTHON",
		DeploymentMode: "DSS_INTERNAL",
		Preset:         preset,
		Interpreter:    interpreter,
		PresetVersion:  version,
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var have codeEnvDesc
	found, err := readJSONFile(s.dir.codeEnvFile(want.EnvName), &have)
	if err != nil {
		return nil, err
	}
	if found && !allowUpdate {
		return nil, conflict("Code env %s already exists", want.EnvName)
	}
	changed := !found || have.Interpreter != want.Interpreter || have.PresetVersion != want.PresetVersion
	if changed {
		if _, err := writeJSONFile(s.dir.codeEnvFile(want.EnvName), want, 0o644); err != nil {
			return nil, err
		}
	}
	return codeEnvResult{EnvName: want.EnvName, Created: !found, Updated: found && changed, Messages: codeEnvMessages{Messages: []string{}}}, nil
}

// codeEnvResult is DSS's answer to a code env's creation or update.
type codeEnvResult struct {
	EnvName  string          `json:"envName"`
	Created  bool            `json:"created"`
	Updated  bool            `json:"updated"`
	Messages codeEnvMessages `json:"messages"`
}

// codeEnvMessages are the messages of building an env; the stand-in
// builds nothing, so it has none.
type codeEnvMessages struct {
	Error    bool     `json:"error"`
	Messages []string `json:"messages"`
}
