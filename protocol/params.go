package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"path"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"
)

// The parameters of the setup actions that FM validates and carries out.
// Dataiku documents the parameters of RUN_ANSIBLE_TASKS,
// INSTALL_SYSTEM_PACKAGES, ADD_AUTHORIZED_KEY, SETUP_ADVANCED_SECURITY,
// INSTALL_JDBC_DRIVER and INSTALL_DEPRECATED_PYTHON (their names are exact,
// snake_case included), and says SETUP_K8S_AND_SPARK takes none; for the
// other types it does not, and the shapes here are FM's
// (docs/setup-actions.md, with the DSS command or API call each drives).
// Unknown parameter keys are ignored.

// RunAnsibleTasksParams are the params of RUN_ANSIBLE_TASKS.
type RunAnsibleTasksParams struct {
	Stage        Stage  `json:"stage"`
	AnsibleTasks string `json:"ansibleTasks"`
}

// InstallSystemPackagesParams are the params of INSTALL_SYSTEM_PACKAGES.
type InstallSystemPackagesParams struct {
	Packages []string `json:"packages"`
}

// AddAuthorizedKeyParams are the params of ADD_AUTHORIZED_KEY.
type AddAuthorizedKeyParams struct {
	SSHKey string `json:"sshKey"`
}

// SetupAdvancedSecurityParams are the params of SETUP_ADVANCED_SECURITY.
// Absent values take Dataiku's defaults: basic headers on, HSTS off.
type SetupAdvancedSecurityParams struct {
	BasicHeaders *bool `json:"basic_headers"`
	HSTS         *bool `json:"hsts"`
}

// InstallJDBCDriverParams are the params of INSTALL_JDBC_DRIVER. Every key is
// sent by Dataiku's client and may be null.
type InstallJDBCDriverParams struct {
	URL              string            `json:"url"`
	DBType           *string           `json:"dbType"`
	PathsInArchive   []string          `json:"pathsInArchive"`
	Headers          map[string]string `json:"headers"`
	Username         *string           `json:"username"`
	Password         *string           `json:"password"`
	SubpathInDatadir *string           `json:"subpathInDatadir"`
}

// InstallDeprecatedPythonParams are the params of INSTALL_DEPRECATED_PYTHON.
type InstallDeprecatedPythonParams struct {
	InstallPy36 bool `json:"install_py36"`
	InstallPy37 bool `json:"install_py37"`
	InstallPy38 bool `json:"install_py38"`
}

// KeyValue is one entry of a list of variables or properties.
type KeyValue struct {
	Key   string `json:"key"`
	Value string `json:"value"`
}

// AddEnvVariablesParams are the params of ADD_ENV_VARIABLES: variables
// exported from DSS's bin/env-site.sh.
type AddEnvVariablesParams struct {
	Variables []KeyValue `json:"variables"`
}

// AddPropertiesParams are the params of ADD_PROPERTIES: properties of DSS's
// config/dip.properties.
type AddPropertiesParams struct {
	Properties []KeyValue `json:"properties"`
}

// AddSSHKeyParams are the params of ADD_SSH_KEY: a private key installed in
// the DSS user's ~/.ssh, for outbound connections (Git).
type AddSSHKeyParams struct {
	// PrivateKey is the key, in PEM or OpenSSH format.
	PrivateKey string `json:"privateKey"`
	// KeyName is the file name in ~/.ssh (default id_rsa, id_ecdsa or
	// id_ed25519 after the key's type).
	KeyName string `json:"keyName"`
}

// SetupProxyParams are the params of SETUP_PROXY: the HTTP proxy of DSS, set
// in lower- and upper-case variables.
type SetupProxyParams struct {
	HTTPProxy string `json:"httpProxy"`
	// HTTPSProxy defaults to HTTPProxy.
	HTTPSProxy string `json:"httpsProxy"`
	// NoProxy defaults to DefaultNoProxy.
	NoProxy string `json:"noProxy"`
}

// DefaultNoProxy is Dataiku's default NO_PROXY.
const DefaultNoProxy = "localhost,127.0.0.1,169.254.169.254"

// AddCAToTruststoreParams are the params of ADD_CA_TO_TRUSTSTORE.
type AddCAToTruststoreParams struct {
	// Name identifies the CA; it must be unique among the template's CAs.
	Name string `json:"name"`
	// Certificate is the CA certificate or chain, in PEM.
	Certificate string `json:"certificate"`
}

// SetupMemorySettingsParams are the params of SETUP_MEMORY_SETTINGS (FM's
// own: Dataiku does not document them): the maximum Java heaps of DSS's
// backend, of its job execution kernels (JEK) and of its notebook and
// webapp kernels (FEK), as install.ini's [javaopts] backend.xmx, jek.xmx
// and fek.xmx take them ("8g", "512m"). One left out is left as it is.
type SetupMemorySettingsParams struct {
	BackendXmx string `json:"backendXmx,omitempty"`
	JEKXmx     string `json:"jekXmx,omitempty"`
	FEKXmx     string `json:"fekXmx,omitempty"`
}

// Heaps are the install.ini [javaopts] keys the params set, with their
// values, in a fixed order.
func (p *SetupMemorySettingsParams) Heaps() [][2]string {
	var out [][2]string
	for _, kv := range [][2]string{{"backend.xmx", p.BackendXmx}, {"jek.xmx", p.JEKXmx}, {"fek.xmx", p.FEKXmx}} {
		if kv[1] != "" {
			out = append(out, kv)
		}
	}
	return out
}

// SetupInstanceNameParams are the params of SETUP_INSTANCE_NAME: the name
// DSS shows for itself (general settings nodeName).
type SetupInstanceNameParams struct {
	InstanceName string `json:"instanceName"`
}

// SetupSecureCookiesParams are the params of SETUP_SECURE_COOKIES: whether
// DSS marks its cookies Secure (general settings secureCookies); absent,
// true.
type SetupSecureCookiesParams struct {
	SecureCookies *bool `json:"secureCookies"`
}

// SetupUICustomizationParams are the params of SETUP_UI_CUSTOMIZATION: the
// general settings' uiCustomization keys the action names (null or absent:
// left as they are; "": cleared).
type SetupUICustomizationParams struct {
	HeaderColor  *string `json:"headerColor"`
	HomeMessage  *string `json:"homeMessage"`
	LoginMessage *string `json:"loginMessage"`
}

// Fields are the uiCustomization keys the params name, with their values.
func (p *SetupUICustomizationParams) Fields() map[string]string {
	out := map[string]string{}
	for k, v := range map[string]*string{"headerColor": p.HeaderColor, "homeMessage": p.HomeMessage, "loginMessage": p.LoginMessage} {
		if v != nil {
			out[k] = *v
		}
	}
	return out
}

// SetupRuntimeDatabaseParams are the params of SETUP_RUNTIME_DATABASE: a
// PostgreSQL database DSS keeps its runtime data in, as a DSS connection
// (default name fm-runtime-database) its general settings'
// internalDatabase names.
type SetupRuntimeDatabaseParams struct {
	ConnectionName string `json:"connectionName,omitempty"`
	Host           string `json:"host"`
	Port           int    `json:"port,omitempty"`
	Database       string `json:"database"`
	User           string `json:"user"`
	Password       string `json:"password,omitempty"`
}

// DefaultRuntimeConnection is the connection SETUP_RUNTIME_DATABASE makes
// when it names none.
const DefaultRuntimeConnection = "fm-runtime-database"

// SetupMUSAutocreateParams are the params of SETUP_MUS_AUTOCREATE:
// multi-user security, with a unix user made for each DSS user, named
// unixUserPrefix and the login, in unixGroup.
type SetupMUSAutocreateParams struct {
	UnixUserPrefix string `json:"unixUserPrefix,omitempty"`
	UnixGroup      string `json:"unixGroup,omitempty"`
}

// Defaults of SETUP_MUS_AUTOCREATE.
const (
	DefaultMUSUserPrefix = "dssuser_"
	DefaultMUSGroup      = "dssusers"
)

// InstallDSSPluginsFromStoreParams are the params of
// INSTALL_DSS_PLUGINS_FROM_STORE: plugin ids of Dataiku's plugin store.
type InstallDSSPluginsFromStoreParams struct {
	Plugins []string `json:"plugins"`
}

// InstallCodeEnvWithPresetParams are the params of
// INSTALL_CODE_ENV_WITH_PRESET: one of DSS's internal code environments
// for visual ML or time series, made from its preset.
type InstallCodeEnvWithPresetParams struct {
	// Preset is VISUAL_ML or TIMESERIES_FORECASTING.
	Preset string `json:"preset"`
	// GPU takes the preset's GPU variant.
	GPU bool `json:"gpu"`
	// AllowInPlaceUpdate updates an environment that exists (absent: true).
	AllowInPlaceUpdate *bool `json:"allowInPlaceUpdate"`
	// Interpreter is PYTHON39 to PYTHON312 (empty: DSS's choice).
	Interpreter string `json:"interpreter,omitempty"`
}

// PresetName is the DSS preset the params name (VISUAL_ML_CPU, …).
func (p *InstallCodeEnvWithPresetParams) PresetName() string {
	if p.GPU {
		return p.Preset + "_GPU"
	}
	return p.Preset + "_CPU"
}

// CodeEnvPresets are the values of INSTALL_CODE_ENV_WITH_PRESET's preset.
var CodeEnvPresets = []string{"VISUAL_ML", "TIMESERIES_FORECASTING"}

// SetupGraphicsExportParams are the (no) params of SETUP_GRAPHICS_EXPORT.
type SetupGraphicsExportParams struct{}

// SetupK8sAndSparkParams are the params of SETUP_K8S_AND_SPARK, which
// Dataiku's client sends empty. UseHostIP (FM's) has pods reach DSS at the
// machine's IP address instead of its host name, for clusters that cannot
// resolve it.
type SetupK8sAndSparkParams struct {
	UseHostIP bool `json:"useHostIP,omitempty"`
}

// SetupNoneK8sAndSparkParams are the (no) params of
// SETUP_NONE_K8S_AND_SPARK.
type SetupNoneK8sAndSparkParams struct{}

// UpdateDSSPortParams are the params of UPDATE_DSS_PORT.
type UpdateDSSPortParams struct {
	Port int `json:"port"`
}

var (
	rePackageName    = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._+:~@=/-]*$`)
	reSSHPublic      = regexp.MustCompile(`^(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com) [A-Za-z0-9+/=]+( [^\r\n]*)?$`)
	reEnvName        = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	rePropKey        = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]*$`)
	reFileName       = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$`)
	reProxyURL       = regexp.MustCompile(`^https?://[^\s'"\\]+$`)
	reColor          = regexp.MustCompile(`^#[0-9A-Fa-f]{6}$`)
	reConnectionName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)
	reHost           = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9.:-]{0,252}[A-Za-z0-9])?$`)
	reUnixPrefix     = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,15}$`)
	reUnixGroup      = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,31}$`)
	rePluginID       = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,63}$`)
)

// JDBCDatabaseTypes are the values of INSTALL_JDBC_DRIVER's dbType.
var JDBCDatabaseTypes = []string{"mysql", "mssql", "oracle", "mariadb", "snowflake", "athena", "bigquery"}

// ParseParams decodes and checks the params of a setup action of type t. It
// returns the typed params (a pointer to one of the structs above), or nil
// for a type whose params FM does not interpret. The error names every
// problem, each prefixed with the parameter's name.
func ParseParams(t SetupActionType, raw json.RawMessage) (any, error) {
	if !t.Known() {
		return nil, fmt.Errorf("type: %q is not a known setup action type", t)
	}
	if p := bytes.TrimSpace(raw); len(p) == 0 || bytes.Equal(p, []byte("null")) {
		raw = json.RawMessage("{}")
	}
	var generic map[string]json.RawMessage
	if err := json.Unmarshal(raw, &generic); err != nil || generic == nil {
		return nil, errors.New("params: must be a JSON object")
	}
	var problems []string
	fail := func(name, format string, args ...any) {
		problems = append(problems, "params."+name+": "+fmt.Sprintf(format, args...))
	}
	if s, ok := generic["stage"]; ok && !bytes.Equal(bytes.TrimSpace(s), []byte("null")) {
		var st Stage
		if json.Unmarshal(s, &st) != nil || !st.Known() {
			fail("stage", "%s is not one of before_install, after_install, after_dss_startup", s)
		} else if allowed := StagesFor(t); !slices.Contains(allowed, st) {
			fail("stage", "must be %s for %s (%s)", strings.Join(stageNames(allowed), " or "), t, stageReason(t))
		}
	}
	var out any
	switch t {
	case ActionRunAnsibleTasks:
		out = &RunAnsibleTasksParams{}
	case ActionInstallSystemPackages:
		out = &InstallSystemPackagesParams{}
	case ActionAddAuthorizedKey:
		out = &AddAuthorizedKeyParams{}
	case ActionSetupAdvancedSecurity:
		out = &SetupAdvancedSecurityParams{}
	case ActionInstallJDBCDriver:
		out = &InstallJDBCDriverParams{}
	case ActionInstallDeprecatedPython:
		out = &InstallDeprecatedPythonParams{}
	case ActionAddEnvVariables:
		out = &AddEnvVariablesParams{}
	case ActionAddProperties:
		out = &AddPropertiesParams{}
	case ActionAddSSHKey:
		out = &AddSSHKeyParams{}
	case ActionSetupProxy:
		out = &SetupProxyParams{}
	case ActionAddCAToTruststore:
		out = &AddCAToTruststoreParams{}
	case ActionUpdateDSSPort:
		out = &UpdateDSSPortParams{}
	case ActionSetupMemorySettings:
		out = &SetupMemorySettingsParams{}
	case ActionSetupInstanceName:
		out = &SetupInstanceNameParams{}
	case ActionSetupSecureCookies:
		out = &SetupSecureCookiesParams{}
	case ActionSetupUICustomization:
		out = &SetupUICustomizationParams{}
	case ActionSetupRuntimeDatabase:
		out = &SetupRuntimeDatabaseParams{}
	case ActionSetupMUSAutocreate:
		out = &SetupMUSAutocreateParams{}
	case ActionInstallDSSPluginsFromStore:
		out = &InstallDSSPluginsFromStoreParams{}
	case ActionInstallCodeEnvWithPreset:
		out = &InstallCodeEnvWithPresetParams{}
	case ActionSetupGraphicsExport:
		out = &SetupGraphicsExportParams{}
	case ActionSetupK8sAndSpark:
		out = &SetupK8sAndSparkParams{}
	case ActionSetupNoneK8sAndSpark:
		out = &SetupNoneK8sAndSparkParams{}
	default:
		if len(problems) > 0 {
			return nil, errors.New(strings.Join(problems, "; "))
		}
		return nil, nil
	}
	if err := json.Unmarshal(raw, out); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) && te.Field != "" {
			fail(te.Field, "must be %s, not %s", jsonTypeName(te.Type), te.Value)
		} else {
			fail("", "%v", err)
		}
		return nil, errors.New(strings.Join(problems, "; "))
	}
	checkParams(out, generic, fail)
	if len(problems) > 0 {
		return nil, errors.New(strings.Join(problems, "; "))
	}
	return out, nil
}

func checkParams(p any, generic map[string]json.RawMessage, fail func(name, format string, args ...any)) {
	switch p := p.(type) {
	case *RunAnsibleTasksParams:
		if _, ok := generic["stage"]; !ok || p.Stage == "" {
			fail("stage", "is required (before_install, after_install or after_dss_startup)")
		}
		if strings.TrimSpace(p.AnsibleTasks) == "" {
			fail("ansibleTasks", "is required: YAML tasks in a string")
		}
	case *InstallSystemPackagesParams:
		if len(p.Packages) == 0 {
			fail("packages", "is required: a non-empty array of package names or URLs")
		}
		for _, pkg := range p.Packages {
			if !rePackageName.MatchString(pkg) {
				fail("packages", "%q is not a package name or URL", pkg)
			}
		}
	case *AddAuthorizedKeyParams:
		if !reSSHPublic.MatchString(strings.TrimSpace(p.SSHKey)) {
			fail("sshKey", "is required: one SSH public key line (e.g. ssh-ed25519 AAAA… comment)")
		}
	case *InstallJDBCDriverParams:
		if p.URL == "" {
			fail("url", "is required")
		} else if u, err := url.Parse(p.URL); err != nil || !oneOf(u.Scheme, "http", "https", "s3", "abs", "file") {
			fail("url", "%q must be an http(s)://, s3://, abs:// or file:// URL", p.URL)
		}
		if p.DBType != nil && *p.DBType != "" && !oneOf(*p.DBType, JDBCDatabaseTypes...) {
			fail("dbType", "%q is not one of %s", *p.DBType, strings.Join(JDBCDatabaseTypes, ", "))
		}
		for _, pa := range p.PathsInArchive {
			if pa == "" || path.IsAbs(pa) || strings.HasPrefix(path.Clean(pa), "..") {
				fail("pathsInArchive", "%q must be a relative path inside the archive", pa)
			}
		}
		if p.SubpathInDatadir != nil && *p.SubpathInDatadir != "" {
			sub := *p.SubpathInDatadir
			if path.IsAbs(sub) || strings.HasPrefix(path.Clean(sub), "..") {
				fail("subpathInDatadir", "%q must be a relative path inside the data directory", sub)
			}
		}
	case *AddEnvVariablesParams:
		if len(p.Variables) == 0 {
			fail("variables", "is required: an array of {key, value}")
		}
		for _, kv := range p.Variables {
			if !reEnvName.MatchString(kv.Key) {
				fail("variables", "%q is not a variable name", kv.Key)
			}
			if strings.ContainsAny(kv.Value, "\n\r\x00") {
				fail("variables", "the value of %s must be one line", kv.Key)
			}
		}
	case *AddPropertiesParams:
		if len(p.Properties) == 0 {
			fail("properties", "is required: an array of {key, value}")
		}
		for _, kv := range p.Properties {
			if !rePropKey.MatchString(kv.Key) {
				fail("properties", "%q is not a property name", kv.Key)
			}
			if strings.ContainsAny(kv.Value, "\n\r\x00") {
				fail("properties", "the value of %s must be one line", kv.Key)
			}
		}
	case *AddSSHKeyParams:
		k := strings.TrimSpace(p.PrivateKey)
		if !strings.HasPrefix(k, "-----BEGIN ") || !strings.Contains(k, "PRIVATE KEY-----") {
			fail("privateKey", "is required: a private key in PEM or OpenSSH format")
		}
		if p.KeyName != "" && (!reFileName.MatchString(p.KeyName) || strings.HasSuffix(p.KeyName, ".pub") || p.KeyName == "authorized_keys" || p.KeyName == "known_hosts" || p.KeyName == "config") {
			fail("keyName", "%q is not a usable key file name", p.KeyName)
		}
	case *SetupProxyParams:
		if !reProxyURL.MatchString(p.HTTPProxy) {
			fail("httpProxy", "is required: a proxy URL such as http://proxy.example.com:3128")
		}
		if p.HTTPSProxy != "" && !reProxyURL.MatchString(p.HTTPSProxy) {
			fail("httpsProxy", "%q is not a proxy URL", p.HTTPSProxy)
		}
		if strings.ContainsAny(p.NoProxy, " \t\n'\"\\") {
			fail("noProxy", "must be a comma-separated list without spaces or quotes")
		}
	case *AddCAToTruststoreParams:
		if !reFileName.MatchString(p.Name) {
			fail("name", "is required: letters, digits, '.', '_' and '-'")
		}
		if !strings.Contains(p.Certificate, "-----BEGIN CERTIFICATE-----") {
			fail("certificate", "is required: a PEM certificate")
		}
	case *SetupMemorySettingsParams:
		if len(p.Heaps()) == 0 {
			fail("backendXmx", "at least one of backendXmx, jekXmx and fekXmx is required")
		}
		for _, f := range []struct{ name, v string }{{"backendXmx", p.BackendXmx}, {"jekXmx", p.JEKXmx}, {"fekXmx", p.FEKXmx}} {
			if f.v != "" && !validHeap(f.v) {
				fail(f.name, "%q is not a Java heap size from 256m to 1024g (such as 8g or 512m)", f.v)
			}
		}
	case *SetupInstanceNameParams:
		if n := strings.TrimSpace(p.InstanceName); n == "" || utf8.RuneCountInString(p.InstanceName) > 100 || strings.ContainsAny(p.InstanceName, "\n\r\x00") {
			fail("instanceName", "is required: one line of at most 100 characters")
		}
	case *SetupUICustomizationParams:
		if len(p.Fields()) == 0 {
			fail("headerColor", "at least one of headerColor, homeMessage and loginMessage is required")
		}
		if p.HeaderColor != nil && *p.HeaderColor != "" && !reColor.MatchString(*p.HeaderColor) {
			fail("headerColor", "%q is not a color such as #1a2b3c", *p.HeaderColor)
		}
		for name, v := range map[string]*string{"homeMessage": p.HomeMessage, "loginMessage": p.LoginMessage} {
			if v != nil && (utf8.RuneCountInString(*v) > 2000 || strings.ContainsRune(*v, 0)) {
				fail(name, "must be at most 2000 characters")
			}
		}
	case *SetupRuntimeDatabaseParams:
		if p.ConnectionName != "" && !reConnectionName.MatchString(p.ConnectionName) {
			fail("connectionName", "%q is not a connection name (letters, digits, '_' and '-')", p.ConnectionName)
		}
		if !reHost.MatchString(p.Host) {
			fail("host", "is required: the database's host name or address")
		}
		if p.Port != 0 && (p.Port < 1 || p.Port > 65535) {
			fail("port", "%d is not a port", p.Port)
		}
		if strings.TrimSpace(p.Database) == "" || strings.ContainsAny(p.Database, "\n\r\x00") {
			fail("database", "is required: the database's name")
		}
		if strings.TrimSpace(p.User) == "" || strings.ContainsAny(p.User, "\n\r\x00") {
			fail("user", "is required: the database user")
		}
	case *SetupMUSAutocreateParams:
		if p.UnixUserPrefix != "" && !reUnixPrefix.MatchString(p.UnixUserPrefix) {
			fail("unixUserPrefix", "%q is not the start of a unix user name (a-z, 0-9, '_', '-'; at most 16)", p.UnixUserPrefix)
		}
		if p.UnixGroup != "" && !reUnixGroup.MatchString(p.UnixGroup) {
			fail("unixGroup", "%q is not a unix group name", p.UnixGroup)
		}
	case *InstallDSSPluginsFromStoreParams:
		if len(p.Plugins) == 0 {
			fail("plugins", "is required: an array of plugin ids of Dataiku's plugin store")
		}
		seen := map[string]bool{}
		for _, id := range p.Plugins {
			if !rePluginID.MatchString(id) {
				fail("plugins", "%q is not a plugin id", id)
			} else if seen[id] {
				fail("plugins", "%q is listed twice", id)
			}
			seen[id] = true
		}
	case *InstallCodeEnvWithPresetParams:
		if !oneOf(p.Preset, CodeEnvPresets...) {
			fail("preset", "%q is not one of %s", p.Preset, strings.Join(CodeEnvPresets, ", "))
		}
		if p.Interpreter != "" && !oneOf(p.Interpreter, "PYTHON39", "PYTHON310", "PYTHON311", "PYTHON312") {
			fail("interpreter", "%q is not one of PYTHON39, PYTHON310, PYTHON311, PYTHON312", p.Interpreter)
		}
	case *UpdateDSSPortParams:
		if p.Port < 1024 || p.Port > 65525 {
			fail("port", "%d is out of range [1024, 65525] (DSS uses the ten ports from the base port)", p.Port)
		}
	}
}

var reHeap = regexp.MustCompile(`^([1-9][0-9]{0,6})([mMgG])$`)

// validHeap says whether v is a heap size install.ini takes, from 256m to
// 1024g.
func validHeap(v string) bool {
	m := reHeap.FindStringSubmatch(v)
	if m == nil {
		return false
	}
	n, _ := strconv.ParseInt(m[1], 10, 64)
	mb := n
	if m[2] == "g" || m[2] == "G" {
		mb = n * 1024
	}
	return mb >= 256 && mb <= 1024*1024
}

func stageNames(stages []Stage) []string {
	out := make([]string, len(stages))
	for i, s := range stages {
		out[i] = string(s)
	}
	return out
}

// stageReason says why a type runs at the one stage it may.
func stageReason(t SetupActionType) string {
	switch t {
	case ActionSetupMemorySettings:
		return "DSS takes its heaps when it starts"
	case ActionSetupGraphicsExport, ActionSetupNoneK8sAndSpark:
		return "it runs DSS's dssadmin, which needs DSS installed"
	}
	return "it goes through DSS's admin API, which needs DSS running"
}

// jsonTypeName says in words what JSON a Go type decodes from.
func jsonTypeName(t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Bool:
		return "a boolean"
	case reflect.String:
		return "a string"
	case reflect.Int, reflect.Int64, reflect.Int32, reflect.Uint, reflect.Uint64, reflect.Float64:
		return "a number"
	case reflect.Slice:
		return "an array of " + strings.TrimPrefix(strings.TrimPrefix(jsonTypeName(t.Elem()), "a "), "an ") + "s"
	case reflect.Map:
		return "an object"
	}
	return "an object"
}

func oneOf(v string, allowed ...string) bool {
	for _, a := range allowed {
		if v == a {
			return true
		}
	}
	return false
}
