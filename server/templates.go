package server

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"path"
	"regexp"
	"strings"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

const kindTemplate = "instance settings template"

// maxSetupActions bounds a template's action list.
const maxSetupActions = 100

func (s *Server) listTemplates(r *http.Request) (any, error) {
	all := s.st.templates.all()
	for i := range all {
		redactTemplate(&all[i])
	}
	return all, nil
}

func (s *Server) getTemplate(r *http.Request) (any, error) {
	id := r.PathValue("id")
	t, ok := s.st.templates.view(id)
	if !ok {
		return nil, notFound(kindTemplate, id)
	}
	redactTemplate(&t)
	return t, nil
}

func (s *Server) createTemplate(r *http.Request) (any, error) {
	var t api.InstanceSettingsTemplate
	if err := readJSON(r, &t); err != nil {
		return nil, err
	}
	normalizeTemplate(&t)
	if err := validateTemplate(&t); err != nil {
		return nil, err
	}
	if err := s.st.templates.insert(r.Context(), "ist", &t, func(v *api.InstanceSettingsTemplate, id string) { v.ID = id }); err != nil {
		return nil, err
	}
	redactTemplate(&t)
	return t, nil
}

func (s *Server) saveTemplate(r *http.Request) (any, error) {
	id := r.PathValue("id")
	cur, rev, ok := s.st.templates.get(id)
	if !ok {
		return nil, notFound(kindTemplate, id)
	}
	var t api.InstanceSettingsTemplate
	if err := readJSON(r, &t); err != nil {
		return nil, err
	}
	rev, err := expectedRevision(kindTemplate, id, t.ID, t.Revision, rev)
	if err != nil {
		return nil, err
	}
	t.ID = id
	// The secret is write-only, so an echoed object does not carry it: keep
	// the stored one unless a new one is given or keys are no longer used.
	if t.DataikuAWSSecretAccessKey == "" {
		t.DataikuAWSSecretAccessKey = cur.DataikuAWSSecretAccessKey
	}
	normalizeTemplate(&t)
	if err := validateTemplate(&t); err != nil {
		return nil, err
	}
	if err := s.st.templates.replace(r.Context(), id, cur, &t, rev); err != nil {
		return nil, err
	}
	redactTemplate(&t)
	return t, nil
}

func (s *Server) deleteTemplate(r *http.Request) (any, error) {
	id := r.PathValue("id")
	t, err := deleteGuarded(r.Context(), s.st.templates, id, func(ctx context.Context) ([]string, error) {
		return s.instancesWhere(ctx, func(in *api.Instance) bool { return in.InstanceSettingsTemplateID == id })
	})
	return s.finishedOp(r, "delete-instance-settings-template", "instanceSettingsTemplate", id, map[string]any{"id": id, "label": t.Label}, err)
}

func redactTemplate(t *api.InstanceSettingsTemplate) { t.DataikuAWSSecretAccessKey = "" }

func normalizeTemplate(t *api.InstanceSettingsTemplate) {
	t.Label = trim(t.Label)
	if t.SetupActions == nil {
		t.SetupActions = []api.SetupAction{}
	}
	for i := range t.SetupActions {
		a := &t.SetupActions[i]
		if p := bytes.TrimSpace(a.Params); len(p) == 0 || bytes.Equal(p, []byte("null")) {
			a.Params = json.RawMessage("{}")
		}
		if a.Enabled == nil {
			a.Enabled = api.Bool(true)
		}
	}
	if t.RestrictAWSMetadataServerAccess == nil {
		t.RestrictAWSMetadataServerAccess = api.Bool(true)
	}
	defaultString(&t.DataikuAWSAPIAccessMode, api.AWSAPIAccessNone)
	defaultString(&t.DataikuAWSKeypairStorageMode, api.KeypairStorageNone)
	if t.DataikuAWSAPIAccessMode == api.AWSAPIAccessNone {
		// Keys are not used: do not keep a secret nobody needs.
		t.DataikuAWSAccessKeyID, t.DataikuAWSSecretAccessKey = "", ""
	}
}

func validateTemplate(t *api.InstanceSettingsTemplate) error {
	var c checker
	c.label("label", t.Label)
	if t.License != "" {
		var lic map[string]any
		if err := json.Unmarshal([]byte(t.License), &lic); err != nil {
			c.fail("license", "must be a JSON object in a string: %v", err)
		}
	}
	if len(t.SetupActions) > maxSetupActions {
		c.fail("setupActions", "has %d actions; at most %d are allowed", len(t.SetupActions), maxSetupActions)
	}
	for i, a := range t.SetupActions {
		checkSetupAction(&c, fmt.Sprintf("setupActions[%d]", i), a)
	}
	c.match("awsKeyPairName", t.AWSKeyPairName, reKeyPair, "an EC2 key pair name")
	c.match("startupInstanceProfileArn", t.StartupInstanceProfileArn, reProfileARN, "an instance profile ARN (arn:aws:iam::<account>:instance-profile/<name>)")
	c.match("runtimeInstanceProfileArn", t.RuntimeInstanceProfileArn, reProfileARN, "an instance profile ARN (arn:aws:iam::<account>:instance-profile/<name>)")
	c.oneOf("dataikuAwsAPIAccessMode", t.DataikuAWSAPIAccessMode, api.AWSAPIAccessNone, api.AWSAPIAccessKeypair)
	c.oneOf("dataikuAwsKeypairStorageMode", t.DataikuAWSKeypairStorageMode, api.KeypairStorageNone, api.KeypairStorageInline, api.KeypairStorageSecretsManager)
	c.match("dataikuAwsAccessKeyId", t.DataikuAWSAccessKeyID, reAccessKeyID, "an AWS access key id")
	if t.DataikuAWSAPIAccessMode == api.AWSAPIAccessKeypair {
		switch t.DataikuAWSKeypairStorageMode {
		case api.KeypairStorageInline:
			c.required("dataikuAwsAccessKeyId", t.DataikuAWSAccessKeyID)
			c.required("dataikuAwsSecretAccessKey", t.DataikuAWSSecretAccessKey)
		case api.KeypairStorageSecretsManager:
			c.required("dataikuAwsSecretAccessKeyAwsSecretName", t.DataikuAWSSecretAccessKeySecretName)
			c.required("awsSecretsManagerRegion", t.AWSSecretsManagerRegion)
		case api.KeypairStorageNone:
			c.fail("dataikuAwsKeypairStorageMode", "must say where the key pair is kept (%s or %s) when dataikuAwsAPIAccessMode is %s",
				api.KeypairStorageInline, api.KeypairStorageSecretsManager, api.AWSAPIAccessKeypair)
		}
	}
	c.match("awsSecretsManagerRegion", t.AWSSecretsManagerRegion, reRegion, "an AWS region")
	return c.err(kindTemplate)
}

var (
	rePackage = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._+:~@=/-]*$`)
	reSSHKey  = regexp.MustCompile(`^(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com) [A-Za-z0-9+/=]+( [^\r\n]*)?$`)
)

var jdbcDBTypes = []string{"mysql", "mssql", "oracle", "mariadb", "snowflake", "athena", "bigquery"}

// checkSetupAction checks an action's type and, for the types whose
// parameters Dataiku documents, the parameters. Parameters of other types are
// kept as given.
func checkSetupAction(c *checker, field string, a api.SetupAction) {
	t := protocol.SetupActionType(a.Type)
	if !t.Known() {
		c.fail(field+".type", "%q is not a known setup action type", a.Type)
		return
	}
	var p map[string]json.RawMessage
	if err := json.Unmarshal(a.Params, &p); err != nil || p == nil {
		c.fail(field+".params", "must be a JSON object")
		return
	}
	pf := field + ".params."
	if raw, ok := p["stage"]; ok && !isNull(raw) {
		var stage string
		if json.Unmarshal(raw, &stage) != nil || !protocol.Stage(stage).Known() {
			c.fail(pf+"stage", "%s is not one of before_install, after_install, after_dss_startup", raw)
		}
	}
	switch t {
	case protocol.ActionRunAnsibleTasks:
		if _, ok := p["stage"]; !ok {
			c.fail(pf+"stage", "is required (before_install, after_install or after_dss_startup)")
		}
		if s, ok := paramString(c, p, pf, "ansibleTasks"); !ok || strings.TrimSpace(s) == "" {
			c.fail(pf+"ansibleTasks", "is required: YAML tasks in a string")
		}
	case protocol.ActionInstallSystemPackages:
		pkgs, ok := paramStrings(c, p, pf, "packages")
		if !ok || len(pkgs) == 0 {
			c.fail(pf+"packages", "is required: a non-empty array of package names or URLs")
		}
		for _, pkg := range pkgs {
			if !rePackage.MatchString(pkg) {
				c.fail(pf+"packages", "%q is not a package name or URL", pkg)
			}
		}
	case protocol.ActionAddAuthorizedKey:
		if k, ok := paramString(c, p, pf, "sshKey"); !ok || !reSSHKey.MatchString(strings.TrimSpace(k)) {
			c.fail(pf+"sshKey", "is required: one SSH public key line (e.g. ssh-ed25519 AAAA… comment)")
		}
	case protocol.ActionSetupAdvancedSecurity:
		paramBool(c, p, pf, "basic_headers")
		paramBool(c, p, pf, "hsts")
	case protocol.ActionInstallDeprecatedPython:
		paramBool(c, p, pf, "install_py36")
		paramBool(c, p, pf, "install_py37")
		paramBool(c, p, pf, "install_py38")
	case protocol.ActionInstallJDBCDriver:
		checkJDBCParams(c, p, pf)
	}
}

func checkJDBCParams(c *checker, p map[string]json.RawMessage, pf string) {
	u, ok := paramString(c, p, pf, "url")
	if !ok || u == "" {
		c.fail(pf+"url", "is required")
	} else if pu, err := url.Parse(u); err != nil || !oneOfStr(pu.Scheme, "http", "https", "s3", "abs", "file") {
		c.fail(pf+"url", "%q must be an http(s)://, s3://, abs:// or file:// URL", u)
	}
	if db, ok := paramString(c, p, pf, "dbType"); ok && db != "" && !oneOfStr(db, jdbcDBTypes...) {
		c.fail(pf+"dbType", "%q is not one of %s", db, strings.Join(jdbcDBTypes, ", "))
	}
	paramStrings(c, p, pf, "pathsInArchive")
	if raw, ok := p["headers"]; ok && !isNull(raw) {
		var h map[string]string
		if json.Unmarshal(raw, &h) != nil {
			c.fail(pf+"headers", "must be an object of strings or null")
		}
	}
	paramString(c, p, pf, "username")
	paramString(c, p, pf, "password")
	if sub, ok := paramString(c, p, pf, "subpathInDatadir"); ok && sub != "" {
		if path.IsAbs(sub) || strings.HasPrefix(path.Clean(sub), "..") {
			c.fail(pf+"subpathInDatadir", "%q must be a relative path inside the data directory", sub)
		}
	}
}

func isNull(raw json.RawMessage) bool { return bytes.Equal(bytes.TrimSpace(raw), []byte("null")) }

// paramString reads an optional string parameter; null counts as absent.
// ok is false when it is absent; a wrong type is reported.
func paramString(c *checker, p map[string]json.RawMessage, pf, name string) (string, bool) {
	raw, ok := p[name]
	if !ok || isNull(raw) {
		return "", false
	}
	var s string
	if json.Unmarshal(raw, &s) != nil {
		c.fail(pf+name, "must be a string")
		return "", false
	}
	return s, true
}

func paramStrings(c *checker, p map[string]json.RawMessage, pf, name string) ([]string, bool) {
	raw, ok := p[name]
	if !ok || isNull(raw) {
		return nil, false
	}
	var s []string
	if json.Unmarshal(raw, &s) != nil {
		c.fail(pf+name, "must be an array of strings")
		return nil, false
	}
	return s, true
}

func paramBool(c *checker, p map[string]json.RawMessage, pf, name string) {
	raw, ok := p[name]
	if !ok || isNull(raw) {
		return
	}
	var b bool
	if json.Unmarshal(raw, &b) != nil {
		c.fail(pf+name, "must be a boolean")
	}
}
