package main

import (
	"bufio"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/fleetmanager/fm/internal/atomicfile"
	"github.com/fleetmanager/fm/protocol"
)

// dataDir is a DSS data directory as the stand-in lays it out.
type dataDir string

func (d dataDir) path(parts ...string) string {
	return filepath.Join(append([]string{string(d)}, parts...)...)
}

// versionFile is DATA_DIR/dss-version.json, where DSS records what is
// installed.
type versionFile struct {
	ProductVersion string `json:"product_version"`
	ConfVersion    string `json:"conf_version"`
	StandIn        bool   `json:"standin"`
}

func (d dataDir) installedVersion() (string, error) {
	b, err := os.ReadFile(d.path("dss-version.json"))
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	var v versionFile
	if err := json.Unmarshal(b, &v); err != nil {
		return "", fmt.Errorf("dss-version.json: %w", err)
	}
	return v.ProductVersion, nil
}

func major(v string) int {
	n, _ := strconv.Atoi(strings.SplitN(v, ".", 2)[0])
	return n
}

// cmdInstall is `installer.sh -d DATA_DIR -p PORT -t NODE_TYPE [-l LICENSE]`.
func cmdInstall(args []string) error {
	fs := flag.NewFlagSet("install", flag.ContinueOnError)
	dir := fs.String("d", "", "data directory")
	port := fs.Int("p", 0, "base port")
	nodeType := fs.String("t", "design", "node type")
	license := fs.String("l", "", "license file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" || *port < 1 || *port > 65535 {
		return errors.New("usage: installer.sh -d DATA_DIR -p PORT -t NODE_TYPE [-l LICENSE_FILE]")
	}
	switch *nodeType {
	case "design", "automation", "deployer", "govern":
	default:
		return fmt.Errorf("unknown node type %q", *nodeType)
	}
	d := dataDir(*dir)
	if v, err := d.installedVersion(); err != nil {
		return err
	} else if v != "" {
		return fmt.Errorf("%s already holds DSS %s; upgrade it with installer.sh -d %s -u -y", *dir, v, *dir)
	}
	// As DSS's installer, it refuses a folder that holds anything else.
	if entries, err := os.ReadDir(*dir); err == nil && len(entries) > 0 {
		return fmt.Errorf("%s exists and is not empty, but is not a DSS data directory", *dir)
	}
	for _, sub := range []string{"bin", "config", "projects", "run", "tmp", "lib/jdbc"} {
		if err := os.MkdirAll(d.path(sub), 0o755); err != nil {
			return err
		}
	}
	ini := fmt.Sprintf("[general]\nnodetype = %s\ninstallid = %s\n\n[server]\nport = %d\n", *nodeType, randomHex(8), *port)
	if err := os.WriteFile(d.path("install.ini"), []byte(ini), 0o644); err != nil {
		return err
	}
	if *license != "" {
		b, err := os.ReadFile(*license)
		if err != nil {
			return fmt.Errorf("license: %w", err)
		}
		if err := os.WriteFile(d.path("config", "license.json"), b, 0o600); err != nil {
			return err
		}
	}
	// Like DSS, a new installation has the user admin with password admin.
	h, err := hashPassword("admin")
	if err != nil {
		return err
	}
	if err := d.saveUsers(version, []user{{Login: "admin", Admin: true, Hash: h}}); err != nil {
		return err
	}
	if err := d.installBinaries(); err != nil {
		return err
	}
	d.logInstall("installed DSS stand-in %s (%s node, port %d)", version, *nodeType, *port)
	return d.writeVersion()
}

// cmdUpgrade is `installer.sh -d DATA_DIR -u -y`: it upgrades the data
// directory in place to this kit's version, migrating what changed.
func cmdUpgrade(args []string) error {
	fs := flag.NewFlagSet("upgrade", flag.ContinueOnError)
	dir := fs.String("d", "", "data directory")
	fs.Bool("u", true, "upgrade")
	fs.Bool("y", false, "do not ask")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" {
		return errors.New("usage: installer.sh -d DATA_DIR -u -y")
	}
	d := dataDir(*dir)
	from, err := d.installedVersion()
	if err != nil {
		return err
	}
	if from == "" {
		return fmt.Errorf("%s holds no DSS installation to upgrade", *dir)
	}
	if protocol.CompareVersions(from, version) > 0 {
		return fmt.Errorf("%s holds DSS %s, newer than this kit (%s): downgrades are not supported", *dir, from, version)
	}
	if pid, running := d.runningPID(); running {
		return fmt.Errorf("DSS is running (pid %d); stop it before upgrading", pid)
	}
	if major(from) < 14 && major(version) >= 14 {
		// 14 keeps users in config/users.json instead of config/users.txt.
		users, err := d.loadUsers(from)
		if err != nil {
			return fmt.Errorf("read users of %s: %w", from, err)
		}
		if err := d.saveUsers(version, users); err != nil {
			return err
		}
		if err := os.Remove(d.path("config", "users.txt")); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		if err := d.recordMigration(from, version, fmt.Sprintf("moved %d users from config/users.txt to config/users.json", len(users))); err != nil {
			return err
		}
	} else if from != version {
		if err := d.recordMigration(from, version, "no data changes"); err != nil {
			return err
		}
	}
	for _, sub := range []string{"projects", "run", "tmp", "lib/jdbc"} {
		if err := os.MkdirAll(d.path(sub), 0o755); err != nil {
			return err
		}
	}
	if err := d.installBinaries(); err != nil {
		return err
	}
	d.logInstall("upgraded DSS stand-in %s -> %s", from, version)
	return d.writeVersion()
}

func (d dataDir) writeVersion() error {
	b, _ := json.MarshalIndent(versionFile{ProductVersion: version, ConfVersion: strings.ReplaceAll(version, ".", ""), StandIn: true}, "", "  ")
	return atomicfile.WriteFile(d.path("dss-version.json"), append(b, '\n'), 0o644)
}

type migration struct {
	From string    `json:"from"`
	To   string    `json:"to"`
	What string    `json:"what"`
	At   time.Time `json:"at"`
}

func (d dataDir) recordMigration(from, to, what string) error {
	var all []migration
	if b, err := os.ReadFile(d.path("config", "migrations.json")); err == nil {
		_ = json.Unmarshal(b, &all)
	}
	all = append(all, migration{From: from, To: to, What: what, At: time.Now().UTC()})
	b, _ := json.MarshalIndent(all, "", "  ")
	return atomicfile.WriteFile(d.path("config", "migrations.json"), append(b, '\n'), 0o644)
}

func (d dataDir) logInstall(format string, args ...any) {
	f, err := os.OpenFile(d.path("run", "install.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "%s %s\n", time.Now().UTC().Format(time.RFC3339), fmt.Sprintf(format, args...))
}

// installBinaries copies this program into the data directory and writes
// the scripts DSS has there: bin/dss, bin/dsscli, bin/dssadmin and the
// environment files (env-site.sh is the administrator's and is kept;
// env-spark.sh is install-spark-integration's).
func (d dataDir) installBinaries() error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(d.path("bin", ".standin"), 0o755); err != nil {
		return err
	}
	if err := copyFile(exe, d.path("bin", ".standin", "dss-standin"), 0o755); err != nil {
		return fmt.Errorf("install binary: %w", err)
	}
	self := `"$(cd "$(dirname "$0")" && pwd)/.standin/dss-standin"`
	datadir := `"$(cd "$(dirname "$0")/.." && pwd)"`
	scripts := map[string]string{
		// env-spark.sh, there once install-spark-integration ran, comes
		// before env-site.sh: the administrator's settings win.
		"dss": "#!/bin/sh\n# DSS stand-in control script: start|stop|status|restart\n. \"$(dirname \"$0\")/env-default.sh\"\n" +
			"if [ -f \"$(dirname \"$0\")/env-spark.sh\" ]; then . \"$(dirname \"$0\")/env-spark.sh\"; fi\n" +
			". \"$(dirname \"$0\")/env-site.sh\"\nexec " + self + " ctl \"$1\" -d " + datadir + "\n",
		"dsscli":   "#!/bin/sh\n# DSS stand-in administration CLI\nexec " + self + " cli -d " + datadir + " \"$@\"\n",
		"dssadmin": "#!/bin/sh\n# DSS stand-in admin tool: regenerate-config and the setup commands (install-*, build-base-image)\nexec " + self + " cli -d " + datadir + " \"$@\"\n",
	}
	for name, body := range scripts {
		if err := atomicfile.WriteFile(d.path("bin", name), []byte(body), 0o755); err != nil {
			return err
		}
	}
	// The installer writes what it can of [javaopts] (an upgrade never stops
	// half done over it); dssadmin regenerate-config is the strict one.
	if err := d.writeEnvDefault(false); err != nil {
		return err
	}
	if _, err := os.Stat(d.path("bin", "env-site.sh")); errors.Is(err, os.ErrNotExist) {
		return os.WriteFile(d.path("bin", "env-site.sh"), []byte("# Site-specific environment for DSS; sourced by bin/dss.\n"), 0o755)
	}
	return nil
}

// user is a DSS user.
type user struct {
	Login string `json:"login"`
	Admin bool   `json:"admin"`
	Hash  string `json:"hash"`
}

// loadUsers reads the users in the format of version v.
func (d dataDir) loadUsers(v string) ([]user, error) {
	if major(v) >= 14 {
		b, err := os.ReadFile(d.path("config", "users.json"))
		if err != nil {
			return nil, err
		}
		var users []user
		return users, json.Unmarshal(b, &users)
	}
	f, err := os.Open(d.path("config", "users.txt"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var users []user
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			return nil, fmt.Errorf("users.txt: bad line %q", line)
		}
		users = append(users, user{Login: parts[0], Admin: parts[1] == "1", Hash: parts[2]})
	}
	return users, sc.Err()
}

func (d dataDir) saveUsers(v string, users []user) error {
	if major(v) >= 14 {
		b, _ := json.MarshalIndent(users, "", "  ")
		return atomicfile.WriteFile(d.path("config", "users.json"), append(b, '\n'), 0o600)
	}
	var sb strings.Builder
	sb.WriteString("# login:admin:hash\n")
	for _, u := range users {
		admin := "0"
		if u.Admin {
			admin = "1"
		}
		fmt.Fprintf(&sb, "%s:%s:%s\n", u.Login, admin, u.Hash)
	}
	return atomicfile.WriteFile(d.path("config", "users.txt"), []byte(sb.String()), 0o600)
}

// apiKey is a DSS API key; the secret is stored hashed.
type apiKey struct {
	ID      string    `json:"id"`
	Label   string    `json:"label"`
	Admin   bool      `json:"admin"`
	Hash    string    `json:"hash"`
	Created time.Time `json:"created"`
}

func (d dataDir) loadKeys() ([]apiKey, error) {
	b, err := os.ReadFile(d.path("config", "apikeys.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var keys []apiKey
	return keys, json.Unmarshal(b, &keys)
}

func (d dataDir) saveKeys(keys []apiKey) error {
	b, _ := json.MarshalIndent(keys, "", "  ")
	return atomicfile.WriteFile(d.path("config", "apikeys.json"), append(b, '\n'), 0o600)
}

// A fast work factor: the stand-in's passwords protect test data.
const hashIterations = 10_000

func hashPassword(pw string) (string, error) {
	salt := make([]byte, 16)
	if _, err := rand.Read(salt); err != nil {
		return "", err
	}
	dk, err := pbkdf2.Key(sha256.New, pw, salt, hashIterations, 32)
	if err != nil {
		return "", err
	}
	return base64.RawStdEncoding.EncodeToString(salt) + "$" + base64.RawStdEncoding.EncodeToString(dk), nil
}

func checkPassword(hash, pw string) bool {
	salt64, dk64, ok := strings.Cut(hash, "$")
	if !ok {
		return false
	}
	salt, err1 := base64.RawStdEncoding.DecodeString(salt64)
	want, err2 := base64.RawStdEncoding.DecodeString(dk64)
	if err1 != nil || err2 != nil {
		return false
	}
	got, err := pbkdf2.Key(sha256.New, pw, salt, hashIterations, len(want))
	return err == nil && subtle.ConstantTimeCompare(got, want) == 1
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%x", b)
}

func copyFile(src, dst string, perm os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp := dst + ".tmp"
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, perm)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, dst)
}

// readINI reads the values of an ini file as section.key.
func readINI(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]string{}
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = strings.TrimSpace(line[1 : len(line)-1])
		default:
			k, v, ok := strings.Cut(line, "=")
			if ok {
				out[section+"."+strings.TrimSpace(k)] = strings.TrimSpace(v)
			}
		}
	}
	return out, sc.Err()
}

// javaOpts are install.ini's [javaopts] keys DSS's regenerate-config
// turns into the processes' Java options, and the variable of each in
// bin/env-default.sh.
var javaOpts = []struct{ key, env string }{
	{"backend.xmx", "DKU_BACKEND_JAVA_OPTS"},
	{"jek.xmx", "DKU_JEK_JAVA_OPTS"},
	{"fek.xmx", "DKU_FEK_JAVA_OPTS"},
}

var reHeap = regexp.MustCompile(`^[1-9][0-9]*[kKmMgG]$`)

// regenerateConfig is dssadmin regenerate-config: it checks install.ini as
// DSS does and writes bin/env-default.sh from it (the heaps of
// [javaopts]), which bin/dss sources at start.
func (d dataDir) regenerateConfig() error {
	if _, _, err := d.settings(); err != nil {
		return err
	}
	return d.writeEnvDefault(true)
}

// writeEnvDefault writes bin/env-default.sh from install.ini's [javaopts];
// strict refuses a value that is not a heap size (leaving the file as it
// was), otherwise such a value is left out. Other [javaopts] keys (DSS
// has more: additional options) are not the stand-in's to check.
func (d dataDir) writeEnvDefault(strict bool) error {
	ini, err := readINI(d.path("install.ini"))
	if err != nil {
		return err
	}
	var b strings.Builder
	b.WriteString("# Generated by the DSS stand-in from install.ini (dssadmin regenerate-config); edit env-site.sh instead.\nexport DKU_STANDIN=1\n")
	for _, o := range javaOpts {
		v, ok := ini["javaopts."+o.key]
		if !ok {
			continue
		}
		if !reHeap.MatchString(v) {
			if strict {
				return fmt.Errorf("install.ini: [javaopts] %s = %q is not a Java heap size (such as 2g or 512m)", o.key, v)
			}
			continue
		}
		fmt.Fprintf(&b, "export %s=\"-Xmx%s\"\n", o.env, v)
	}
	return atomicfile.WriteFile(d.path("bin", "env-default.sh"), []byte(b.String()), 0o755)
}

func (d dataDir) settings() (port int, nodeType string, err error) {
	ini, err := readINI(d.path("install.ini"))
	if err != nil {
		return 0, "", err
	}
	port, err = strconv.Atoi(ini["server.port"])
	if err != nil || port < 1 || port > 65535 {
		return 0, "", fmt.Errorf("install.ini: server.port %q is not a port", ini["server.port"])
	}
	return port, ini["general.nodetype"], nil
}
