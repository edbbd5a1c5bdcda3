package server

import (
	"encoding/json"
	"errors"
	"maps"
	"net/http"
	"net/url"
	"strings"

	"github.com/fleetmanager/fm/api"
)

// IAM settings (/iam/sso-settings, /iam/ldap-settings,
// /iam/azure-ad-settings; contract §3): each a JSON object kept as it was
// sent, every key included (a client saves the whole object it read), the
// keys FM knows checked. Each has one secret (the OpenID client secret,
// the LDAP bind password, the Azure AD client secret), sealed at rest and
// write-only: never returned, and a save without it keeps it.

// iamSetting is one of the three.
type iamSetting struct {
	setting string   // its key in fm_settings, after the tenant
	secret  []string // the path of its secret in the object
	check   func(c *checker, obj map[string]json.RawMessage)
	// defaults are the keys a setting never saved shows.
	defaults string
}

var iamSettings = map[string]iamSetting{
	"sso-settings": {setting: "iam.sso", secret: []string{"openIDParams", "clientSecret"}, check: checkSSO,
		defaults: `{"enabled": false, "protocol": "OPENID", "remappingRules": [], "openIDParams": {}, "samlSPParams": {}}`},
	"ldap-settings": {setting: "iam.ldap", secret: []string{"bindPassword"}, check: checkLDAP,
		defaults: `{"enabled": false, "remappingRules": []}`},
	"azure-ad-settings": {setting: "iam.azuread", secret: []string{"credentialsClientSecret"}, check: checkAzureAD,
		defaults: `{"enabled": false, "remappingRules": []}`},
}

// maxIAMSetting bounds what a setting keeps.
const maxIAMSetting = 64 << 10

// getIAM serves GET /iam/<name>: the stored object, its secret left out;
// fmSecretSet says whether one is kept.
func (s *Server) getIAM(name string) func(r *http.Request) (any, error) {
	set := iamSettings[name]
	return func(r *http.Request) (any, error) {
		doc, _, ok := s.st.settings.get(settingsKey(api.DefaultTenant, set.setting))
		if !ok || doc.IAM == nil {
			return json.RawMessage(set.defaults), nil
		}
		out := maps.Clone(doc.IAM)
		out[iamSecretSetKey], _ = json.Marshal(doc.IAMSecret != "")
		return out, nil
	}
}

// iamSecretSetKey is FM's key, in an IAM setting as shown, that says
// whether its secret is kept (a save drops it).
const iamSecretSetKey = "fmSecretSet"

// maxIAMSecret bounds a setting's secret.
const maxIAMSecret = 4096

// putIAM serves PUT /iam/<name>: the whole object. Its secret: a string
// sets it, null clears it, absent or "" keeps it.
func (s *Server) putIAM(name string) func(r *http.Request) (any, error) {
	set := iamSettings[name]
	return func(r *http.Request) (any, error) {
		var obj map[string]json.RawMessage
		if err := readJSON(r, &obj); err != nil {
			return nil, err
		}
		if obj == nil {
			return nil, invalid("the body must be a JSON object")
		}
		delete(obj, iamSecretSetKey)
		var c checker
		set.check(&c, obj) // before the secret is taken out: its spelling is checked too
		secret, clear, err := takeSecret(obj, set.secret)
		if err != nil {
			return nil, err
		}
		if len(secret) > maxIAMSecret {
			c.fail(strings.Join(set.secret, "."), "is %d bytes; at most %d are kept", len(secret), maxIAMSecret)
		}
		if size := jsonSize(obj); size > maxIAMSetting {
			c.fail("(object)", "takes %d bytes; at most %d are kept", size, maxIAMSetting)
		}
		if err := c.err("IAM setting"); err != nil {
			return nil, err
		}
		// One read of what is stored, and the write checked against it: a
		// save in between is not undone by the secret kept from before.
		key := settingsKey(api.DefaultTenant, set.setting)
		cur, rev, err := s.st.settings.fetch(r.Context(), key)
		found := err == nil
		if err != nil && !errors.Is(err, errNotFound) {
			return nil, unavailable(err, "the setting could not be read")
		}
		if secret == "" && !clear {
			secret = cur.IAMSecret
		}
		doc := settingsDoc{IAM: obj, IAMSecret: secret}
		if found {
			_, err = s.st.settings.update(r.Context(), key, doc, rev)
		} else {
			_, err = s.st.settings.create(r.Context(), key, doc)
		}
		if errors.Is(err, errConflict) || errors.Is(err, errExists) {
			return nil, conflict("the setting was changed by someone else meanwhile; retry")
		}
		if err != nil {
			return nil, unavailable(err, "the setting could not be stored")
		}
		out := maps.Clone(obj)
		out[iamSecretSetKey], _ = json.Marshal(secret != "")
		return out, nil
	}
}

// takeSecret removes the string at path from obj and returns it, and
// whether it was null (to be cleared).
func takeSecret(obj map[string]json.RawMessage, path []string) (secret string, clear bool, err error) {
	parent := obj
	for _, k := range path[:len(path)-1] {
		raw, ok := parent[k]
		if !ok || string(raw) == "null" {
			return "", false, nil
		}
		var sub map[string]json.RawMessage
		if err := json.Unmarshal(raw, &sub); err != nil || sub == nil {
			return "", false, invalid("%s: must be an object", k)
		}
		defer func(k string, parent, sub map[string]json.RawMessage) {
			parent[k], _ = json.Marshal(sub) // with the secret taken out
		}(k, parent, sub)
		parent = sub
	}
	last := path[len(path)-1]
	raw, ok := parent[last]
	if !ok {
		return "", false, nil
	}
	delete(parent, last)
	var v *string
	if err := json.Unmarshal(raw, &v); err != nil {
		return "", false, invalid("%s: must be a string", strings.Join(path, "."))
	}
	if v == nil {
		return "", true, nil
	}
	return *v, false, nil
}

func jsonSize(v any) int {
	b, _ := json.Marshal(v)
	return len(b)
}

// iamField checks the keys of obj FM knows the type of.
type iamField struct {
	key  string
	kind string // bool, string, int, strings, rules, url, object
}

func checkIAMFields(c *checker, prefix string, obj map[string]json.RawMessage, fields []iamField, secret string) {
	// Another spelling of a known key would be read in its place (Go's
	// decoder matches keys in any case) without being checked, or a
	// secret kept in clear.
	for k := range obj {
		for _, known := range append([]string{secret}, fieldKeys(fields)...) {
			if known != "" && k != known && strings.EqualFold(k, known) {
				c.fail(prefix+k, "is spelt %q", known)
			}
		}
	}
	for _, f := range fields {
		raw, ok := obj[f.key]
		if !ok || string(raw) == "null" {
			continue
		}
		name := prefix + f.key
		switch f.kind {
		case "bool":
			var v bool
			if json.Unmarshal(raw, &v) != nil {
				c.fail(name, "must be true or false")
			}
		case "string":
			var v string
			if json.Unmarshal(raw, &v) != nil {
				c.fail(name, "must be a string")
			}
		case "url":
			var v string
			if json.Unmarshal(raw, &v) != nil {
				c.fail(name, "must be a string")
			} else if u, err := url.Parse(v); v != "" && (err != nil || u.Scheme != "https" && u.Scheme != "http" || u.Host == "") {
				c.fail(name, "%q is not an http(s) URL", v)
			}
		case "int":
			var v int
			if json.Unmarshal(raw, &v) != nil || v < 0 {
				c.fail(name, "must be a whole number, 0 or more")
			}
		case "strings":
			var v []string
			var one string
			if json.Unmarshal(raw, &v) != nil && json.Unmarshal(raw, &one) != nil {
				c.fail(name, "must be a list of strings (or one, comma-separated)")
			}
		case "object":
			var v map[string]json.RawMessage
			if json.Unmarshal(raw, &v) != nil {
				c.fail(name, "must be an object")
			}
		case "rules":
			var v []struct {
				RuleFrom *string `json:"ruleFrom"`
				RuleTo   *string `json:"ruleTo"`
			}
			if json.Unmarshal(raw, &v) != nil {
				c.fail(name, "must be a list of {ruleFrom, ruleTo}")
				continue
			}
			for i, r := range v {
				if r.RuleFrom == nil || r.RuleTo == nil {
					c.fail(name, "rule %d needs ruleFrom and ruleTo", i)
				} else if _, err := compileRemap(*r.RuleFrom); err != nil {
					c.fail(name, "rule %d: ruleFrom %q is not a regular expression FM reads: %v", i, *r.RuleFrom, err)
				}
			}
		}
	}
}

func fieldKeys(fields []iamField) []string {
	keys := make([]string, len(fields))
	for i, f := range fields {
		keys[i] = f.key
	}
	return keys
}

// iamString is the string at key ("" if absent or not a string).
func iamString(obj map[string]json.RawMessage, key string) string {
	var v string
	_ = json.Unmarshal(obj[key], &v)
	return v
}

func iamEnabled(obj map[string]json.RawMessage) bool {
	var v bool
	_ = json.Unmarshal(obj["enabled"], &v)
	return v
}

// iamCommon are the keys every IAM setting shares.
var iamCommon = []iamField{{"enabled", "bool"}, {"remappingRules", "rules"}, {"autoProvisionUsersAtLoginTime", "bool"},
	{"autoSyncUsersAtLoginTime", "bool"}, {"defaultUserProfile", "string"}, {"authorizedGroups", "strings"}}

func checkSSO(c *checker, obj map[string]json.RawMessage) {
	checkIAMFields(c, "", obj, append(iamCommon, iamField{"protocol", "string"}, iamField{"spnegoMode", "string"},
		iamField{"openIDParams", "object"}, iamField{"samlSPParams", "object"},
		iamField{"fmRoleClaim", "string"}, iamField{"fmRoleMappings", "object"}, iamField{"fmDefaultRole", "string"}), "")
	if p := iamString(obj, "protocol"); p != "" {
		c.oneOf("protocol", p, "SAML", "SPNEGO", "OPENID")
	}
	if m := iamString(obj, "spnegoMode"); m != "" {
		c.oneOf("spnegoMode", m, "PREAUTH_KEYTAB", "CUSTOM_LOGIN_CONF")
	}
	var oidc map[string]json.RawMessage
	if json.Unmarshal(obj["openIDParams"], &oidc) == nil && oidc != nil {
		checkIAMFields(c, "openIDParams.", oidc, []iamField{{"clientId", "string"}, {"scope", "string"}, {"issuer", "url"},
			{"authorizationEndpoint", "url"}, {"tokenEndpoint", "url"}, {"jwksUri", "url"}, {"claimKeyIdentifier", "string"},
			{"claimKeyDisplayName", "string"}, {"claimKeyEmail", "string"}, {"lowercaseIdentifier", "bool"}, {"enableGroups", "bool"},
			{"claimKeyGroups", "string"}, {"useGlobalProxy", "bool"}, {"usePKCE", "bool"}, {"tokenEndpointAuthMethod", "string"}}, "clientSecret")
		if m := iamString(oidc, "tokenEndpointAuthMethod"); m != "" {
			c.oneOf("openIDParams.tokenEndpointAuthMethod", m, "CLIENT_SECRET_BASIC", "CLIENT_SECRET_POST")
		}
	}
	if iamEnabled(obj) && iamString(obj, "protocol") == "OPENID" {
		c.required("openIDParams.clientId", iamString(oidc, "clientId"))
		c.required("openIDParams.issuer", iamString(oidc, "issuer"))
	}
	var roles map[string]string
	if raw, ok := obj["fmRoleMappings"]; ok && string(raw) != "null" {
		if json.Unmarshal(raw, &roles) != nil {
			c.fail("fmRoleMappings", "must map claim values to roles (viewer, operator, admin)")
		}
	}
	for v, role := range roles {
		if _, ok := roleRank[role]; !ok {
			c.fail("fmRoleMappings", "%q maps to %q, which is not a role (viewer, operator, admin)", v, role)
		}
	}
	if r := iamString(obj, "fmDefaultRole"); r != "" {
		if _, ok := roleRank[r]; !ok {
			c.fail("fmDefaultRole", "%q is not a role (viewer, operator, admin)", r)
		}
	}
}

func checkLDAP(c *checker, obj map[string]json.RawMessage) {
	checkIAMFields(c, "", obj, append(iamCommon, iamField{"url", "string"}, iamField{"useTls", "bool"}, iamField{"bindDN", "string"},
		iamField{"userFilter", "string"}, iamField{"usernameAttribute", "string"}, iamField{"displayNameAttribute", "string"},
		iamField{"emailAttribute", "string"}, iamField{"enableGroups", "bool"}, iamField{"groupFilter", "string"},
		iamField{"autoImportUsers", "bool"}, iamField{"allowOnDemandUsersProvisioning", "bool"}, iamField{"allowOnDemandUsersSync", "bool"},
		iamField{"authenticationEnabled", "bool"}), "bindPassword")
	if u := iamString(obj, "url"); u != "" {
		if p, err := url.Parse(u); err != nil || p.Scheme != "ldap" && p.Scheme != "ldaps" || p.Host == "" {
			c.fail("url", "%q is not an ldap:// or ldaps:// URL", u)
		}
	} else if iamEnabled(obj) {
		c.required("url", "")
	}
}

func checkAzureAD(c *checker, obj map[string]json.RawMessage) {
	checkIAMFields(c, "", obj, append(iamCommon, iamField{"credentialMethod", "string"}, iamField{"credentialsClientId", "string"},
		iamField{"credentialsTenantId", "string"}, iamField{"userQueryFilter", "string"}, iamField{"groupQueryFilter", "string"},
		iamField{"groupsLimit", "int"}, iamField{"loginAttributeRef", "string"}, iamField{"useGlobalProxy", "bool"},
		iamField{"allowOnDemandUsersProvisioning", "bool"}, iamField{"allowOnDemandUsersSync", "bool"}), "credentialsClientSecret")
}
