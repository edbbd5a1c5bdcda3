package server_test

import (
	"strings"
	"testing"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/server"
)

// What FMAWSInstanceSettingsTemplateCreator.create sends for a template with
// the client's setup action helpers.
const fullTemplate = `{
  "label": "standard",
  "setupActions": [
    {"type": "ADD_AUTHORIZED_KEY", "params": {"sshKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG ops@example"}},
    {"type": "RUN_ANSIBLE_TASKS", "params": {"stage": "after_dss_startup", "ansibleTasks": "- debug: msg=hello"}},
    {"type": "INSTALL_SYSTEM_PACKAGES", "params": {"packages": ["htop", "https://example.com/tool.rpm"]}},
    {"type": "SETUP_ADVANCED_SECURITY", "params": {"basic_headers": true, "hsts": false}},
    {"type": "INSTALL_JDBC_DRIVER", "params": {"url": "https://example.com/driver.zip", "dbType": "mysql", "pathsInArchive": null, "headers": null, "username": null, "password": null, "subpathInDatadir": null}},
    {"type": "SETUP_K8S_AND_SPARK", "params": {}},
    {"type": "INSTALL_DEPRECATED_PYTHON", "params": {"install_py36": false, "install_py37": true, "install_py38": false}},
    {"type": "SETUP_UI_CUSTOMIZATION", "params": {"homeMessage": "hi", "anything": ["kept", "as", "given"]}},
    {"type": "SETUP_K8S_AND_SPARK", "params": null, "enabled": false}
  ],
  "license": "{\n  \"content\": {\n    \"licensee\": \"ACME\"\n  }\n}",
  "awsKeyPairName": "ops-key",
  "startupInstanceProfileArn": "arn:aws:iam::123456789012:instance-profile/dss-startup",
  "runtimeInstanceProfileArn": "arn:aws:iam::123456789012:instance-profile/dss-runtime",
  "restrictAwsMetadataServerAccess": true,
  "dataikuAwsAPIAccessMode": "KEYPAIR",
  "dataikuAwsKeypairStorageMode": "INLINE_ENCRYPTED",
  "dataikuAwsAccessKeyId": "AKIAIOSFODNN7EXAMPLE",
  "dataikuAwsSecretAccessKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
}`

func TestTemplateCreateSaveAndSecret(t *testing.T) {
	f := start(t)
	r := f.do("POST", "/instance-settings-templates", fullTemplate)
	if strings.Contains(string(r.body), "wJalrXUtnFEMI") {
		t.Fatal("the create response returns the secret key")
	}
	var tpl api.InstanceSettingsTemplate
	f.ok(r, &tpl)
	if len(tpl.SetupActions) != 9 || !*tpl.SetupActions[0].Enabled || *tpl.SetupActions[8].Enabled {
		t.Fatalf("setup actions %+v", tpl.SetupActions)
	}
	if string(tpl.SetupActions[8].Params) != "{}" || !strings.Contains(string(tpl.SetupActions[7].Params), `"as"`) {
		t.Fatalf("params not kept: %s / %s", tpl.SetupActions[8].Params, tpl.SetupActions[7].Params)
	}
	for _, path := range []string{"/instance-settings-templates", "/instance-settings-templates/" + tpl.ID} {
		if strings.Contains(f.snapshotOf(path), "wJalrXUtnFEMI") {
			t.Fatalf("GET %s returns the secret key", path)
		}
	}

	// set_setup_action_enabled_by_index(1, False) then save(): the echoed
	// object has no secret, and the stored one is kept.
	m := map[string]any{}
	f.ok(f.do("GET", "/instance-settings-templates/"+tpl.ID, ""), &m)
	m["setupActions"].([]any)[1].(map[string]any)["enabled"] = false
	f.ok(f.do("PUT", "/instance-settings-templates/"+tpl.ID, mustJSON(t, m)), nil)
	var got api.InstanceSettingsTemplate
	f.ok(f.do("GET", "/instance-settings-templates/"+tpl.ID, ""), &got)
	if *got.SetupActions[1].Enabled {
		t.Fatal("enabled flag not saved")
	}
	// The stored secret survived the echo: switching the storage mode
	// requires it, and the save passes.
	if got.DataikuAWSAccessKeyID != "AKIAIOSFODNN7EXAMPLE" {
		t.Fatalf("key id lost: %+v", got)
	}
	// Turning keys off drops the secret; turning them on again needs one.
	m["dataikuAwsAPIAccessMode"] = "NONE"
	m["revision"] = got.Revision
	f.ok(f.do("PUT", "/instance-settings-templates/"+tpl.ID, mustJSON(t, m)), nil)
	f.ok(f.do("GET", "/instance-settings-templates/"+tpl.ID, ""), &m)
	m["dataikuAwsAPIAccessMode"], m["dataikuAwsAccessKeyId"] = "KEYPAIR", "AKIAIOSFODNN7EXAMPLE"
	e := f.failed(f.do("PUT", "/instance-settings-templates/"+tpl.ID, mustJSON(t, m)), 400, "InvalidArgument")
	if !strings.Contains(e.DetailedMessage, "dataikuAwsSecretAccessKey: is required") {
		t.Fatal(e.DetailedMessage)
	}
}

func TestTemplateBadInputs(t *testing.T) {
	f := start(t)
	f.createTemplate(`{"label":"taken"}`)
	action := func(a string) string { return `{"label":"t","setupActions":[` + a + `]}` }
	tests := []struct{ name, body, wantText string }{
		{"no label", `{"setupActions":[]}`, "label: is required"},
		{"unknown type", action(`{"type":"FORMAT_DISK","params":{}}`), "not a known setup action type"},
		{"lower-case type", action(`{"type":"add_authorized_key","params":{"sshKey":"ssh-ed25519 AAAA"}}`), "not a known"},
		{"params not object", action(`{"type":"SETUP_K8S_AND_SPARK","params":[1]}`), "params: must be a JSON object"},
		{"bad stage", action(`{"type":"RUN_ANSIBLE_TASKS","params":{"stage":"AFTER_INSTALL","ansibleTasks":"- x"}}`), "stage"},
		{"ansible without stage", action(`{"type":"RUN_ANSIBLE_TASKS","params":{"ansibleTasks":"- x"}}`), "stage: is required"},
		{"ansible without tasks", action(`{"type":"RUN_ANSIBLE_TASKS","params":{"stage":"after_install"}}`), "ansibleTasks: is required"},
		{"stage on any action", action(`{"type":"SETUP_UI_CUSTOMIZATION","params":{"stage":"whenever"}}`), "stage"},
		{"no packages", action(`{"type":"INSTALL_SYSTEM_PACKAGES","params":{"packages":[]}}`), "packages: is required"},
		{"shell in package", action(`{"type":"INSTALL_SYSTEM_PACKAGES","params":{"packages":["htop; rm -rf /"]}}`), "not a package"},
		{"bad ssh key", action(`{"type":"ADD_AUTHORIZED_KEY","params":{"sshKey":"hello"}}`), "sshKey"},
		{"security not bool", action(`{"type":"SETUP_ADVANCED_SECURITY","params":{"hsts":"yes"}}`), "hsts: must be a boolean"},
		{"jdbc no url", action(`{"type":"INSTALL_JDBC_DRIVER","params":{"dbType":"mysql"}}`), "url: is required"},
		{"jdbc bad scheme", action(`{"type":"INSTALL_JDBC_DRIVER","params":{"url":"ftp://x/y.jar"}}`), "url"},
		{"jdbc bad db", action(`{"type":"INSTALL_JDBC_DRIVER","params":{"url":"https://x/y.jar","dbType":"db2"}}`), "dbType"},
		{"jdbc escape", action(`{"type":"INSTALL_JDBC_DRIVER","params":{"url":"https://x/y.jar","subpathInDatadir":"../etc"}}`), "subpathInDatadir"},
		{"enabled not bool", action(`{"type":"SETUP_K8S_AND_SPARK","params":{},"enabled":"yes"}`), "field setupActions.enabled"},
		{"license not json", `{"label":"t","license":"not json"}`, "license"},
		{"bad profile", `{"label":"t","runtimeInstanceProfileArn":"dss-runtime"}`, "runtimeInstanceProfileArn"},
		{"keypair no storage", `{"label":"t","dataikuAwsAPIAccessMode":"KEYPAIR"}`, "dataikuAwsKeypairStorageMode"},
		{"secrets manager", `{"label":"t","dataikuAwsAPIAccessMode":"KEYPAIR","dataikuAwsKeypairStorageMode":"AWS_SECRETS_MANAGER"}`, "dataikuAwsSecretAccessKeyAwsSecretName: is required"},
		{"bad access mode", `{"label":"t","dataikuAwsAPIAccessMode":"ROLE"}`, "dataikuAwsAPIAccessMode"},
		{"secret breaking the credentials file", `{"label":"t","dataikuAwsAPIAccessMode":"KEYPAIR","dataikuAwsKeypairStorageMode":"INLINE_ENCRYPTED",
			"dataikuAwsAccessKeyId":"AKIAIOSFODNN7EXAMPLE","dataikuAwsSecretAccessKey":"wJalrXUtnFEMI/K7MDENG\n[evil]"}`, "dataikuAwsSecretAccessKey: is not an AWS secret access key"},
	}
	before := f.snapshotOf("/instance-settings-templates")
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := f.failed(f.do("POST", "/instance-settings-templates", tc.body), 400, "InvalidArgument")
			if !strings.Contains(e.DetailedMessage, tc.wantText) {
				t.Fatalf("message %q does not mention %q", e.DetailedMessage, tc.wantText)
			}
		})
	}
	f.failed(f.do("POST", "/instance-settings-templates", `{"label":" Taken "}`), 409, "AlreadyExists")
	if after := f.snapshotOf("/instance-settings-templates"); after != before {
		t.Fatal("rejected requests changed the stored templates")
	}
}

func TestTemplateDeleteRefusedWhileUsed(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("i", vn.ID, tpl.ID, im.ID))
	f.failed(f.do("DELETE", "/instance-settings-templates/"+tpl.ID, ""), 409, "FailedPrecondition")
	f.ok(f.do("GET", "/instances/"+in.ID+"/actions/delete", ""), nil)
	var fut api.Future
	f.ok(f.do("DELETE", "/instance-settings-templates/"+tpl.ID, ""), &fut)
	if !fut.HasResult {
		t.Fatalf("%+v", fut)
	}
}

// TestTemplateSecretsHiddenFromViewers: the secrets of setup actions' params
// (a runtime database's password, a JDBC password and headers, an SSH
// private key), whatever the case of their keys, are redacted for all but
// admins, who alone edit templates.
func TestTemplateSecretsHiddenFromViewers(t *testing.T) {
	f := start(t)
	var tpl api.InstanceSettingsTemplate
	f.ok(f.do("POST", "/instance-settings-templates", `{"label": "secrets", "setupActions": [
	  {"type": "SETUP_RUNTIME_DATABASE", "params": {"host": "db", "database": "r", "user": "u", "Password": "db-Secret-1"}},
	  {"type": "INSTALL_JDBC_DRIVER", "params": {"url": "https://x/d.jar", "username": "u", "password": "jdbc-Secret-2", "headers": {"Authorization": "Bearer hdr-Secret-4"}}},
	  {"type": "ADD_SSH_KEY", "params": {"privateKey": "-----BEGIN OPENSSH PRIVATE KEY-----\nssh-Secret-3\n-----END OPENSSH PRIVATE KEY-----\n"}},
	  {"type": "SETUP_INSTANCE_NAME", "params": {"instanceName": "kept"}}]}`), &tpl)
	secrets := []string{"db-Secret-1", "jdbc-Secret-2", "ssh-Secret-3", "hdr-Secret-4"}
	for _, role := range []string{server.RoleViewer, server.RoleOperator} {
		k := f.newKey(role)
		for _, path := range []string{"/instance-settings-templates", "/instance-settings-templates/" + tpl.ID} {
			r := f.doAs("GET", path, "", k.ID, k.Secret)
			if r.status != 200 {
				t.Fatalf("%s as %s: %d", path, role, r.status)
			}
			for _, secret := range secrets {
				if strings.Contains(string(r.body), secret) {
					t.Errorf("%s shows %s to a %s", path, secret, role)
				}
			}
			if !strings.Contains(string(r.body), "(redacted)") || !strings.Contains(string(r.body), `"instanceName":"kept"`) {
				t.Errorf("%s, as a %s: %s", path, role, r.body)
			}
		}
	}
	// An admin sees them, and what is stored is not redacted.
	r := f.do("GET", "/instance-settings-templates/"+tpl.ID, "")
	for _, secret := range secrets {
		if !strings.Contains(string(r.body), secret) {
			t.Errorf("an admin does not see %s: %s", secret, r.body)
		}
	}
}
