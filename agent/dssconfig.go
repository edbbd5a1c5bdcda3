package agent

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/fleetmanager/fm/protocol"
)

// The setup actions that configure DSS through its public admin API, with
// the admin API key FM made (ensureCredentials), and through the
// commands of bin/dssadmin. Each reads what DSS has, changes only what the
// action names, and writes only when that changes something: a replay
// changes nothing.

// adminAPI calls DSS's public admin API at path (under /public/api) with
// FM's admin API key.
func (r *actionRunner) adminAPI(ctx context.Context, method, path string, body, out any) error {
	var s dssSecrets
	if _, err := loadJSON(r.m.secretsPath(), &s); err != nil {
		return err
	}
	if s.AdminAPIKey == "" {
		return errors.New("FM has no admin API key for this DSS yet")
	}
	port, err := r.m.port()
	if err != nil {
		return err
	}
	var b []byte
	if body != nil {
		if b, err = json.Marshal(body); err != nil {
			return err
		}
	}
	return r.m.dssAdmin(ctx, s.AdminAPIKey, method, fmt.Sprintf("http://127.0.0.1:%d/public/api%s", port, path), b, out)
}

// changeGeneralSettings reads DSS's general settings, lets change edit
// them, and saves them back when that changed anything. It reports whether
// it saved.
func (r *actionRunner) changeGeneralSettings(ctx context.Context, change func(map[string]any) error) (bool, error) {
	var settings map[string]any
	if err := r.adminAPI(ctx, http.MethodGet, "/admin/general-settings", nil, &settings); err != nil {
		return false, fmt.Errorf("read DSS's general settings: %w", err)
	}
	if settings == nil {
		return false, errors.New("DSS's general settings are not a JSON object")
	}
	before, _ := json.Marshal(settings)
	if err := change(settings); err != nil {
		return false, err
	}
	after, _ := json.Marshal(settings)
	if bytes.Equal(before, after) {
		return false, nil
	}
	if err := r.adminAPI(ctx, http.MethodPut, "/admin/general-settings", settings, nil); err != nil {
		return false, fmt.Errorf("save DSS's general settings: %w", err)
	}
	return true, nil
}

// object is settings[key] as an object, made (and set) when absent or null.
func object(settings map[string]any, key string) (map[string]any, error) {
	switch v := settings[key].(type) {
	case map[string]any:
		return v, nil
	case nil:
		o := map[string]any{}
		settings[key] = o
		return o, nil
	}
	return nil, fmt.Errorf("DSS's general settings: %s is not an object", key)
}

// settingsResult words the outcome of a change of general settings.
func settingsResult(saved bool, err error, what string) actionResult {
	if err != nil {
		return failed("", err)
	}
	if !saved {
		return ok("%s: already so", what)
	}
	return ok("%s", what)
}

func (r *actionRunner) instanceName(ctx context.Context, p *protocol.SetupInstanceNameParams) actionResult {
	saved, err := r.changeGeneralSettings(ctx, func(s map[string]any) error {
		s["nodeName"] = p.InstanceName
		return nil
	})
	return settingsResult(saved, err, fmt.Sprintf("instance name %q", p.InstanceName))
}

func (r *actionRunner) secureCookies(ctx context.Context, p *protocol.SetupSecureCookiesParams) actionResult {
	secure := p.SecureCookies == nil || *p.SecureCookies
	saved, err := r.changeGeneralSettings(ctx, func(s map[string]any) error {
		s["secureCookies"] = secure
		return nil
	})
	return settingsResult(saved, err, fmt.Sprintf("secure cookies %v", secure))
}

func (r *actionRunner) uiCustomization(ctx context.Context, p *protocol.SetupUICustomizationParams) actionResult {
	fields := p.Fields()
	saved, err := r.changeGeneralSettings(ctx, func(s map[string]any) error {
		ui, err := object(s, "uiCustomization")
		if err != nil {
			return err
		}
		for k, v := range fields {
			ui[k] = v
		}
		return nil
	})
	keys := make([]string, 0, len(fields))
	for k := range fields {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return settingsResult(saved, err, "UI customization "+strings.Join(keys, ", "))
}

// runtimeDatabase makes (or updates) the PostgreSQL connection of the
// runtime database and names it in the general settings' internalDatabase.
// DSS moves to a runtime database when it starts: the setting's digest is
// among what DSS reads at start (dssRecord), so a change restarts it.
func (r *actionRunner) runtimeDatabase(ctx context.Context, p *protocol.SetupRuntimeDatabaseParams) actionResult {
	name := p.ConnectionName
	if name == "" {
		name = protocol.DefaultRuntimeConnection
	}
	port := p.Port
	if port == 0 {
		port = 5432
	}
	// DSS never shows the password: the record keeps a digest of what was
	// given, keyed so that it tells nothing of the password, and a change
	// of it alone is seen there.
	var s dssSecrets
	if _, err := loadJSON(r.m.secretsPath(), &s); err != nil {
		return failed("", err)
	}
	mac := hmac.New(sha256.New, []byte(s.AdminAPIKey))
	fmt.Fprintf(mac, "%s\x00%s\x00%d\x00%s\x00%s\x00%s", name, p.Host, port, p.Database, p.User, p.Password)
	digest := hex.EncodeToString(mac.Sum(nil))
	params := map[string]any{"host": p.Host, "port": port, "db": p.Database, "user": p.User, "password": p.Password}

	var existing map[string]any
	err := r.adminAPI(ctx, http.MethodGet, "/admin/connections/"+url.PathEscape(name), nil, &existing)
	verb := ""
	switch {
	case errors.Is(err, errDSSNotFound):
		verb = "made"
		def := map[string]any{"name": name, "type": "PostgreSQL", "params": params, "usableBy": "ALLOWED", "allowedGroups": []string{}}
		if err := r.adminAPI(ctx, http.MethodPost, "/admin/connections/", def, nil); err != nil {
			return failed("", fmt.Errorf("make connection %s: %w", name, err))
		}
	case err != nil:
		return failed("", fmt.Errorf("read connection %s: %w", name, err))
	default:
		if t, _ := existing["type"].(string); t != "PostgreSQL" {
			return failed("", fmt.Errorf("connection %s exists and is of type %q, not PostgreSQL: name another one (connectionName)", name, t))
		}
		cur, _ := existing["params"].(map[string]any)
		if cur == nil {
			cur = map[string]any{}
		}
		same := r.m.loadRecord().AtStart["runtime-database"] == digest
		for _, k := range []string{"host", "port", "db", "user"} {
			same = same && fmt.Sprint(cur[k]) == fmt.Sprint(params[k])
		}
		if same {
			break
		}
		verb = "updated"
		for k, v := range params {
			cur[k] = v
		}
		existing["params"] = cur
		// What this PUT does not name, DSS keeps.
		if err := r.adminAPI(ctx, http.MethodPut, "/admin/connections/"+url.PathEscape(name), existing, nil); err != nil {
			return failed("", fmt.Errorf("update connection %s: %w", name, err))
		}
	}
	saved, err := r.changeGeneralSettings(ctx, func(s map[string]any) error {
		db, err := object(s, "internalDatabase")
		if err != nil {
			return err
		}
		db["connection"] = name
		return nil
	})
	if err != nil {
		return failed("", err)
	}
	if err := r.recordAtStart("runtime-database", digest); err != nil {
		return failed("", err)
	}
	what := fmt.Sprintf("runtime database %s on %s:%d, connection %s", p.Database, p.Host, port, name)
	if verb == "" && !saved {
		return ok("%s: already so", what)
	}
	if verb != "" {
		what += " " + verb
	}
	return ok("%s; DSS uses it from its next start", what)
}

// recordAtStart records a setting DSS takes at start (dssRecord.AtStart).
func (r *actionRunner) recordAtStart(key, digest string) error {
	rec := r.m.loadRecord()
	if rec.AtStart[key] == digest {
		return nil
	}
	rec.AtStart[key] = digest
	return r.m.saveRecord(rec)
}

// musAutocreate installs multi-user security (dssadmin
// install-impersonation, as root on a real machine; DSS takes it at its
// next start) and turns it on with unix users made on demand.
func (r *actionRunner) musAutocreate(ctx context.Context, p *protocol.SetupMUSAutocreateParams) actionResult {
	prefix, group := p.UnixUserPrefix, p.UnixGroup
	if prefix == "" {
		prefix = protocol.DefaultMUSUserPrefix
	}
	if group == "" {
		group = protocol.DefaultMUSGroup
	}
	ran, out, err := r.oncePerVersion(ctx, "install-impersonation "+r.m.cfg.DSSUser, true, "install-impersonation", r.m.cfg.DSSUser)
	if err != nil {
		return failed(out, err)
	}
	saved, err := r.changeGeneralSettings(ctx, func(s map[string]any) error {
		imp, err := object(s, "impersonation")
		if err != nil {
			return err
		}
		imp["enabled"], imp["autoCreateUnixUsers"], imp["unixUserPrefix"], imp["unixGroup"] = true, true, prefix, group
		return nil
	})
	if err != nil {
		return failed(out, err)
	}
	msg := fmt.Sprintf("multi-user security on, unix users %s<login> in %s", prefix, group)
	if !ran && !saved {
		msg += ": already so"
	}
	return actionResult{status: protocol.StatusOK, message: msg, output: out}
}

// oncePerVersion runs bin/dssadmin args unless the record says it ran for
// the DSS version installed (the base images, the graphics export and the
// integrations are DSS's own, redone after an upgrade). atStart: DSS takes
// what the command did when it starts, so the record's change restarts it.
// A kill between the command and the record runs the command again.
func (r *actionRunner) oncePerVersion(ctx context.Context, key string, atStart bool, args ...string) (bool, string, error) {
	version, err := r.m.installedVersion()
	if err != nil || version == "" {
		return false, "", errors.New("DSS is not installed yet: give the action the stage after_install or later")
	}
	rec := r.m.loadRecord()
	if rec.Commands[key] == version {
		return false, "", nil
	}
	ctx, cancel := context.WithTimeout(ctx, dssadminTime)
	defer cancel()
	out, err := r.m.run(ctx, filepath.Join(r.m.dssDir, "bin", "dssadmin"), args...)
	if err != nil {
		return false, out, fmt.Errorf("dssadmin %s: %w", strings.Join(args, " "), err)
	}
	rec.Commands[key] = version
	if atStart {
		rec.AtStart[key] = version
	}
	if err := r.m.saveRecord(rec); err != nil {
		return true, out, err
	}
	return true, out, nil
}

// dssadminTime bounds one dssadmin command: building a base image pulls and
// installs packages.
const dssadminTime = 45 * time.Minute

// commands runs dssadmin commands once per DSS version each, and words it.
func (r *actionRunner) commands(ctx context.Context, what string, cmds ...[]string) actionResult {
	var outs, ran []string
	for _, c := range cmds {
		atStart := c[0] == "install-spark-integration" || c[0] == "install-graphics-export"
		did, out, err := r.oncePerVersion(ctx, strings.Join(c, " "), atStart, c...)
		outs = append(outs, out)
		if err != nil {
			return failed(strings.Join(outs, "\n"), err)
		}
		if did {
			ran = append(ran, strings.Join(c, " "))
		}
	}
	if len(ran) == 0 {
		return ok("%s: already done for this DSS version", what)
	}
	return actionResult{status: protocol.StatusOK, message: what + ": dssadmin " + strings.Join(ran, "; dssadmin "), output: strings.Join(outs, "\n")}
}

// k8sAndSpark builds DSS's base images for containerized execution and
// Spark, installs the Spark integration, and gives DSS an eks-default
// containerized-execution configuration and an eks-default Spark one, the
// defaults when DSS has none. Configurations DSS already has by that name
// are left as they are: an administrator may have tuned them.
func (r *actionRunner) k8sAndSpark(ctx context.Context, id string, p *protocol.SetupK8sAndSparkParams, tools map[string]protocol.ToolSource) actionResult {
	installed, missing, err := r.installTools(ctx, tools, "kubectl", "eksctl", "aws")
	if err != nil {
		return failed("", err)
	}
	if p.UseHostIP {
		// DSS tells its containers to call back at DKU_BACKEND_EXT_HOST.
		ip, err := r.hostIP()
		if err != nil {
			return failed("", err)
		}
		if res := r.editDSSFile(ctx, id, []string{"bin", "env-site.sh"}, []string{"export DKU_BACKEND_EXT_HOST=" + ip}, ""); res.status == protocol.StatusFailed {
			return res
		}
	}
	res := r.commands(ctx, "Kubernetes and Spark",
		[]string{"build-base-image", "--type", "container-exec"},
		[]string{"build-base-image", "--type", "spark"},
		[]string{"install-spark-integration"})
	if res.status == protocol.StatusFailed {
		return res
	}
	saved, err := r.changeGeneralSettings(ctx, func(s map[string]any) error {
		cs, err := object(s, "containerSettings")
		if err != nil {
			return err
		}
		if err := addConfig(cs, map[string]any{"name": eksConfig, "type": "KUBERNETES", "kubernetesNamespace": "default", "baseImageType": "EXEC"}); err != nil {
			return fmt.Errorf("containerSettings: %w", err)
		}
		if cs["defaultExecutionConfig"] == nil {
			cs["defaultExecutionConfig"] = eksConfig
		}
		ss, err := object(s, "sparkSettings")
		if err != nil {
			return err
		}
		if err := addConfig(ss, map[string]any{"name": eksConfig, "kubernetesExecution": true, "conf": []any{}}); err != nil {
			return fmt.Errorf("sparkSettings: %w", err)
		}
		return nil
	})
	if err != nil {
		return failed(res.output, err)
	}
	if saved {
		res.message += "; " + eksConfig + " execution configurations added"
	}
	if len(installed) > 0 {
		res.message += "; installed " + strings.Join(installed, ", ")
	}
	if len(missing) > 0 {
		res.message += "; the image offers no " + strings.Join(missing, ", ") + " (left to the machine's own)"
	}
	if p.UseHostIP {
		res.message += "; pods reach DSS at the host's IP"
	}
	return res
}

// deprecatedPython installs the Python builds the flags ask for from those
// the image offers (its tools python3.6 to python3.8); a flag turned off
// uninstalls nothing, as in Dataiku's.
func (r *actionRunner) deprecatedPython(ctx context.Context, p *protocol.InstallDeprecatedPythonParams, tools map[string]protocol.ToolSource) actionResult {
	var want, lacking []string
	for _, f := range []struct {
		on   bool
		name string
	}{{p.InstallPy36, "python3.6"}, {p.InstallPy37, "python3.7"}, {p.InstallPy38, "python3.8"}} {
		if !f.on {
			continue
		}
		if _, ok := tools[f.name]; !ok {
			lacking = append(lacking, f.name)
		}
		want = append(want, f.name)
	}
	if len(lacking) > 0 {
		return unsupported("this image offers no %s build (an image's tools)", strings.Join(lacking, ", "))
	}
	if len(want) == 0 {
		return ok("no deprecated Python asked for")
	}
	installed, _, err := r.installTools(ctx, tools, want...)
	if err != nil {
		return failed("", err)
	}
	if len(installed) == 0 {
		return ok("%s already installed", strings.Join(want, ", "))
	}
	return ok("installed %s", strings.Join(installed, ", "))
}

// eksConfig names the containerized-execution configuration of Dataiku's
// EKS blueprint.
const eksConfig = "eks-default"

// addConfig adds config to holder's executionConfigs unless one of its name
// is there.
func addConfig(holder map[string]any, config map[string]any) error {
	var list []any
	switch v := holder["executionConfigs"].(type) {
	case []any:
		list = v
	case nil:
	default:
		return errors.New("executionConfigs is not an array")
	}
	for _, c := range list {
		if m, ok := c.(map[string]any); ok && m["name"] == config["name"] {
			return nil
		}
	}
	holder["executionConfigs"] = append(list, config)
	return nil
}

// pluginsFromStore installs the plugins of the store DSS does not have yet;
// one it has is left at its version (DSS refuses to install it twice).
func (r *actionRunner) pluginsFromStore(ctx context.Context, p *protocol.InstallDSSPluginsFromStoreParams) actionResult {
	var installed []struct {
		ID string `json:"id"`
	}
	if err := r.adminAPI(ctx, http.MethodGet, "/plugins/", nil, &installed); err != nil {
		return failed("", fmt.Errorf("list DSS's plugins: %w", err))
	}
	have := map[string]bool{}
	for _, pl := range installed {
		have[pl.ID] = true
	}
	var added, already []string
	for _, id := range p.Plugins {
		if have[id] {
			already = append(already, id)
			continue
		}
		var fut dssFuture
		if err := r.adminAPI(ctx, http.MethodPost, "/plugins/actions/installFromStore", map[string]string{"pluginId": id}, &fut); err != nil {
			return failed("", fmt.Errorf("install plugin %s: %w", id, err))
		}
		if err := r.waitFuture(ctx, fut); err != nil {
			return failed("", fmt.Errorf("install plugin %s: %w", id, err))
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
	var envs []struct {
		EnvName string `json:"envName"`
		Preset  string `json:"preset"`
	}
	if err := r.adminAPI(ctx, http.MethodGet, "/admin/code-envs/", nil, &envs); err != nil {
		return failed("", fmt.Errorf("list DSS's code environments: %w", err))
	}
	for _, e := range envs {
		if e.Preset == preset && !allowUpdate {
			return ok("code environment %s (preset %s) already exists; in-place update not allowed", e.EnvName, preset)
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
	if err := r.adminAPI(ctx, http.MethodPost, "/admin/code-envs/from-python-preset/"+url.PathEscape(preset)+"?"+q.Encode(), nil, &res); err != nil {
		return failed("", fmt.Errorf("code environment from preset %s: %w", preset, err))
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
