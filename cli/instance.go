package cli

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/fleetmanager/fm/api"
)

// instanceActions are the lifecycle verbs of `fm instance`, each a GET of
// /instances/{id}/actions/<action> returning a future.
var instanceActions = map[string]string{
	"provision":            "reprovision", // the first reprovision provisions
	"reprovision":          "reprovision",
	"deprovision":          "deprovision",
	"start":                "start",
	"stop":                 "stop",
	"restart-dss":          "restart-dss",
	"replay-setup-actions": "replay-setup-actions",
	"upgrade-agent":        "upgrade-agent",
}

// runInstanceVerb runs the verbs `fm instance` has beyond the standard
// ones; handled reports whether verb was one of them.
func runInstanceVerb(ctx context.Context, env Env, r *resource, verb string, args []string) (handled bool, err error) {
	fs := flag.NewFlagSet("fm instance "+verb, flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	var conn connFlags
	conn.register(fs)
	wait := fs.Bool("wait", false, "wait for the operation, showing its steps; exit non-zero if it fails")
	if action, ok := instanceActions[verb]; ok {
		allowDowngrade := false
		if action == "reprovision" {
			fs.BoolVar(&allowDowngrade, "allow-downgrade", false, "try an image older than the installed DSS")
		}
		id, c, err := r.parseWithID(fs, &conn, args)
		if err != nil {
			return true, err
		}
		var q url.Values
		if allowDowngrade {
			q = url.Values{"allowDowngrade": {"True"}}
		}
		var f api.Future
		if err := c.Do(ctx, http.MethodGet, "/instances/"+url.PathEscape(id)+"/actions/"+action, q, nil, &f); err != nil {
			return true, err
		}
		return true, finishOp(ctx, env, c, conn.output, f, *wait)
	}
	switch verb {
	case "delete":
		force := fs.Bool("force", false, "delete even with a machine (it is deprovisioned first)")
		keep := fs.Bool("keep-volume", false, "keep the data volume")
		id, c, err := r.parseWithID(fs, &conn, args)
		if err != nil {
			return true, err
		}
		q := url.Values{}
		if *force {
			q.Set("force", "True")
		}
		if *keep {
			q.Set("keepVolume", "True")
		}
		var f api.Future
		if err := c.Do(ctx, http.MethodGet, "/instances/"+url.PathEscape(id)+"/actions/delete", q, nil, &f); err != nil {
			return true, err
		}
		return true, finishOp(ctx, env, c, conn.output, f, *wait)
	case "logs":
		source := fs.String("source", "", "agent or dss (default: both, each line prefixed with its source)")
		since := fs.String("since", "10m", "from this long ago (10m, 2h) or this time (RFC 3339)")
		follow := fs.Bool("follow", false, "keep printing new lines until interrupted")
		id, c, err := r.parseWithID(fs, &conn, args)
		if err != nil {
			return true, err
		}
		return true, followLogs(ctx, env.Stdout, c, logsRequest{id: id, source: *source, since: *since, follow: *follow,
			jsonLines: conn.output == "json", interval: time.Second})
	case "diagnosis":
		out := fs.String("out", "", "file to write the bundle to (default ./diagnosis-<instance>-<name>)")
		name := fs.String("name", "", "download this bundle (see --list) instead of collecting a new one")
		list := fs.Bool("list", false, "list the instance's bundles (kept 7 days)")
		id, c, err := r.parseWithID(fs, &conn, args)
		if err != nil {
			return true, err
		}
		return true, runDiagnosis(ctx, env, c, conn.output, id, *name, *out, *list)
	case "status":
		id, c, err := r.parseWithID(fs, &conn, args)
		if err != nil {
			return true, err
		}
		var st map[string]any
		if err := c.Do(ctx, http.MethodGet, "/instances/"+url.PathEscape(id)+"/status", nil, nil, &st); err != nil {
			return true, err
		}
		return true, r.print(env, conn.output, st)
	case "password":
		id, c, err := r.parseWithID(fs, &conn, args)
		if err != nil {
			return true, err
		}
		var pw map[string]any
		if err := c.Do(ctx, http.MethodGet, "/instances/"+url.PathEscape(id)+"/actions/get-initial-password", nil, nil, &pw); err != nil {
			return true, err
		}
		if conn.output == "json" {
			return true, printJSON(env.Stdout, pw)
		}
		fmt.Fprintf(env.Stdout, "%v: %v\n(FM gives the initial password once; set a new one with fm instance reset-password)\n", pw["userName"], pw["password"])
		return true, nil
	case "reset-password":
		user := fs.String("user", "admin", "DSS user")
		pwFlag := fs.String("password", "-", "new password; - reads it from standard input")
		id, c, err := r.parseWithID(fs, &conn, args)
		if err != nil {
			return true, err
		}
		pw := *pwFlag
		if pw == "-" {
			line, err := bufio.NewReader(os.Stdin).ReadString('\n')
			if err != nil && line == "" {
				return true, usagef("no password on standard input")
			}
			pw = strings.TrimRight(line, "\r\n")
		}
		var f api.Future
		body := map[string]string{"userName": *user, "password": pw}
		if err := c.Do(ctx, http.MethodPost, "/instances/"+url.PathEscape(id)+"/actions/reset-user-password", nil, body, &f); err != nil {
			return true, err
		}
		return true, finishOp(ctx, env, c, conn.output, f, *wait)
	}
	return false, nil
}
