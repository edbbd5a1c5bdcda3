package main_test

import (
	"archive/tar"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/deploy/standin/kit"
)

// kits are built once per test binary, from inside the tests, where Go's
// test cache records the sources kit.Build reads.
var (
	kitsOnce sync.Once
	kitsDir  string
	kitDirs  = map[string]string{}
	kitsErr  error
)

func TestMain(m *testing.M) {
	var err error
	if kitsDir, err = os.MkdirTemp("", "standin-test-"); err != nil {
		panic(err)
	}
	code := m.Run()
	os.RemoveAll(kitsDir)
	os.Exit(code)
}

// kits returns the extracted kit folder of each version.
func kits(t *testing.T) map[string]string {
	t.Helper()
	kitsOnce.Do(func() {
		for _, v := range kit.Versions {
			path, err := kit.Build("../..", v, kitsDir)
			if err != nil {
				kitsErr = err
				return
			}
			kitDirs[v] = extract(path, kitsDir)
		}
	})
	if kitsErr != nil {
		t.Fatal(kitsErr)
	}
	return kitDirs
}

// extract unpacks a kit archive and returns its top folder.
func extract(archive, into string) string {
	f, err := os.Open(archive)
	if err != nil {
		panic(err)
	}
	defer f.Close()
	gz, err := gzip.NewReader(f)
	if err != nil {
		panic(err)
	}
	tr := tar.NewReader(gz)
	top := ""
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			panic(err)
		}
		p := filepath.Join(into, h.Name)
		if top == "" {
			top = filepath.Join(into, strings.SplitN(h.Name, "/", 2)[0])
		}
		if h.Typeflag == tar.TypeDir {
			os.MkdirAll(p, 0o755)
			continue
		}
		out, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, os.FileMode(h.Mode))
		if err != nil {
			panic(err)
		}
		io.Copy(out, tr)
		out.Close()
	}
	return top
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func sh(t *testing.T, wantOK bool, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if (err == nil) != wantOK {
		t.Fatalf("%s %v: err=%v, want ok=%v\n%s", name, args, err, wantOK, out)
	}
	return string(out)
}

func login(t *testing.T, port int, user, pw string) int {
	t.Helper()
	resp, err := http.Post(fmt.Sprintf("http://127.0.0.1:%d/api/login", port), "application/json",
		strings.NewReader(fmt.Sprintf(`{"login":%q,"password":%q}`, user, pw)))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func TestInstallRunUpgradeAndRefuseDowngrade(t *testing.T) {
	data := filepath.Join(t.TempDir(), "dss_data")
	port := freePort(t)
	dss := filepath.Join(data, "bin", "dss")
	t.Cleanup(func() { exec.Command(dss, "stop").Run() })

	sh(t, true, kits(t)["13.4.0"]+"/installer.sh", "-d", data, "-p", fmt.Sprint(port), "-t", "automation")
	sh(t, false, kits(t)["13.4.0"]+"/installer.sh", "-d", data, "-p", fmt.Sprint(port), "-t", "automation") // twice
	if _, err := os.Stat(filepath.Join(data, "config", "users.txt")); err != nil {
		t.Fatal("13.x keeps users in users.txt:", err)
	}
	if out := sh(t, false, dss, "status"); !strings.Contains(out, "STOPPED") {
		t.Fatalf("status before start: %s", out)
	}
	sh(t, true, dss, "start")
	sh(t, true, dss, "status")
	if login(t, port, "admin", "admin") != 200 {
		t.Fatal("the default admin password does not work")
	}
	sh(t, true, filepath.Join(data, "bin", "dsscli"), "user-edit", "admin", "--password", "s3cret-pw")
	if login(t, port, "admin", "admin") != 401 || login(t, port, "admin", "s3cret-pw") != 200 {
		t.Fatal("password reset through dsscli not in effect")
	}
	// An admin API key reaches the public API, as DSSClient sends it.
	var keys []map[string]any
	out := sh(t, true, filepath.Join(data, "bin", "dsscli"), "api-key-create", "--admin", "--label", "fm", "--output", "json")
	if err := json.Unmarshal([]byte(out), &keys); err != nil || keys[0]["key"] == nil {
		t.Fatalf("api-key-create: %s", out)
	}
	req, _ := http.NewRequest("POST", fmt.Sprintf("http://127.0.0.1:%d/public/api/projects/", port), strings.NewReader(`{"projectKey":"SALES","name":"Sales"}`))
	req.SetBasicAuth(keys[0]["key"].(string), "")
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("create project: %v %v", resp, err)
	}
	resp.Body.Close()
	// And sets a password through the admin API, as DSSUser settings do.
	put := func(body string) int {
		req, _ := http.NewRequest("PUT", fmt.Sprintf("http://127.0.0.1:%d/public/api/admin/users/admin", port), strings.NewReader(body))
		req.SetBasicAuth(keys[0]["key"].(string), "")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := put(`{"login":"admin","password":"api-pw"}`); code != 200 || login(t, port, "admin", "api-pw") != 200 {
		t.Fatalf("password set through the admin API: %d", code)
	}
	if code := put(`{"login":"someone-else","password":"x"}`); code != 400 {
		t.Fatalf("a definition of another login: %d", code)
	}
	sh(t, true, filepath.Join(data, "bin", "dsscli"), "user-edit", "admin", "--password", "s3cret-pw")

	// Upgrade needs DSS stopped, then migrates the users.
	sh(t, false, kits(t)["14.0.0"]+"/installer.sh", "-d", data, "-u", "-y")
	sh(t, true, dss, "stop")
	sh(t, true, kits(t)["14.0.0"]+"/installer.sh", "-d", data, "-u", "-y")
	if _, err := os.Stat(filepath.Join(data, "config", "users.txt")); !os.IsNotExist(err) {
		t.Fatal("users.txt survived the migration")
	}
	mig, err := os.ReadFile(filepath.Join(data, "config", "migrations.json"))
	if err != nil || !strings.Contains(string(mig), "users.json") {
		t.Fatalf("no migration record: %s %v", mig, err)
	}
	var v map[string]any
	b, _ := os.ReadFile(filepath.Join(data, "dss-version.json"))
	json.Unmarshal(b, &v)
	if v["product_version"] != "14.0.0" {
		t.Fatalf("version after upgrade: %v", v)
	}
	sh(t, true, dss, "start")
	if login(t, port, "admin", "s3cret-pw") != 200 {
		t.Fatal("the password did not survive the upgrade")
	}
	resp, err = http.Get(fmt.Sprintf("http://127.0.0.1:%d/public/api/projects/SALES/", port))
	if err != nil || resp.StatusCode != 401 {
		t.Fatalf("the public API answers without a key: %v", resp)
	}
	resp.Body.Close()
	sh(t, true, dss, "stop")
	sh(t, false, kits(t)["13.4.0"]+"/installer.sh", "-d", data, "-u", "-y")

	// An older binary refuses to start on a newer data directory.
	sh(t, true, kits(t)["14.0.0"]+"/installer.sh", "-d", data, "-u", "-y")
	if log, _ := os.ReadFile(filepath.Join(data, "run", "backend.log")); !strings.Contains(string(log), "listening on port") {
		t.Fatalf("backend.log has no startup line:\n%s", log)
	}
}

func TestRestartAfterKill(t *testing.T) {
	data := filepath.Join(t.TempDir(), "d")
	port := freePort(t)
	dss := filepath.Join(data, "bin", "dss")
	t.Cleanup(func() { exec.Command(dss, "stop").Run() })
	sh(t, true, kits(t)["14.0.0"]+"/installer.sh", "-d", data, "-p", fmt.Sprint(port), "-t", "design")
	sh(t, true, dss, "start")
	pid, _ := os.ReadFile(filepath.Join(data, "run", "dss.pid"))
	sh(t, true, "kill", "-9", strings.TrimSpace(string(pid)))
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := exec.Command(dss, "status").Output(); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("status still says running after kill -9")
		}
		time.Sleep(50 * time.Millisecond)
	}
	sh(t, true, dss, "restart")
	if login(t, port, "admin", "admin") != 200 {
		t.Fatal("not serving after restart")
	}
}

// TestRegenerateConfigTakesTheHeaps: dssadmin regenerate-config turns
// install.ini's [javaopts] heaps into the Java options DSS starts with, and
// refuses, as DSS does, a value or a key it does not know, leaving the
// options as they were.
func TestRegenerateConfigTakesTheHeaps(t *testing.T) {
	data := filepath.Join(t.TempDir(), "dss_data")
	sh(t, true, kits(t)["14.0.0"]+"/installer.sh", "-d", data, "-p", fmt.Sprint(freePort(t)), "-t", "design")
	ini := filepath.Join(data, "install.ini")
	base, err := os.ReadFile(ini)
	if err != nil {
		t.Fatal(err)
	}
	envDefault := filepath.Join(data, "bin", "env-default.sh")
	tests := []struct {
		name, javaopts, want, refused string
	}{
		{name: "the three heaps", javaopts: "backend.xmx = 8g\njek.xmx = 2g\nfek.xmx = 512m\n",
			want: "export DKU_BACKEND_JAVA_OPTS=\"-Xmx8g\"\nexport DKU_JEK_JAVA_OPTS=\"-Xmx2g\"\nexport DKU_FEK_JAVA_OPTS=\"-Xmx512m\"\n"},
		{name: "one", javaopts: "backend.xmx = 4g\n", want: "export DKU_BACKEND_JAVA_OPTS=\"-Xmx4g\"\n"},
		{name: "not a size", javaopts: "backend.xmx = 4 GB\n", refused: "is not a Java heap size"},
		{name: "another key, not the stand-in's to check", javaopts: "backend.additional.opts = -Dx=y\njek.xmx = 1g\n", want: "export DKU_JEK_JAVA_OPTS=\"-Xmx1g\"\n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before, _ := os.ReadFile(envDefault)
			if err := os.WriteFile(ini, append(append([]byte{}, base...), []byte("\n[javaopts]\n"+tc.javaopts)...), 0o644); err != nil {
				t.Fatal(err)
			}
			out := sh(t, tc.refused == "", filepath.Join(data, "bin", "dssadmin"), "regenerate-config")
			after, _ := os.ReadFile(envDefault)
			if tc.refused != "" {
				if !strings.Contains(out, tc.refused) || string(after) != string(before) {
					t.Fatalf("refused with %q; env-default.sh %q (was %q)", out, after, before)
				}
				return
			}
			if !strings.HasSuffix(string(after), "export DKU_STANDIN=1\n"+tc.want) {
				t.Fatalf("env-default.sh:\n%s", after)
			}
		})
	}
}
