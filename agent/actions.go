package agent

import (
	"context"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/fleetmanager/fm/internal/atomicfile"
	"github.com/fleetmanager/fm/protocol"
)

// actionResult is what carrying out one setup action gave.
type actionResult struct {
	status  protocol.Status // ok, skipped, unsupported or failed
	message string
	output  string
	err     error // set when status is failed
}

func ok(format string, args ...any) actionResult {
	return actionResult{status: protocol.StatusOK, message: fmt.Sprintf(format, args...)}
}

func unsupported(format string, args ...any) actionResult {
	return actionResult{status: protocol.StatusUnsupported, message: "not supported on this image: " + fmt.Sprintf(format, args...)}
}

func failed(output string, err error) actionResult {
	return actionResult{status: protocol.StatusFailed, message: err.Error(), output: output, err: err}
}

// stageOf is when an action runs: its stage parameter, or, without one, the
// first stage its type may run at (after_install for most: they configure
// an installed DSS; after_dss_startup for those that use its admin API).
func stageOf(a protocol.SetupAction) protocol.Stage {
	var p struct {
		Stage protocol.Stage `json:"stage"`
	}
	if json.Unmarshal(a.Params, &p) == nil && p.Stage.Known() {
		return p.Stage
	}
	return protocol.StagesFor(a.Type)[0]
}

// ansibleFacts are the dataiku.dss facts RUN_ANSIBLE_TASKS sees.
type ansibleFacts struct {
	Port              int    `json:"port"`
	Datadir           string `json:"datadir"`
	Version           string `json:"version"`
	NodeID            string `json:"node_id"`
	NodeType          string `json:"node_type"`
	LogicalInstanceID string `json:"logical_instance_id"`
	InstanceType      string `json:"instance_type"`
	WasInstalled      bool   `json:"was_installed"`
	WasUpgraded       bool   `json:"was_upgraded"`
	APIKey            string `json:"api_key"`
}

// actionRunner carries out setup actions on the machine.
type actionRunner struct {
	m    *machine
	http *http.Client
	// lookPath finds the tools actions use (exec.LookPath).
	lookPath func(string) (string, error)
}

// run carries out one action. A disabled action is skipped; an action FM
// does not carry out on this image says so; neither is ever silent.
// tools are the programs the image offers (DSSTarget.Tools).
func (r *actionRunner) run(ctx context.Context, a protocol.SetupAction, index int, facts ansibleFacts, tools map[string]protocol.ToolSource) actionResult {
	if !a.Enabled {
		return actionResult{status: protocol.StatusSkipped, message: "disabled in the template"}
	}
	params, err := protocol.ParseParams(a.Type, a.Params)
	if err != nil {
		return failed("", fmt.Errorf("invalid parameters: %w", err))
	}
	id := fmt.Sprintf("action %d %s", index, a.Type)
	switch p := params.(type) {
	case *protocol.AddAuthorizedKeyParams:
		return r.addAuthorizedKey(ctx, id, p)
	case *protocol.AddSSHKeyParams:
		return r.addSSHKey(ctx, p)
	case *protocol.AddEnvVariablesParams:
		lines := make([]string, len(p.Variables))
		for i, kv := range p.Variables {
			lines[i] = "export " + kv.Key + "=" + shellQuote(kv.Value)
		}
		return r.editDSSFile(ctx, id, []string{"bin", "env-site.sh"}, lines, fmt.Sprintf("%d variables in bin/env-site.sh", len(lines)))
	case *protocol.AddPropertiesParams:
		lines := make([]string, len(p.Properties))
		for i, kv := range p.Properties {
			lines[i] = kv.Key + "=" + kv.Value
		}
		return r.editDSSFile(ctx, id, []string{"config", "dip.properties"}, lines, fmt.Sprintf("%d properties in config/dip.properties", len(lines)))
	case *protocol.SetupProxyParams:
		https, no := p.HTTPSProxy, p.NoProxy
		if https == "" {
			https = p.HTTPProxy
		}
		if no == "" {
			no = protocol.DefaultNoProxy
		}
		var lines []string
		for _, kv := range [][2]string{{"http_proxy", p.HTTPProxy}, {"https_proxy", https}, {"no_proxy", no}} {
			lines = append(lines, "export "+kv[0]+"="+shellQuote(kv[1]), "export "+strings.ToUpper(kv[0])+"="+shellQuote(kv[1]))
		}
		return r.editDSSFile(ctx, id, []string{"bin", "env-site.sh"}, lines, "proxy "+p.HTTPProxy+" in bin/env-site.sh")
	case *protocol.SetupAdvancedSecurityParams:
		basic, hsts := true, false
		if p.BasicHeaders != nil {
			basic = *p.BasicHeaders
		}
		if p.HSTS != nil {
			hsts = *p.HSTS
		}
		lines := []string{"dku.security.basicHeaders=" + strconv.FormatBool(basic), "dku.security.hsts=" + strconv.FormatBool(hsts)}
		return r.editDSSFile(ctx, id, []string{"config", "dip.properties"}, lines, fmt.Sprintf("basic headers %v, HSTS %v", basic, hsts))
	case *protocol.AddCAToTruststoreParams:
		return r.addCA(ctx, p)
	case *protocol.UpdateDSSPortParams:
		return r.updatePort(ctx, p)
	case *protocol.SetupMemorySettingsParams:
		return r.memorySettings(ctx, p)
	case *protocol.InstallJDBCDriverParams:
		return r.installJDBC(ctx, p)
	case *protocol.InstallSystemPackagesParams:
		return r.installPackages(ctx, p)
	case *protocol.RunAnsibleTasksParams:
		return r.runAnsible(ctx, p, facts)
	case *protocol.SetupInstanceNameParams:
		return r.instanceName(ctx, p)
	case *protocol.SetupSecureCookiesParams:
		return r.secureCookies(ctx, p)
	case *protocol.SetupUICustomizationParams:
		return r.uiCustomization(ctx, p)
	case *protocol.SetupRuntimeDatabaseParams:
		return r.runtimeDatabase(ctx, p)
	case *protocol.SetupMUSAutocreateParams:
		return r.musAutocreate(ctx, p)
	case *protocol.InstallDSSPluginsFromStoreParams:
		return r.pluginsFromStore(ctx, p)
	case *protocol.InstallCodeEnvWithPresetParams:
		return r.codeEnvPreset(ctx, p)
	case *protocol.SetupGraphicsExportParams:
		return r.commands(ctx, "graphics export", graphicsExport)
	case *protocol.SetupK8sAndSparkParams:
		return r.k8sAndSpark(ctx, id, p, tools)
	case *protocol.SetupNoneK8sAndSparkParams:
		return r.commands(ctx, "Spark without Kubernetes", sparkIntegration)
	case *protocol.InstallDeprecatedPythonParams:
		return r.deprecatedPython(ctx, p, tools)
	}
	return unsupported("%s is not carried out by this Fleet Manager's agent", a.Type)
}

// editDSSFile adds an FM block to a file of the DSS data directory, which
// must be installed.
func (r *actionRunner) editDSSFile(ctx context.Context, id string, rel []string, lines []string, what string) actionResult {
	if _, err := r.requireInstalled(); err != nil {
		return failed("", err)
	}
	path := filepath.Join(append([]string{r.m.dssDir}, rel...)...)
	if err := r.m.appendBlock(ctx, path, id, lines, 0o644); err != nil {
		return failed("", err)
	}
	return ok("%s", what)
}

func (r *actionRunner) addAuthorizedKey(ctx context.Context, id string, p *protocol.AddAuthorizedKeyParams) actionResult {
	dir := r.m.rooted("home", r.m.cfg.LoginUser, ".ssh")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return failed("", err)
	}
	path := filepath.Join(dir, "authorized_keys")
	if err := r.m.appendBlock(ctx, path, id, []string{strings.TrimSpace(p.SSHKey)}, 0o600); err != nil {
		return failed("", err)
	}
	r.m.chownToUser(r.m.cfg.LoginUser, dir, path)
	return ok("key added to ~%s/.ssh/authorized_keys", r.m.cfg.LoginUser)
}

func (r *actionRunner) addSSHKey(ctx context.Context, p *protocol.AddSSHKeyParams) actionResult {
	name := p.KeyName
	if name == "" {
		name = defaultKeyName(p.PrivateKey)
	}
	// The DSS account's home is its own: the key is written as it (filesFor).
	dir := r.m.rooted("home", r.m.cfg.DSSUser, ".ssh")
	if err := r.m.mkdirAll(ctx, dir, 0o700); err != nil {
		return failed("", err)
	}
	path := filepath.Join(dir, name)
	key := strings.TrimSpace(p.PrivateKey) + "\n"
	if err := r.m.writeFile(ctx, path, []byte(key), 0o600); err != nil {
		return failed("", err)
	}
	return ok("private key installed as ~%s/.ssh/%s", r.m.cfg.DSSUser, name)
}

// defaultKeyName names a private key file as ssh looks for it by default.
func defaultKeyName(key string) string {
	switch {
	case strings.Contains(key, "BEGIN RSA PRIVATE KEY"):
		return "id_rsa"
	case strings.Contains(key, "BEGIN EC PRIVATE KEY"):
		return "id_ecdsa"
	case strings.Contains(key, "BEGIN OPENSSH PRIVATE KEY"):
		switch t := openSSHKeyType(key); {
		case t == "ssh-rsa":
			return "id_rsa"
		case strings.HasPrefix(t, "ecdsa-"):
			return "id_ecdsa"
		}
		return "id_ed25519"
	}
	return "id_rsa"
}

// openSSHKeyType reads the key type from an openssh-key-v1 private key: its
// public key blob, stored unencrypted, starts with the type.
func openSSHKeyType(key string) string {
	b, _ := pem.Decode([]byte(key))
	if b == nil {
		return ""
	}
	data := b.Bytes
	const magic = "openssh-key-v1\x00"
	if !strings.HasPrefix(string(data), magic) {
		return ""
	}
	data = data[len(magic):]
	readString := func() []byte {
		if len(data) < 4 {
			return nil
		}
		n := binary.BigEndian.Uint32(data)
		if uint64(len(data)-4) < uint64(n) {
			data = nil
			return nil
		}
		s := data[4 : 4+n]
		data = data[4+n:]
		return s
	}
	readString() // cipher
	readString() // kdf
	readString() // kdf options
	if len(data) < 4 {
		return ""
	}
	data = data[4:] // number of keys
	pub := readString()
	if len(pub) < 4 {
		return ""
	}
	n := binary.BigEndian.Uint32(pub)
	if uint64(len(pub)-4) < uint64(n) {
		return ""
	}
	return string(pub[4 : 4+n])
}

// chownToUser gives paths to a user of a real machine; in a folder standing
// for one, files stay the agent's. The paths are in the user's home, where
// the user may have swapped a link in: the link itself changes owner, never
// what it leads to.
func (m *machine) chownToUser(name string, paths ...string) {
	if !m.isRealRoot() || os.Geteuid() != 0 {
		return
	}
	u, err := user.Lookup(name)
	if err != nil {
		return
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	for _, p := range paths {
		_ = os.Lchown(p, uid, gid)
	}
}

// addCA installs a CA certificate in the system trust store: the anchors
// folder of AlmaLinux (and Debian's equivalent), then the store's update
// command when the agent manages a real machine.
func (r *actionRunner) addCA(ctx context.Context, p *protocol.AddCAToTruststoreParams) actionResult {
	rest, certs := []byte(p.Certificate), 0
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		if _, err := x509.ParseCertificate(b.Bytes); err != nil {
			return failed("", fmt.Errorf("certificate %d of %s cannot be parsed: %w", certs+1, p.Name, err))
		}
		certs++
	}
	if certs == 0 {
		return failed("", fmt.Errorf("%s holds no PEM certificate", p.Name))
	}
	anchors := r.m.rooted("etc", "pki", "ca-trust", "source", "anchors")
	path := filepath.Join(anchors, "fm-"+p.Name+".pem")
	if err := atomicfile.WriteFile(path, []byte(strings.TrimSpace(p.Certificate)+"\n"), 0o644); err != nil {
		return failed("", err)
	}
	if !r.m.isRealRoot() {
		return ok("%d certificate(s) written to %s; the trust store is not rebuilt in a folder standing for a machine", certs, path)
	}
	for _, cmd := range [][]string{{"update-ca-trust", "extract"}, {"update-ca-certificates"}} {
		if _, err := r.lookPath(cmd[0]); err != nil {
			continue
		}
		if cmd[0] == "update-ca-certificates" {
			deb := filepath.Join("/usr/local/share/ca-certificates", "fm-"+p.Name+".crt")
			if err := atomicfile.WriteFile(deb, []byte(strings.TrimSpace(p.Certificate)+"\n"), 0o644); err != nil {
				return failed("", err)
			}
		}
		out, err := r.m.run(ctx, cmd[0], cmd[1:]...)
		if err != nil {
			return failed(out, err)
		}
		return ok("%d certificate(s) added to the system trust store (%s)", certs, cmd[0])
	}
	return failed("", errors.New("neither update-ca-trust nor update-ca-certificates is installed"))
}

func (r *actionRunner) updatePort(ctx context.Context, p *protocol.UpdateDSSPortParams) actionResult {
	if _, err := r.requireInstalled(); err != nil {
		return failed("", err)
	}
	cur, err := r.m.port()
	if err != nil {
		return failed("", err)
	}
	if cur != p.Port {
		if err := r.m.setPort(ctx, p.Port); err != nil {
			return failed("", err)
		}
	}
	// Every time: a kill between install.ini and the regeneration leaves
	// install.ini as asked and the configuration not regenerated.
	if out, err := r.regenerateConfig(ctx); err != nil {
		return failed(out, err)
	}
	if cur == p.Port {
		return ok("DSS already uses port %d", p.Port)
	}
	return ok("DSS base port changed from %d to %d", cur, p.Port)
}

// regenerateConfig runs DSS's bin/dssadmin regenerate-config, which
// rewrites what DSS generates from install.ini (the same files, unchanged,
// when install.ini did not change: DSS is then not restarted).
func (r *actionRunner) regenerateConfig(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, regenerateTime)
	defer cancel()
	return r.m.run(ctx, filepath.Join(r.m.dssDir, "bin", "dssadmin"), "regenerate-config")
}

// regenerateTime bounds dssadmin regenerate-config, which the machine is
// held for.
const regenerateTime = 5 * time.Minute

// memorySettings sets the heaps of install.ini's [javaopts] the action
// names, leaving the others, and has DSS regenerate its configuration
// from it (dssadmin regenerate-config), as Dataiku documents: DSS takes
// them at its next start, which a change of install.ini brings about
// (dssInputs). Heaps already set as asked change no file.
func (r *actionRunner) memorySettings(ctx context.Context, p *protocol.SetupMemorySettingsParams) actionResult {
	if _, err := r.requireInstalled(); err != nil {
		return failed("", err)
	}
	ini, err := r.m.readINI()
	if err != nil {
		return failed("", err)
	}
	var changed, said []string
	values := map[string]string{}
	for _, kv := range p.Heaps() {
		said = append(said, kv[0]+" "+kv[1])
		if ini["javaopts."+kv[0]] != kv[1] {
			values[kv[0]] = kv[1]
			changed = append(changed, kv[0])
		}
	}
	iniPath := filepath.Join(r.m.dssDir, "install.ini")
	was, err := r.m.readFile(ctx, iniPath)
	if err != nil {
		return failed("", err)
	}
	if len(changed) > 0 {
		if err := r.m.setINI(ctx, "javaopts", values, false); err != nil {
			return failed("", err)
		}
	}
	// Every time: a kill between install.ini and the regeneration leaves
	// install.ini as asked and the configuration not regenerated.
	if out, err := r.regenerateConfig(ctx); err != nil {
		// Refused: install.ini goes back to what DSS last took, so that a
		// replay does not find the heaps "already" set.
		if len(changed) > 0 {
			if werr := r.m.writeFile(ctx, iniPath, was, 0o644); werr != nil {
				out += "\n(install.ini could not be put back: " + werr.Error() + ")"
			}
		}
		return failed(out, err)
	}
	if len(changed) == 0 {
		return ok("DSS's heaps are already %s", strings.Join(said, ", "))
	}
	return ok("%s in install.ini [javaopts]; DSS's configuration regenerated", strings.Join(said, ", "))
}

// installPackages uses the machine's package manager.
func (r *actionRunner) installPackages(ctx context.Context, p *protocol.InstallSystemPackagesParams) actionResult {
	var argv []string
	switch pm := r.m.cfg.PackageManager; pm {
	case "none":
		return unsupported("system packages are not installed on this machine (package manager: none)")
	case "auto":
		if !r.m.isRealRoot() {
			return unsupported("this machine is a folder on the Fleet Manager host; its system packages are the host's")
		}
		for _, cand := range [][]string{{"dnf", "install", "-y"}, {"yum", "install", "-y"}, {"apt-get", "install", "-y"}} {
			if _, err := r.lookPath(cand[0]); err == nil {
				argv = cand
				break
			}
		}
		if argv == nil {
			return failed("", errors.New("no package manager (dnf, yum, apt-get) on this machine"))
		}
	default:
		argv = strings.Fields(pm)
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	out, err := r.m.run(ctx, argv[0], append(argv[1:], p.Packages...)...)
	if err != nil {
		return failed(out, err)
	}
	return actionResult{status: protocol.StatusOK, message: "installed " + strings.Join(p.Packages, ", "), output: out}
}

// runAnsible runs the tasks with ansible-playbook on this machine, with the
// dataiku.dss facts of Dataiku's agent.
func (r *actionRunner) runAnsible(ctx context.Context, p *protocol.RunAnsibleTasksParams, facts ansibleFacts) actionResult {
	bin, err := r.lookPath("ansible-playbook")
	if err != nil {
		return failed("", errors.New("ansible-playbook is not installed on this machine; RUN_ANSIBLE_TASKS needs Ansible"))
	}
	dir, err := os.MkdirTemp("", "fm-ansible-")
	if err != nil {
		return failed("", err)
	}
	defer os.RemoveAll(dir)
	vars, _ := json.Marshal(map[string]any{"dataiku": map[string]any{"dss": facts}})
	playbook := "- hosts: localhost\n  connection: local\n  gather_facts: false\n  vars_files:\n    - vars.json\n  tasks:\n    - import_tasks: tasks.yml\n"
	for name, content := range map[string]string{"vars.json": string(vars), "tasks.yml": p.AnsibleTasks, "playbook.yml": playbook} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			return failed("", err)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-i", "localhost,", "-c", "local", filepath.Join(dir, "playbook.yml"))
	out := &tailBuffer{max: maxOutput}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "ANSIBLE_NOCOLOR=1", "ANSIBLE_LOCAL_TEMP="+filepath.Join(dir, "tmp"),
		"ANSIBLE_REMOTE_TEMP="+filepath.Join(dir, "tmp"), "ANSIBLE_RETRY_FILES_ENABLED=0", "ANSIBLE_HOME="+filepath.Join(dir, "home"))
	if err := cmd.Run(); err != nil {
		return failed(out.String(), fmt.Errorf("ansible-playbook failed: %w", err))
	}
	return actionResult{status: protocol.StatusOK, message: "Ansible tasks ran", output: out.String()}
}
