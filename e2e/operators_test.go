package e2e

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/internal/cmdline"
)

// recipe is a line of docs/operators.md to run: a nats command, with the
// credentials of role, and follows if it keeps printing until stopped.
type recipe struct {
	role, line string
	follows    bool
}

// operatorRecipes reads the recipes of docs/operators.md: the lines of
// each ```sh block that a "<!-- recipes: ROLE -->" comment introduces.
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
		}
	}
	return string(b), recipes
}

// TestOperatorRecipes runs every recipe of docs/operators.md with the real
// NATS CLI against fm dev, with a live instance's ids in place of the
// placeholders, with the credentials the page says: each must succeed and
// print something (one that follows, within a few seconds). The page must
// name every stream, bucket and object store FM declares.
func TestOperatorRecipes(t *testing.T) {
	natsBin, err := exec.LookPath("nats")
	if err != nil {
		t.Fatal("the NATS CLI is not on PATH; `make test` installs it (go install github.com/nats-io/natscli/nats@v0.5.0)")
	}
	doc, recipes := operatorRecipes(t)
	if len(recipes) < 20 {
		t.Fatalf("docs/operators.md has %d recipes", len(recipes))
	}
	topo := bus.DefaultTopology()
	var names []string
	for _, kv := range topo.KeyValues() {
		names = append(names, kv.Bucket)
	}
	for _, st := range topo.Streams() {
		names = append(names, st.Name)
	}
	for _, os := range topo.ObjectStores() {
		names = append(names, os.Bucket)
	}
	for _, n := range names {
		if !strings.Contains(doc, "`"+n+"`") {
			t.Errorf("docs/operators.md does not name %s", n)
		}
	}

	data := filepath.Join(t.TempDir(), "fm")
	t.Cleanup(func() { cmdline.Stop(cmdline.Find(data), 2*time.Second) })
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
	creds := map[string]string{"readonly": "nats-readonly.creds", "admin": "nats-admin.creds", "fm": ""}
	work := t.TempDir()
	// A line that writes a file (-o, -O) must write it, rather than print.
	writes := regexp.MustCompile(` -[oO] (\S+)`)
	for _, r := range recipes {
		line := strings.NewReplacer("<instance>", id, "<op>", op, "<object>", object).Replace(r.line)
		t.Run(r.role+": "+line, func(t *testing.T) {
			file, ok := creds[r.role]
			if !ok {
				t.Fatalf("no credentials for the role %q", r.role)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			if r.follows {
				ctx, cancel = context.WithTimeout(context.Background(), 4*time.Second)
			}
			defer cancel()
			cmd := exec.CommandContext(ctx, "bash", "-c", line)
			cmd.Dir = work
			cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(natsBin)+":"+filepath.Dir(fmBin(t))+":"+os.Getenv("PATH"),
				"HOME="+work, "NATS_URL=nats://"+strings.TrimSpace(string(addr)))
			if file != "" {
				cmd.Env = append(cmd.Env, "NATS_CREDS="+filepath.Join(data, file))
			} else {
				cmd.Env = append(cmd.Env, d.env...)
			}
			var out, errOut strings.Builder
			cmd.Stdout, cmd.Stderr = &out, &errOut
			err := cmd.Run()
			stopped := r.follows && ctx.Err() != nil
			written := writes.FindStringSubmatch(line)
			if err != nil && !stopped || strings.TrimSpace(out.String()) == "" && written == nil {
				t.Fatalf("%s: %v\nstdout:\n%s\nstderr:\n%s", line, err, out.String(), errOut.String())
			}
			if written != nil {
				if st, err := os.Stat(filepath.Join(work, written[1])); err != nil || st.Size() == 0 {
					t.Fatalf("%s wrote no %s: %v\n%s", line, written[1], err, errOut.String())
				}
			}
			if testing.Verbose() {
				fmt.Printf("%s\n%s\n", line, firstLines(out.String(), 3))
			}
		})
	}
}

func firstLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	return strings.Join(lines[:min(n, len(lines))], "\n")
}
