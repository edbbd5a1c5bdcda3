package agent

import (
	"archive/zip"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/protocol"
)

func selfSignedCA(t *testing.T) string {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "Corp Root CA"},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tpl, tpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

func rsaPrivateKeyPEM(t *testing.T) string {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}))
}

// jdbcServer serves a zip with a driver jar, only with the right header and
// basic auth.
func jdbcServer(t *testing.T) string {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for name, body := range map[string]string{"driver/mysql-connector.jar": "JAR-BYTES", "driver/README.txt": "read me"} {
		w, _ := zw.Create(name)
		w.Write([]byte(body))
	}
	zw.Close()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u, p, ok := r.BasicAuth()
		if r.Header.Get("X-Token") != "abc" || !ok || u != "jdbc" || p != "pw" {
			http.Error(w, "no", http.StatusForbidden)
			return
		}
		w.Write(buf.Bytes())
	}))
	t.Cleanup(srv.Close)
	return srv.URL + "/drivers/mysql.zip"
}

func TestFreshInstallWithSetupActions(t *testing.T) {
	r := newRig(t)
	ca := selfSignedCA(t)
	sshKey := rsaPrivateKeyPEM(t)
	jar := filepath.Join(t.TempDir(), "pg.jar")
	os.WriteFile(jar, []byte("PG-JAR"), 0o644)
	newPort := freePort(t)
	q := func(v any) string { b, _ := json.Marshal(v); return string(b) }
	actions := []protocol.SetupAction{
		action(protocol.ActionAddAuthorizedKey, `{"sshKey":"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOps ops@example","stage":"before_install"}`),
		action(protocol.ActionAddEnvVariables, `{"variables":[{"key":"JAVA_OPTS","value":"-Xmx2g -Dx='y'"},{"key":"FM_TEST","value":"hello"}]}`),
		action(protocol.ActionSetupProxy, `{"httpProxy":"http://proxy.example.com:3128"}`),
		action(protocol.ActionAddProperties, `{"properties":[{"key":"dku.test.property","value":"42"}]}`),
		action(protocol.ActionSetupAdvancedSecurity, `{"basic_headers":true,"hsts":true}`),
		action(protocol.ActionAddSSHKey, `{"privateKey":`+q(sshKey)+`}`),
		action(protocol.ActionAddCAToTruststore, `{"name":"corp-root","certificate":`+q(ca)+`}`),
		action(protocol.ActionInstallJDBCDriver, `{"url":`+q(jdbcServer(t))+`,"dbType":"mysql","pathsInArchive":["driver/*.jar"],"headers":{"X-Token":"abc"},"username":"jdbc","password":"pw","subpathInDatadir":null}`),
		action(protocol.ActionInstallJDBCDriver, `{"url":"file://`+jar+`","dbType":null,"pathsInArchive":null,"headers":null,"username":null,"password":null,"subpathInDatadir":"lib/jdbc/postgres"}`),
		action(protocol.ActionUpdateDSSPort, fmt.Sprintf(`{"port":%d}`, newPort)),
		action(protocol.ActionInstallSystemPackages, `{"packages":["htop"]}`),
		action(protocol.ActionSetupK8sAndSpark, `{}`),
		{Type: protocol.ActionAddEnvVariables, Params: json.RawMessage(`{"variables":[{"key":"DISABLED","value":"1"}]}`), Enabled: false},
	}
	r.startAgent()
	d := r.desire("14.0.0", actions...)
	st := r.waitReady(d.Generation)
	if st.DSS.State != protocol.DSSRunning || st.DSS.Version != "14.0.0" || st.DSS.Port != newPort || st.DSS.NodeType != "design" {
		t.Fatalf("DSS status %+v", st.DSS)
	}

	// The startup sequence, in order.
	var steps []string
	for _, e := range r.events.find(func(e protocol.Event) bool { return e.Generation == d.Generation && e.Status != protocol.StatusStarted }) {
		steps = append(steps, e.Step)
	}
	joined := strings.Join(steps, " | ")
	order := []string{"fetch-kit", "setup-action[0] ADD_AUTHORIZED_KEY (before_install)", "install",
		"setup-action[1] ADD_ENV_VARIABLES (after_install)", "start-dss", "credentials", "ready"}
	last := -1
	for _, s := range order {
		i := strings.Index(joined, s)
		if i < 0 || i < last {
			t.Fatalf("step %q missing or out of order in:\n%s", s, joined)
		}
		last = i
	}
	byStep := func(prefix string) protocol.Event {
		for _, e := range r.events.find(func(e protocol.Event) bool { return e.Status != protocol.StatusStarted }) {
			if strings.HasPrefix(e.Step, prefix) {
				return e
			}
		}
		t.Fatalf("no event for %s", prefix)
		return protocol.Event{}
	}
	for prefix, want := range map[string]protocol.Status{
		"setup-action[10] INSTALL_SYSTEM_PACKAGES": protocol.StatusUnsupported,
		"setup-action[11] SETUP_K8S_AND_SPARK":     protocol.StatusOK,
		"setup-action[12] ADD_ENV_VARIABLES":       protocol.StatusSkipped,
		"setup-action[9] UPDATE_DSS_PORT":          protocol.StatusOK,
	} {
		if e := byStep(prefix); e.Status != want || e.Message == "" {
			t.Errorf("%s: %s %q, want %s with a message", prefix, e.Status, e.Message, want)
		}
	}

	// Effects on the machine.
	read := func(p ...string) string {
		b, err := os.ReadFile(filepath.Join(p...))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if s := read(r.root, "home", "ec2-user", ".ssh", "authorized_keys"); !strings.Contains(s, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOps ops@example") {
		t.Errorf("authorized_keys:\n%s", s)
	}
	env := read(r.dssDir(), "bin", "env-site.sh")
	for _, want := range []string{`export JAVA_OPTS='-Xmx2g -Dx='\''y'\'''`, "export HTTPS_PROXY='http://proxy.example.com:3128'",
		"export no_proxy='localhost,127.0.0.1,169.254.169.254'"} {
		if !strings.Contains(env, want) {
			t.Errorf("env-site.sh lacks %q:\n%s", want, env)
		}
	}
	if strings.Contains(env, "DISABLED") {
		t.Error("a disabled action was carried out")
	}
	props := read(r.dssDir(), "config", "dip.properties")
	if !strings.Contains(props, "dku.test.property=42") || !strings.Contains(props, "dku.security.hsts=true") {
		t.Errorf("dip.properties:\n%s", props)
	}
	if s := read(r.root, "home", r.cfg.DSSUser, ".ssh", "id_rsa"); strings.TrimSpace(s) != strings.TrimSpace(sshKey) {
		t.Error("ssh key not installed as id_rsa")
	}
	if info, _ := os.Stat(filepath.Join(r.root, "home", r.cfg.DSSUser, ".ssh", "id_rsa")); info.Mode().Perm() != 0o600 {
		t.Errorf("ssh key mode %v", info.Mode())
	}
	if s := read(r.root, "etc", "pki", "ca-trust", "source", "anchors", "fm-corp-root.pem"); !strings.Contains(s, "BEGIN CERTIFICATE") {
		t.Error("CA not written")
	}
	if s := read(r.dssDir(), "lib", "jdbc", "mysql-connector.jar"); s != "JAR-BYTES" {
		t.Errorf("jdbc jar from the zip: %q", s)
	}
	if _, err := os.Stat(filepath.Join(r.dssDir(), "lib", "jdbc", "README.txt")); err == nil {
		t.Error("a file outside pathsInArchive was installed")
	}
	if s := read(r.dssDir(), "lib", "jdbc", "postgres", "pg.jar"); s != "PG-JAR" {
		t.Errorf("jdbc jar from file://: %q", s)
	}
	// DSS itself runs with the settings: the stand-in shows what it got.
	var secrets dssSecrets
	loadJSON(filepath.Join(r.data, "fm-agent", "dss-credentials.json"), &secrets)
	if secrets.AdminAPIKey == "" || secrets.InitialPassword == "" {
		t.Fatalf("credentials not created: %+v", secrets)
	}
	code, body := r.get("/api/runtime", secrets.AdminAPIKey)
	if code != 200 || !strings.Contains(string(body), `"FM_TEST":"hello"`) || !strings.Contains(string(body), `"dku.test.property":"42"`) {
		t.Fatalf("runtime %d %s", code, body)
	}
	if r.login("admin", "admin") != 401 || r.login("admin", secrets.InitialPassword) != 200 {
		t.Fatal("the initial admin password is not the one DSS uses")
	}
}

func TestOpenSSHKeyNames(t *testing.T) {
	blob := func(keyType string) string {
		var b bytes.Buffer
		b.WriteString("openssh-key-v1\x00")
		str := func(s string) {
			n := len(s)
			b.Write([]byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)})
			b.WriteString(s)
		}
		str("none")
		str("none")
		str("")
		b.Write([]byte{0, 0, 0, 1})
		var pub bytes.Buffer
		n := len(keyType)
		pub.Write([]byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)})
		pub.WriteString(keyType)
		str(pub.String())
		return string(pem.EncodeToMemory(&pem.Block{Type: "OPENSSH PRIVATE KEY", Bytes: b.Bytes()}))
	}
	for keyType, want := range map[string]string{"ssh-ed25519": "id_ed25519", "ssh-rsa": "id_rsa", "ecdsa-sha2-nistp256": "id_ecdsa"} {
		if got := defaultKeyName(blob(keyType)); got != want {
			t.Errorf("%s: %s, want %s", keyType, got, want)
		}
	}
	if got := defaultKeyName("-----BEGIN OPENSSH PRIVATE KEY-----\ngarbage\n-----END OPENSSH PRIVATE KEY-----\n"); got != "id_ed25519" {
		t.Errorf("unparseable OpenSSH key: %s", got)
	}
}
