package protocol

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestParseParams(t *testing.T) {
	const cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
	tests := []struct {
		typ     SetupActionType
		params  string
		wantErr string // "" for valid
	}{
		{ActionSetupK8sAndSpark, `{}`, ""},
		{ActionSetupK8sAndSpark, `null`, ""},
		{ActionSetupK8sAndSpark, `{"anything":[1,2]}`, ""},
		{ActionSetupK8sAndSpark, `{"stage":"after_install"}`, "must be after_dss_startup"},
		{ActionSetupUICustomization, `{"stage":"later"}`, "params.stage"},
		{ActionSetupUICustomization, `{"headerColor":"#1a2B3c","homeMessage":"Prod: careful"}`, ""},
		{ActionSetupUICustomization, `{"homeMessage":""}`, ""},
		{ActionSetupUICustomization, `{"anything":[1,2]}`, "at least one of"},
		{ActionSetupUICustomization, `{"headerColor":"red"}`, "params.headerColor"},
		{ActionSetupUICustomization, `{"loginMessage":"` + strings.Repeat("x", 2001) + `"}`, "params.loginMessage"},
		{ActionSetupInstanceName, `{"instanceName":"Design (prod)"}`, ""},
		{ActionSetupInstanceName, `{"instanceName":"a\nb"}`, "params.instanceName"},
		{ActionSetupInstanceName, `{}`, "params.instanceName"},
		{ActionSetupInstanceName, `{"instanceName":"x","stage":"after_dss_startup"}`, ""},
		{ActionSetupSecureCookies, `{}`, ""},
		{ActionSetupSecureCookies, `{"secureCookies":false}`, ""},
		{ActionSetupSecureCookies, `{"secureCookies":"yes"}`, "must be a boolean"},
		{ActionSetupRuntimeDatabase, `{"host":"db.internal","database":"dss_runtime","user":"dss","password":"pw"}`, ""},
		{ActionSetupRuntimeDatabase, `{"host":"10.0.0.5","port":6432,"database":"r","user":"u","connectionName":"runtime_db"}`, ""},
		{ActionSetupRuntimeDatabase, `{"host":"db; rm -rf /","database":"r","user":"u"}`, "params.host"},
		{ActionSetupRuntimeDatabase, `{"host":"db","port":70000,"database":"r","user":"u"}`, "params.port"},
		{ActionSetupRuntimeDatabase, `{"host":"db","user":"u"}`, "params.database"},
		{ActionSetupRuntimeDatabase, `{"host":"db","database":"r","user":"u","connectionName":"a b"}`, "params.connectionName"},
		{ActionSetupRuntimeDatabase, `{"host":"db","database":"r","user":"u","stage":"after_install"}`, "must be after_dss_startup"},
		{ActionSetupMUSAutocreate, `{}`, ""},
		{ActionSetupMUSAutocreate, `{"unixUserPrefix":"u_","unixGroup":"dss-users"}`, ""},
		{ActionSetupMUSAutocreate, `{"unixUserPrefix":"Root"}`, "params.unixUserPrefix"},
		{ActionSetupMUSAutocreate, `{"unixGroup":"a b"}`, "params.unixGroup"},
		{ActionInstallDSSPluginsFromStore, `{"plugins":["eks-clusters","googlesheets"]}`, ""},
		{ActionInstallDSSPluginsFromStore, `{"plugins":[]}`, "params.plugins: is required"},
		{ActionInstallDSSPluginsFromStore, `{"plugins":["../x"]}`, "not a plugin id"},
		{ActionInstallDSSPluginsFromStore, `{"plugins":["a","a"]}`, "listed twice"},
		{ActionInstallCodeEnvWithPreset, `{"preset":"VISUAL_ML","gpu":true,"allowInPlaceUpdate":false,"interpreter":"PYTHON311"}`, ""},
		{ActionInstallCodeEnvWithPreset, `{"preset":"TIMESERIES_FORECASTING"}`, ""},
		{ActionInstallCodeEnvWithPreset, `{"preset":"DEEP_LEARNING"}`, "params.preset"},
		{ActionInstallCodeEnvWithPreset, `{"preset":"VISUAL_ML","interpreter":"PYTHON27"}`, "params.interpreter"},
		{ActionSetupGraphicsExport, `{}`, ""},
		{ActionSetupGraphicsExport, `{"stage":"after_dss_startup"}`, ""},
		{ActionSetupGraphicsExport, `{"stage":"before_install"}`, "must be after_install or after_dss_startup"},
		{ActionSetupNoneK8sAndSpark, `{}`, ""},
		{"NOPE", `{}`, "not a known setup action type"},
		{ActionSetupK8sAndSpark, `[1]`, "must be a JSON object"},
		{ActionRunAnsibleTasks, `{"stage":"after_install","ansibleTasks":"- debug: msg=x"}`, ""},
		{ActionRunAnsibleTasks, `{"ansibleTasks":"- x"}`, "params.stage: is required"},
		{ActionRunAnsibleTasks, `{"stage":"after_install","ansibleTasks":" "}`, "params.ansibleTasks"},
		{ActionInstallSystemPackages, `{"packages":["htop"]}`, ""},
		{ActionInstallSystemPackages, `{"packages":"htop"}`, "params.packages: must be an array of strings"},
		{ActionInstallSystemPackages, `{"packages":["a b"]}`, "not a package"},
		{ActionAddAuthorizedKey, `{"sshKey":"ssh-ed25519 AAAAC3Nza user@host"}`, ""},
		{ActionAddAuthorizedKey, `{"sshKey":"ssh-ed25519 AAAA\nssh-rsa BBBB"}`, "params.sshKey"},
		{ActionSetupAdvancedSecurity, `{"basic_headers":false}`, ""},
		{ActionSetupAdvancedSecurity, `{"hsts":1}`, "params.hsts: must be a boolean"},
		{ActionInstallJDBCDriver, `{"url":"file:///tmp/d.jar","dbType":null,"pathsInArchive":null,"headers":null,"username":null,"password":null,"subpathInDatadir":null}`, ""},
		{ActionInstallJDBCDriver, `{"url":"https://x/d.zip","pathsInArchive":["../etc/passwd"]}`, "params.pathsInArchive"},
		{ActionAddEnvVariables, `{"variables":[{"key":"JAVA_OPTS","value":"-Xmx2g"}]}`, ""},
		{ActionAddEnvVariables, `{"variables":[{"key":"BAD-NAME","value":"x"}]}`, "not a variable name"},
		{ActionAddEnvVariables, `{"variables":[{"key":"A","value":"x\ny"}]}`, "one line"},
		{ActionAddEnvVariables, `{}`, "params.variables: is required"},
		{ActionAddProperties, `{"properties":[{"key":"dku.some.setting","value":"42"}]}`, ""},
		{ActionAddProperties, `{"properties":[{"key":"a=b","value":"1"}]}`, "not a property name"},
		{ActionAddSSHKey, `{"privateKey":"-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl\n-----END OPENSSH PRIVATE KEY-----\n","keyName":"git_key"}`, ""},
		{ActionAddSSHKey, `{"privateKey":"ssh-ed25519 AAAA"}`, "params.privateKey"},
		{ActionAddSSHKey, `{"privateKey":"-----BEGIN RSA PRIVATE KEY-----\n-----END RSA PRIVATE KEY-----","keyName":"authorized_keys"}`, "params.keyName"},
		{ActionSetupProxy, `{"httpProxy":"http://proxy:3128"}`, ""},
		{ActionSetupProxy, `{"httpProxy":"proxy:3128"}`, "params.httpProxy"},
		{ActionSetupProxy, `{"httpProxy":"http://p:1","noProxy":"a, b"}`, "params.noProxy"},
		{ActionAddCAToTruststore, `{"name":"corp-root","certificate":"` + strings.ReplaceAll(cert, "\n", `\n`) + `"}`, ""},
		{ActionAddCAToTruststore, `{"name":"../x","certificate":"x"}`, "params.name"},
		{ActionSetupMemorySettings, `{"backendXmx":"8g","jekXmx":"2G","fekXmx":"512m"}`, ""},
		{ActionSetupMemorySettings, `{"backendXmx":"1024g"}`, ""},
		{ActionSetupMemorySettings, `{}`, "at least one of"},
		{ActionSetupMemorySettings, `{"backendXmx":"8"}`, "not a Java heap size"},
		{ActionSetupMemorySettings, `{"jekXmx":"128m"}`, "not a Java heap size"},
		{ActionSetupMemorySettings, `{"fekXmx":"2g -XX:+Evil"}`, "not a Java heap size"},
		{ActionSetupMemorySettings, `{"backendXmx":2}`, "must be a string"},
		{ActionSetupMemorySettings, `{"backendXmx":"4194305g"}`, "not a Java heap size"},
		{ActionSetupMemorySettings, `{"backendXmx":"8g","stage":"after_install"}`, ""},
		{ActionSetupMemorySettings, `{"backendXmx":"8g","stage":"after_dss_startup"}`, "must be after_install"},
		{ActionUpdateDSSPort, `{"port":11000}`, ""},
		{ActionUpdateDSSPort, `{"port":80}`, "out of range"},
		{ActionUpdateDSSPort, `{"port":"11000"}`, "must be a number"},
	}
	for _, tc := range tests {
		t.Run(string(tc.typ)+" "+tc.params, func(t *testing.T) {
			p, err := ParseParams(tc.typ, json.RawMessage(tc.params))
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want one mentioning %q (params %v)", err, tc.wantErr, p)
			}
		})
	}
}

func TestParseParamsTyped(t *testing.T) {
	p, err := ParseParams(ActionSetupProxy, json.RawMessage(`{"httpProxy":"http://p:3128"}`))
	if err != nil {
		t.Fatal(err)
	}
	if sp, ok := p.(*SetupProxyParams); !ok || sp.HTTPProxy != "http://p:3128" {
		t.Fatalf("%T %+v", p, p)
	}
}

func FuzzParseParams(f *testing.F) {
	f.Add("ADD_ENV_VARIABLES", `{"variables":[{"key":"A","value":"b"}]}`)
	f.Add("INSTALL_JDBC_DRIVER", `{"url":"https://x/y.jar","headers":{"a":"b"}}`)
	f.Add("UPDATE_DSS_PORT", `{"port":11000}`)
	f.Add("SETUP_MEMORY_SETTINGS", `{"backendXmx":"8g"}`)
	f.Add("SETUP_RUNTIME_DATABASE", `{"host":"db","database":"r","user":"u"}`)
	f.Add("SETUP_UI_CUSTOMIZATION", `{"homeMessage":"hi"}`)
	f.Add("RUN_ANSIBLE_TASKS", `{"stage":"after_install","ansibleTasks":"- x"}`)
	f.Fuzz(func(t *testing.T, typ, params string) {
		p, err := ParseParams(SetupActionType(typ), json.RawMessage(params))
		if err == nil && p != nil {
			// Whatever is accepted re-encodes and parses again the same way.
			b, merr := json.Marshal(p)
			if merr != nil {
				t.Fatalf("accepted params do not re-encode: %v", merr)
			}
			if _, err := ParseParams(SetupActionType(typ), b); err != nil {
				t.Fatalf("re-encoded params %s rejected: %v", b, err)
			}
		}
	})
}
