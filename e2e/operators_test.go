package e2e

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus"
)

// recipe is a line of docs/operators.md to run: a command, with the
// credentials of role, and follows if it keeps printing until stopped.
type recipe struct {
	role, line string
	follows    bool
}

// operatorRecipes reads the recipes of docs/operators.md: the lines of
// each ```sh block that a "<!-- recipes: ROLE -->" comment introduces.
// Every line of such a block must be a nats or fm command.
func operatorRecipes(t *testing.T) (doc string, recipes []recipe) {
	t.Helper()
	b, err := os.ReadFile("../docs/operators.md")
	if err != nil {
		t.Fatal(err)
	}
	role, inBlock := "", false
	sc := bufio.NewScanner(strings.NewReader(string(b)))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case strings.HasPrefix(line, "<!-- recipes: "):
			role = strings.TrimSuffix(strings.TrimPrefix(line, "<!-- recipes: "), " -->")
		case role != "" && line == "```sh":
			inBlock = true
		case inBlock && line == "```":
			inBlock, role = false, ""
		case inBlock && (strings.HasPrefix(line, "nats ") || strings.HasPrefix(line, "fm ")):
			cmd, comment, _ := strings.Cut(line, " # ")
			recipes = append(recipes, recipe{role: role, line: strings.TrimSpace(cmd), follows: strings.Contains(comment, "follows")})
		case inBlock && line != "":
			t.Errorf("docs/operators.md: a line of a recipe block is neither a nats nor an fm command: %s", line)
		}
	}
	return string(b), recipes
}

// TestOperatorRecipes runs every recipe of docs/operators.md with the real
// NATS CLI (and fm) against fm dev, a live instance's ids in place of the
// placeholders, with the credentials the page's own fm nats-creds lines
// made: each must succeed and print what it is for (recipeShows). The page
// must name every stream, bucket and object store FM declares.
func TestOperatorRecipes(t *testing.T) {
	natsBin, err := exec.LookPath("nats")
	if err != nil {
		t.Fatal("the NATS CLI is not on PATH; `make test` installs it (go install github.com/nats-io/natscli/nats@v0.5.0)")
	}
	doc, recipes := operatorRecipes(t)
	topo := bus.DefaultTopology()
	var names []string
	for _, kv := range topo.KeyValues() {
		names = append(names, kv.Bucket)
	}
	for _, st := range topo.Streams() {
		names = append(names, st.Name)
	}
	for _, store := range topo.ObjectStores() {
		names = append(names, store.Bucket)
	}
	for _, n := range names {
		if !strings.Contains(doc, "`"+n+"`") {
			t.Errorf("docs/operators.md does not name %s", n)
		}
	}

	data := filepath.Join(t.TempDir(), "fm")
	t.Cleanup(func() { StopUnder(data) })
	d := startDevAt(t, data, FreePort(t), "--heartbeat-seconds", "1")
	id := d.newInstance(t, "ops", "dss-13.4.0-standin")
	op := jsonField(t, d.fm(t, "instance", "provision", id, "--wait", "--output", "json"), "jobId")
	py := NewPython(t, d.url, d.keyFile)
	var f map[string]any
	py.Do(t, "GET", "/instances/"+id+"/actions/collect-diagnosis", "", &f)
	res, code := py.wait(t, f)
	diag, _ := res["result"].(map[string]any)
	object, _ := diag["object"].(string)
	if code != 200 || object == "" {
		t.Fatalf("collect-diagnosis: %d %v", code, res)
	}
	addr, err := os.ReadFile(filepath.Join(data, "nats.addr"))
	if err != nil {
		t.Fatal(err)
	}
	place := strings.NewReplacer("<instance>", id, "<op>", op, "<object>", object)
	shows := recipeShows(id, op, object)
	work := t.TempDir()
	// The credentials the page's fm block writes, in work.
	creds := map[string]string{"readonly": "ro.creds", "admin": "admin.creds", "monitor": "sys.creds"}
	writes := regexp.MustCompile(` -[oO] (\S+)`)
	for _, r := range recipes {
		line := place.Replace(r.line)
		t.Run(r.role+": "+r.line, func(t *testing.T) {
			want, ok := shows[r.line]
			if !ok {
				t.Fatalf("recipeShows has nothing to look for in the output of %q", r.line)
			}
			env := append(os.Environ(), "PATH="+filepath.Dir(natsBin)+":"+filepath.Dir(fmBin(t))+":"+os.Getenv("PATH"),
				"HOME="+work, "NATS_URL=nats://"+strings.TrimSpace(string(addr)))
			if r.role == "fm" {
				env = append(env, d.env...)
			} else if file, ok := creds[r.role]; !ok {
				t.Fatalf("no credentials for the role %q", r.role)
			} else {
				env = append(env, "NATS_CREDS="+filepath.Join(work, file))
			}
			out, errOut, err := runRecipe(line, work, env, r.follows, want)
			if written := writes.FindStringSubmatch(line); written != nil {
				b, rerr := os.ReadFile(filepath.Join(work, written[1]))
				if err != nil || rerr != nil || !strings.Contains(string(b), want) {
					t.Fatalf("%s: %v, %v; its file does not hold %q\n%s", line, err, rerr, want, errOut)
				}
				return
			}
			if err != nil || !strings.Contains(out, want) {
				t.Fatalf("%s: %v; want output with %q\nstdout:\n%s\nstderr:\n%s", line, err, want, out, errOut)
			}
		})
	}
}

// recipeShows is, for each recipe line of docs/operators.md, what its
// output (or the file it writes) must hold: a recipe that prints "no
// results" and exits 0 fails.
func recipeShows(instance, op, object string) map[string]string {
	return map[string]string{
		"fm nats-creds --role readonly -o ro.creds":                   "BEGIN NATS USER JWT",
		"fm nats-creds --role admin --expires-hours 1 -o admin.creds": "BEGIN NATS USER JWT",
		"fm nats-creds --role monitor -o sys.creds":                   "BEGIN NATS USER JWT",
		"nats stream ls":                                                       "FM_PROVISION",
		"nats kv ls":                                                           "fm_instances",
		"nats stream subjects KV_fm_instances":                                 "$KV.fm_instances." + instance,
		"nats kv get fm_instances <instance> --raw":                            `"label":"ops"`,
		"nats kv get fm_lifecycle <instance> --raw":                            `"state":"running"`,
		"nats kv get fm_ops <op> --raw":                                        `"state":"succeeded"`,
		"nats kv get fm_agents <instance> --raw":                               `"state":"running"`,
		"nats kv get fm_machines <instance> --raw":                             `"status":"running"`,
		"nats kv get fm_desired <instance> --raw":                              `"generation":1`,
		"nats stream get KV_fm_desired --last-for '$KV.fm_desired.<instance>'": `"generation":1`,
		"nats consumer info FM_EVENTS fm-server":                               "Unprocessed Messages",
		"nats consumer info FM_PROVISION fm-provisioner":                       "Unprocessed Messages",
		"nats stream info FM_AUDIT":                                            "fm.audit.",
		"nats stream get FM_AUDIT --last-for 'fm.audit.main.instances'":        `"object":"instances"`,
		"nats stream get FM_EVENTS --last-for 'fm.evt.<instance>.machine'":     `"instance":"` + instance + `"`,
		"nats kv ls fm_instances":                                              instance,
		"nats sub 'fm.hb.<instance>' --count 1":                                `"instance":"` + instance + `"`,
		"nats kv history fm_lifecycle <instance>":                              instance,
		"nats kv watch fm_desired <instance>":                                  `"generation":1`,
		"nats sub --stream FM_EVENTS --all 'fm.evt.<instance>.>'":              "fm.evt." + instance + ".",
		"nats sub --stream FM_AUDIT --all 'fm.audit.>'":                        "fm.audit.main.",
		"nats object ls fm_kits":                                               "dataiku-dss-13.4.0-standin.tar.gz",
		"nats object ls fm_diagnosis":                                          object,
		"nats object get fm_diagnosis <object> -O diagnosis.sealed":            "FMSEALS1", // a sealed stream's magic
		"nats server report jetstream":                                         "JetStream",
	}
}

// runRecipe runs line with bash in its own process group, killed whole
// when it ends: a recipe that follows (prints until stopped) is stopped
// once its output holds want, or after 30 s.
func runRecipe(line, dir string, env []string, follows bool, want string) (stdout, stderr string, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "-c", line)
	cmd.Dir, cmd.Env = dir, env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	out, errOut := &syncBuffer{}, &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, errOut
	if err := cmd.Start(); err != nil {
		return "", "", err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	if follows {
		for tick := time.NewTicker(50 * time.Millisecond); ; {
			select {
			case err := <-done:
				tick.Stop()
				return out.String(), errOut.String(), err
			case <-tick.C:
			}
			if strings.Contains(out.String(), want) {
				tick.Stop()
				cancel()
				<-done
				return out.String(), errOut.String(), nil
			}
		}
	}
	err = <-done
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) // what the command left behind
	return out.String(), errOut.String(), err
}
