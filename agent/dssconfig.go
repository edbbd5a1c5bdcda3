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
	"slices"
	"strings"
	"time"

	"github.com/fleetmanager/fm/protocol"
)

// The setup actions that configure DSS through its public admin API, with
// the admin API key FM made (ensureCredentials): its general settings and
// a runtime database. Each reads what DSS has, changes only what the
// action names, and writes only when that changes something: a replay
// changes nothing.

// adminAPI calls DSS's public admin API at path (under /public/api) with
// FM's admin API key.
func (r *actionRunner) adminAPI(ctx context.Context, method, path string, body, out any) error {
	return r.adminAPIFor(ctx, dssAdminAttempt, method, path, body, out)
}

// adminAPIFor is adminAPI for a call DSS may take up to attempt to answer.
func (r *actionRunner) adminAPIFor(ctx context.Context, attempt time.Duration, method, path string, body, out any) error {
	key, err := r.adminKey()
	if err != nil {
		return err
	}
	target, err := r.m.adminURL(ctx, path)
	if err != nil {
		return err
	}
	var b []byte
	if body != nil {
		if b, err = json.Marshal(body); err != nil {
			return err
		}
	}
	return r.m.dssAdminFor(ctx, attempt, key, method, target, b, out)
}

// adminKey is FM's admin API key of this DSS.
func (r *actionRunner) adminKey() (string, error) {
	var s dssSecrets
	if _, err := loadJSON(r.m.secretsPath(), &s); err != nil {
		return "", err
	}
	if s.AdminAPIKey == "" {
		return "", errors.New("FM has no admin API key for this DSS yet")
	}
	return s.AdminAPIKey, nil
}

// create POSTs to DSS what done says is not there yet. A POST DSS may have
// received without answering (a timeout, a 5xx) is never sent again
// blindly: done is asked, until dssAdminWait has passed, and the POST sent
// again only once it says no. Without done (a POST that must not be sent
// twice), such a POST fails. A refusal DSS gives for something that is
// there (a plugin installed) counts as done.
func (r *actionRunner) create(ctx context.Context, attempt time.Duration, path string, body, out any, done func() (bool, error)) error {
	err := r.adminAPIFor(ctx, attempt, http.MethodPost, path, body, out)
	if err == nil {
		return nil
	}
	if done == nil {
		return err
	}
	if !errors.Is(err, errDSSNotAnswering) {
		if there, derr := done(); derr == nil && there {
			return nil
		}
		return err
	}
	deadline := time.Now().Add(dssAdminWait)
	for {
		there, derr := done()
		switch {
		case derr == nil && there:
			return nil
		case derr == nil:
			err = r.adminAPIFor(ctx, attempt, http.MethodPost, path, body, out)
			if err == nil {
				return nil
			}
			if !errors.Is(err, errDSSNotAnswering) {
				if there, derr := done(); derr == nil && there {
					return nil
				}
				return err
			}
		}
		if time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(2 * time.Second):
		}
	}
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
	key, err := r.adminKey()
	if err != nil {
		return failed("", err)
	}
	mac := hmac.New(sha256.New, []byte(key))
	fmt.Fprintf(mac, "%s\x00%s\x00%d\x00%s\x00%s\x00%s", name, p.Host, port, p.Database, p.User, p.Password)
	digest := hex.EncodeToString(mac.Sum(nil))
	params := map[string]any{"host": p.Host, "port": port, "db": p.Database, "user": p.User, "password": p.Password}

	var existing map[string]any
	connPath := "/admin/connections/" + url.PathEscape(name)
	err = r.adminAPI(ctx, http.MethodGet, connPath, nil, &existing)
	verb := ""
	switch {
	case errors.Is(err, errDSSNotFound):
		verb = "made"
		def := map[string]any{"name": name, "type": "PostgreSQL", "params": params, "usableBy": "ALLOWED", "allowedGroups": []string{}}
		exists := func() (bool, error) {
			err := r.adminAPI(ctx, http.MethodGet, connPath, nil, nil)
			if errors.Is(err, errDSSNotFound) {
				return false, nil
			}
			return err == nil, err
		}
		if err := r.create(ctx, dssAdminAttempt, "/admin/connections/", def, nil, exists); err != nil {
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
		if err := r.adminAPI(ctx, http.MethodPut, connPath, existing, nil); err != nil {
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

// musAutocreate installs multi-user security and turns it on with unix
// users made on demand. dssadmin install-impersonation is run as DSS's
// documentation says: as root (the agent's account on a real machine),
// DSS stopped; once per DSS version, DSS started again after it.
func (r *actionRunner) musAutocreate(ctx context.Context, p *protocol.SetupMUSAutocreateParams) actionResult {
	prefix, group := p.UnixUserPrefix, p.UnixGroup
	if prefix == "" {
		prefix = protocol.DefaultMUSUserPrefix
	}
	if group == "" {
		group = protocol.DefaultMUSGroup
	}
	ran, out, err := r.oncePerVersion(ctx, dssadminCommand{args: []string{"install-impersonation", r.m.cfg.DSSUser}, atStart: true, asRoot: true, dssStopped: true})
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
