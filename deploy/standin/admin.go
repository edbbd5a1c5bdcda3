package main

import (
	"encoding/json"
	"maps"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"
)

// General settings and connections of the admin API, kept in DSS's own
// files (config/general-settings.json, config/connections.json).

// defaultGeneralSettings is what DSS answers before any change. Of DSS's
// many settings the stand-in checks those FM's agent sets;
// maxRunningActivities and ldapSettings stand for the others, which FM
// must leave as they are.
func defaultGeneralSettings() map[string]any {
	return map[string]any{
		"nodeName":             "",
		"secureCookies":        false,
		"uiCustomization":      map[string]any{},
		"internalDatabase":     map[string]any{"connection": nil},
		"impersonation":        map[string]any{"enabled": false},
		"containerSettings":    map[string]any{"executionConfigs": []any{}, "defaultExecutionConfig": nil},
		"sparkSettings":        map[string]any{"executionConfigs": []any{}},
		"maxRunningActivities": json.Number("5"),
		"ldapSettings":         map[string]any{"enabled": false},
	}
}

func (d dataDir) generalSettingsFile() string { return d.path("config", "general-settings.json") }

func (s *service) getGeneralSettings(r *http.Request) (any, error) {
	gs := map[string]any{}
	found, err := readJSONFile(s.dir.generalSettingsFile(), &gs)
	if err != nil {
		return nil, err
	}
	if !found {
		return defaultGeneralSettings(), nil
	}
	return gs, nil
}

// putGeneralSettings replaces the general settings with the body, as DSS
// does: a setting the body leaves out takes its default, one the stand-in
// does not know is kept as given.
func (s *service) putGeneralSettings(r *http.Request) (any, error) {
	var gs map[string]any
	if err := decodeBody(r, &gs); err != nil {
		return nil, err
	}
	if gs == nil {
		return nil, badRequest("the general settings must be a JSON object")
	}
	for k, v := range defaultGeneralSettings() {
		if _, ok := gs[k]; !ok {
			gs[k] = v
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	conns, err := s.dir.loadConnections()
	if err != nil {
		return nil, err
	}
	if err := s.dir.checkGeneralSettings(gs, conns); err != nil {
		return nil, err
	}
	if _, err := writeJSONFile(s.dir.generalSettingsFile(), gs, 0o644); err != nil {
		return nil, err
	}
	return struct{}{}, nil
}

var (
	reHexColor       = regexp.MustCompile(`^#[0-9A-Fa-f]{6}$`)
	reUnixUserPrefix = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,15}$`)
)

// checkGeneralSettings refuses settings DSS would refuse, naming the
// field. It fills in the defaults of the nested fields it checks, so that
// what is stored has DSS's shape.
func (d dataDir) checkGeneralSettings(gs map[string]any, conns map[string]map[string]any) error {
	if v, ok := gs["nodeName"].(string); !ok || utf8.RuneCountInString(v) > 100 || strings.ContainsAny(v, "\r\n") {
		return badRequest("nodeName must be a string of at most 100 characters, on one line")
	}
	if _, ok := gs["secureCookies"].(bool); !ok {
		return badRequest("secureCookies must be true or false")
	}
	if err := checkUICustomization(gs["uiCustomization"]); err != nil {
		return err
	}
	if err := checkInternalDatabase(gs["internalDatabase"], conns); err != nil {
		return err
	}
	if err := d.checkImpersonation(gs["impersonation"]); err != nil {
		return err
	}
	if err := d.checkContainerSettings(gs["containerSettings"]); err != nil {
		return err
	}
	return d.checkSparkSettings(gs["sparkSettings"])
}

func checkUICustomization(v any) error {
	ui, ok := v.(map[string]any)
	if !ok {
		return badRequest("uiCustomization must be an object")
	}
	// In order, so that of several faults the same is named each time.
	for _, k := range slices.Sorted(maps.Keys(ui)) {
		v := ui[k]
		switch k {
		case "headerColor":
			if s, ok := v.(string); !ok || !reHexColor.MatchString(s) {
				return badRequest("uiCustomization.headerColor must be a colour written #rrggbb")
			}
		case "homeMessage", "loginMessage":
			if s, ok := v.(string); !ok || utf8.RuneCountInString(s) > 2000 {
				return badRequest("uiCustomization.%s must be a string of at most 2000 characters", k)
			}
		default:
			return badRequest("uiCustomization.%s is not a UI customization (headerColor, homeMessage, loginMessage)", k)
		}
	}
	return nil
}

// checkInternalDatabase: DSS keeps its runtime databases in a PostgreSQL
// connection it must already have.
func checkInternalDatabase(v any, conns map[string]map[string]any) error {
	db, ok := v.(map[string]any)
	if !ok {
		return badRequest("internalDatabase must be an object")
	}
	switch name := db["connection"].(type) {
	case nil:
		db["connection"] = nil
	case string:
		c, ok := conns[name]
		if !ok {
			return badRequest("internalDatabase.connection: there is no connection %q", name)
		}
		if c["type"] != "PostgreSQL" {
			return badRequest("internalDatabase.connection: connection %q is of type %v, not PostgreSQL", name, c["type"])
		}
	default:
		return badRequest("internalDatabase.connection must be null or the name of a PostgreSQL connection")
	}
	return nil
}

// checkImpersonation: multi-user security can be enabled only once
// dssadmin install-impersonation has set it up.
func (d dataDir) checkImpersonation(v any) error {
	imp, ok := v.(map[string]any)
	if !ok {
		return badRequest("impersonation must be an object")
	}
	if _, ok := imp["enabled"]; !ok {
		imp["enabled"] = false
	}
	if _, ok := imp["enabled"].(bool); !ok {
		return badRequest("impersonation.enabled must be true or false")
	}
	if v, ok := imp["autoCreateUnixUsers"]; ok {
		if _, ok := v.(bool); !ok {
			return badRequest("impersonation.autoCreateUnixUsers must be true or false")
		}
	}
	if v, ok := imp["unixUserPrefix"]; ok {
		if s, ok := v.(string); !ok || !reUnixUserPrefix.MatchString(s) {
			return badRequest("impersonation.unixUserPrefix must match %s", reUnixUserPrefix)
		}
	}
	if v, ok := imp["unixGroup"]; ok {
		if s, ok := v.(string); !ok || !reUnixName.MatchString(s) {
			return badRequest("impersonation.unixGroup must match %s", reUnixName)
		}
	}
	if imp["enabled"] == true && !fileExists(d.impersonationFile()) {
		return badRequest("Multi-user security is not installed: run dssadmin install-impersonation first")
	}
	return nil
}

// checkContainerSettings: a Kubernetes execution config runs DSS's
// container-exec base image, which dssadmin build-base-image builds.
func (d dataDir) checkContainerSettings(v any) error {
	cs, ok := v.(map[string]any)
	if !ok {
		return badRequest("containerSettings must be an object")
	}
	configs, names, err := executionConfigs(cs, "containerSettings")
	if err != nil {
		return err
	}
	for i, c := range configs {
		switch c["type"] {
		case "DOCKER":
		case "KUBERNETES":
			if !fileExists(d.baseImageFile("container-exec")) {
				return badRequest("containerSettings.executionConfigs[%d] (%q) is of type KUBERNETES, which needs the container-exec base image: run dssadmin build-base-image --type container-exec first", i, c["name"])
			}
		default:
			return badRequest("containerSettings.executionConfigs[%d].type must be KUBERNETES or DOCKER", i)
		}
	}
	switch def := cs["defaultExecutionConfig"].(type) {
	case nil:
		cs["defaultExecutionConfig"] = nil
	case string:
		if !names[def] {
			return badRequest("containerSettings.defaultExecutionConfig: there is no execution config %q", def)
		}
	default:
		return badRequest("containerSettings.defaultExecutionConfig must be null or the name of an execution config")
	}
	return nil
}

// checkSparkSettings: Spark execution configs need the Spark integration
// that dssadmin install-spark-integration installs.
func (d dataDir) checkSparkSettings(v any) error {
	ss, ok := v.(map[string]any)
	if !ok {
		return badRequest("sparkSettings must be an object")
	}
	configs, _, err := executionConfigs(ss, "sparkSettings")
	if err != nil {
		return err
	}
	if len(configs) > 0 && !fileExists(d.sparkEnvFile()) {
		return badRequest("sparkSettings.executionConfigs: the Spark integration is not installed: run dssadmin install-spark-integration first")
	}
	return nil
}

// executionConfigs returns the executionConfigs list of settings (the
// empty list when absent), each an object with a name of its own.
func executionConfigs(settings map[string]any, field string) ([]map[string]any, map[string]bool, error) {
	v, ok := settings["executionConfigs"]
	if !ok {
		v = []any{}
		settings["executionConfigs"] = v
	}
	list, ok := v.([]any)
	if !ok {
		return nil, nil, badRequest("%s.executionConfigs must be an array", field)
	}
	configs := make([]map[string]any, len(list))
	names := map[string]bool{}
	for i, item := range list {
		c, ok := item.(map[string]any)
		if !ok {
			return nil, nil, badRequest("%s.executionConfigs[%d] must be an object", field, i)
		}
		name, _ := c["name"].(string)
		if name == "" {
			return nil, nil, badRequest("%s.executionConfigs[%d].name must be a non-empty string", field, i)
		}
		if names[name] {
			return nil, nil, badRequest("%s.executionConfigs[%d].name: %q is the name of another execution config", field, i, name)
		}
		names[name] = true
		configs[i] = c
	}
	return configs, names, nil
}

// Connections. The file holds passwords, hence its mode 0600; the API
// never shows them.

func (d dataDir) connectionsFile() string { return d.path("config", "connections.json") }

func (d dataDir) loadConnections() (map[string]map[string]any, error) {
	conns := map[string]map[string]any{}
	if _, err := readJSONFile(d.connectionsFile(), &conns); err != nil {
		return nil, err
	}
	return conns, nil
}

// shown is a connection's definition as the API shows it: the password
// blanked.
func shown(def map[string]any) map[string]any {
	out := make(map[string]any, len(def))
	for k, v := range def {
		out[k] = v
	}
	if params, ok := def["params"].(map[string]any); ok {
		if _, ok := params["password"]; ok {
			p := make(map[string]any, len(params))
			for k, v := range params {
				p[k] = v
			}
			p["password"] = ""
			out["params"] = p
		}
	}
	return out
}

func (s *service) listConnections(r *http.Request) (any, error) {
	conns, err := s.dir.loadConnections()
	if err != nil {
		return nil, err
	}
	out := make(map[string]any, len(conns))
	for name, def := range conns {
		out[name] = shown(def)
	}
	return out, nil
}

func (s *service) getConnection(r *http.Request) (any, error) {
	conns, err := s.dir.loadConnections()
	if err != nil {
		return nil, err
	}
	def, ok := conns[r.PathValue("name")]
	if !ok {
		return nil, notFound("Connection %s not found", r.PathValue("name"))
	}
	return shown(def), nil
}

func (s *service) createConnection(r *http.Request) (any, error) {
	var def map[string]any
	if err := decodeBody(r, &def); err != nil {
		return nil, err
	}
	if err := checkConnection(def); err != nil {
		return nil, err
	}
	name := def["name"].(string)
	s.mu.Lock()
	defer s.mu.Unlock()
	conns, err := s.dir.loadConnections()
	if err != nil {
		return nil, err
	}
	if _, ok := conns[name]; ok {
		return nil, conflict("Connection %s already exists", name)
	}
	conns[name] = def
	if _, err := writeJSONFile(s.dir.connectionsFile(), conns, 0o600); err != nil {
		return nil, err
	}
	return struct{}{}, nil
}

// putConnection replaces a connection's definition. The definition came
// from a GET, which blanks the password: an empty one keeps the stored
// password.
func (s *service) putConnection(r *http.Request) (any, error) {
	var def map[string]any
	if err := decodeBody(r, &def); err != nil {
		return nil, err
	}
	name := r.PathValue("name")
	if def == nil || def["name"] != name {
		return nil, badRequest("the definition's name must be the connection's, %q", name)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	conns, err := s.dir.loadConnections()
	if err != nil {
		return nil, err
	}
	old, ok := conns[name]
	if !ok {
		return nil, notFound("Connection %s not found", name)
	}
	if err := checkConnection(def); err != nil {
		return nil, err
	}
	params := def["params"].(map[string]any)
	if pw, _ := params["password"].(string); pw == "" {
		if oldParams, ok := old["params"].(map[string]any); ok {
			if oldPw, ok := oldParams["password"]; ok {
				params["password"] = oldPw
			}
		}
	}
	conns[name] = def
	if _, err := writeJSONFile(s.dir.connectionsFile(), conns, 0o600); err != nil {
		return nil, err
	}
	return struct{}{}, nil
}

var (
	reConnectionName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)
	reConnectionType = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_]{0,63}$`)
)

// checkConnection refuses a definition DSS would refuse, and fills in the
// defaults of its fields (no params, usable by all).
func checkConnection(def map[string]any) error {
	if def == nil {
		return badRequest("the connection's definition must be a JSON object")
	}
	if name, ok := def["name"].(string); !ok || !reConnectionName.MatchString(name) {
		return badRequest("name must match %s", reConnectionName)
	}
	if t, ok := def["type"].(string); !ok || !reConnectionType.MatchString(t) {
		return badRequest("type must be a connection type, such as PostgreSQL")
	}
	if _, ok := def["params"]; !ok {
		def["params"] = map[string]any{}
	}
	params, ok := def["params"].(map[string]any)
	if !ok {
		return badRequest("params must be an object")
	}
	if _, ok := def["usableBy"]; !ok {
		def["usableBy"] = "ALL"
	}
	if u := def["usableBy"]; u != "ALL" && u != "ALLOWED" {
		return badRequest("usableBy must be ALL or ALLOWED")
	}
	if _, ok := def["allowedGroups"]; !ok {
		def["allowedGroups"] = []any{}
	}
	groups, ok := def["allowedGroups"].([]any)
	if !ok {
		return badRequest("allowedGroups must be an array of group names")
	}
	for _, g := range groups {
		if s, ok := g.(string); !ok || s == "" {
			return badRequest("allowedGroups must be an array of group names")
		}
	}
	if pw, ok := params["password"]; ok {
		if _, ok := pw.(string); !ok {
			return badRequest("params.password must be a string")
		}
	}
	if def["type"] != "PostgreSQL" {
		return nil
	}
	for _, k := range []string{"host", "db", "user"} {
		if s, ok := params[k].(string); !ok || strings.TrimSpace(s) == "" {
			return badRequest("params.%s must be a non-empty string", k)
		}
	}
	if _, ok := portOf(params["port"]); !ok {
		return badRequest("params.port must be a port number, 1 to 65535")
	}
	return nil
}

// portOf reads a port given as a JSON number or, as DSS accepts it, a
// string of digits.
func portOf(v any) (int, bool) {
	var s string
	switch p := v.(type) {
	case json.Number:
		s = p.String()
	case string:
		s = p
	default:
		return 0, false
	}
	n, err := strconv.Atoi(s)
	return n, err == nil && n >= 1 && n <= 65535
}
