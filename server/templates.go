package server

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

const kindTemplate = "instance settings template"

// maxSetupActions bounds a template's action list.
const maxSetupActions = 100

func (s *Server) listTemplates(r *http.Request) (any, error) {
	p, err := pageOf(r.URL.Query())
	if err != nil {
		return nil, err
	}
	all := pageRows(p, s.st.templates.all(), func(t *api.InstanceSettingsTemplate) string { return t.ID })
	for i := range all {
		redactTemplate(r, &all[i])
	}
	return all, nil
}

func (s *Server) getTemplate(r *http.Request) (any, error) {
	id := r.PathValue("id")
	t, ok := s.st.templates.view(id)
	if !ok {
		return nil, notFound(kindTemplate, id)
	}
	redactTemplate(r, &t)
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
	redactTemplate(r, &t)
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
	redactTemplate(r, &t)
	return t, nil
}

func (s *Server) deleteTemplate(r *http.Request) (any, error) {
	id := r.PathValue("id")
	t, err := deleteGuarded(r.Context(), s.st.templates, id, func(ctx context.Context) ([]string, error) {
		return s.instancesWhere(ctx, func(in *api.Instance) bool { return in.InstanceSettingsTemplateID == id })
	})
	return s.finishedOp(r, "delete-instance-settings-template", "instanceSettingsTemplate", id, map[string]any{"id": id, "label": t.Label}, err)
}

// redactTemplate removes what the caller may not see: the secret key
// always; the license from viewers; the setup actions' secrets from all
// but admins, who alone edit templates.
func redactTemplate(r *http.Request, t *api.InstanceSettingsTemplate) {
	t.DataikuAWSSecretAccessKey = ""
	if isViewer(r) {
		t.License = redacted(t.License)
	}
	if p := principalFrom(r.Context()); p == nil || !p.may(RoleAdmin) {
		t.SetupActions = slices.Clone(t.SetupActions)
		for i := range t.SetupActions {
			t.SetupActions[i].Params = redactParams(protocol.SetupActionType(t.SetupActions[i].Type), t.SetupActions[i].Params)
		}
	}
}

// secretParams are the parameters of setup actions that hold a secret
// (a string), or a map of them (headers).
var secretParams = map[protocol.SetupActionType][]string{
	protocol.ActionAddSSHKey:            {"privateKey"},
	protocol.ActionInstallJDBCDriver:    {"password", "headers"},
	protocol.ActionSetupRuntimeDatabase: {"password"},
}

// redactParams replaces the secrets of an action's params by "(redacted)".
// Keys are matched as the agent decodes them, whatever their case.
func redactParams(t protocol.SetupActionType, params json.RawMessage) json.RawMessage {
	keys := secretParams[t]
	if len(keys) == 0 {
		return params
	}
	var m map[string]json.RawMessage
	if json.Unmarshal(params, &m) != nil {
		return params
	}
	for k, raw := range m {
		if !slices.ContainsFunc(keys, func(s string) bool { return strings.EqualFold(s, k) }) {
			continue
		}
		var v string
		var values map[string]string
		switch {
		case json.Unmarshal(raw, &v) == nil:
			m[k], _ = json.Marshal(redacted(v))
		case json.Unmarshal(raw, &values) == nil:
			for name, value := range values {
				values[name] = redacted(value)
			}
			m[k], _ = json.Marshal(values)
		}
	}
	b, err := json.Marshal(m)
	if err != nil {
		return params
	}
	return b
}

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
	caNames := map[string]bool{}
	for i, a := range t.SetupActions {
		field := fmt.Sprintf("setupActions[%d]", i)
		checkSetupAction(&c, field, a)
		if a.Type == string(protocol.ActionAddCAToTruststore) {
			var p protocol.AddCAToTruststoreParams
			if json.Unmarshal(a.Params, &p) == nil && p.Name != "" {
				if caNames[p.Name] {
					c.fail(field+".params.name", "another ADD_CA_TO_TRUSTSTORE action of the template is named %q", p.Name)
				}
				caNames[p.Name] = true
			}
		}
	}
	c.match("awsKeyPairName", t.AWSKeyPairName, reKeyPair, "an EC2 key pair name")
	c.match("startupInstanceProfileArn", t.StartupInstanceProfileArn, reProfileARN, "an instance profile ARN (arn:aws:iam::<account>:instance-profile/<name>)")
	c.match("runtimeInstanceProfileArn", t.RuntimeInstanceProfileArn, reProfileARN, "an instance profile ARN (arn:aws:iam::<account>:instance-profile/<name>)")
	c.oneOf("dataikuAwsAPIAccessMode", t.DataikuAWSAPIAccessMode, api.AWSAPIAccessNone, api.AWSAPIAccessKeypair)
	c.oneOf("dataikuAwsKeypairStorageMode", t.DataikuAWSKeypairStorageMode, api.KeypairStorageNone, api.KeypairStorageInline, api.KeypairStorageSecretsManager)
	c.match("dataikuAwsAccessKeyId", t.DataikuAWSAccessKeyID, reAccessKeyID, "an AWS access key id")
	if t.DataikuAWSSecretAccessKey != "" && !protocol.ValidAWSSecret(t.DataikuAWSSecretAccessKey) {
		c.fail("dataikuAwsSecretAccessKey", "is not an AWS secret access key (16 to 128 letters, digits, /, + and =)")
	}
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

// checkSetupAction checks an action's type and parameters (the rules are in
// protocol.ParseParams, shared with the agent that carries actions out).
func checkSetupAction(c *checker, field string, a api.SetupAction) {
	if _, err := protocol.ParseParams(protocol.SetupActionType(a.Type), a.Params); err != nil {
		for _, problem := range strings.Split(err.Error(), "; ") {
			c.problems = append(c.problems, field+"."+problem)
		}
	}
}
