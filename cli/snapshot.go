package cli

import (
	"context"
	"flag"
	"net/http"
	"net/url"

	"github.com/fleetmanager/fm/api"
)

// snapshotResource is `fm snapshot`: the snapshots of an instance's data
// volume.
var snapshotResource = &resource{
	command: "snapshot", kind: "snapshot",
	columns: []column{field("ID", "id"), field("STATE", "state"), field("REASON", "reasonForSnapshot"), field("AUTOMATED", "automated"),
		field("DSS", "dssVersion"), field("STORE", "store"), field("CREATED", "createdAt")},
	custom: runSnapshot,
}

func runSnapshot(ctx context.Context, env Env, r *resource, args []string) error {
	const usage = "usage: fm snapshot list INSTANCE | get INSTANCE SNAPSHOT | create INSTANCE [--reason R] | " +
		"delete INSTANCE SNAPSHOT | restore INSTANCE SNAPSHOT [--allow-downgrade]"
	if len(args) == 0 {
		return usagef(usage)
	}
	verb := args[0]
	fs := flag.NewFlagSet("fm snapshot "+verb, flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	var conn connFlags
	conn.register(fs)
	wait := fs.Bool("wait", false, "wait for the operation, showing its steps; exit non-zero if it fails")
	reason := fs.String("reason", "", "create: why the snapshot is taken")
	allowDowngrade := fs.Bool("allow-downgrade", false, "restore: allow a snapshot of a newer DSS than the instance's image")
	pos, err := ParseFlags(fs, args[1:])
	if err != nil {
		return err
	}
	want := map[string]int{"list": 1, "create": 1, "get": 2, "delete": 2, "restore": 2}[verb]
	if want == 0 {
		return usagef("fm snapshot: unknown verb %q; %s", verb, usage)
	}
	if len(pos) != want {
		return usagef("fm snapshot %s needs %d ids; %s", verb, want, usage)
	}
	c, err := conn.client()
	if err != nil {
		return err
	}
	base := "/instances/" + url.PathEscape(pos[0]) + "/snapshots"
	one := ""
	if want == 2 {
		one = base + "/" + url.PathEscape(pos[1])
	}
	switch verb {
	case "list":
		var list []map[string]any
		if err := c.Do(ctx, http.MethodGet, base, nil, nil, &list); err != nil {
			return err
		}
		if conn.output == "json" {
			return printJSON(env.Stdout, list)
		}
		return printTable(env.Stdout, r.columns, list)
	case "get":
		var sn map[string]any
		if err := c.Do(ctx, http.MethodGet, one, nil, nil, &sn); err != nil {
			return err
		}
		return r.print(env, conn.output, sn)
	case "create":
		q := url.Values{}
		if *reason != "" {
			q.Set("reasonForSnapshot", *reason)
		}
		var sn api.Snapshot
		if err := c.Do(ctx, http.MethodPost, base, q, nil, &sn); err != nil {
			return err
		}
		if !*wait {
			return printJSON(env.Stdout, sn)
		}
		return finishOp(ctx, env, c, conn.output, api.Future{JobID: sn.FutureID}, true)
	case "delete":
		var f api.Future
		if err := c.Do(ctx, http.MethodDelete, one, nil, nil, &f); err != nil {
			return err
		}
		return finishOp(ctx, env, c, conn.output, f, *wait)
	default: // restore
		var q url.Values
		if *allowDowngrade {
			q = url.Values{"allowDowngrade": {"True"}}
		}
		var f api.Future
		if err := c.Do(ctx, http.MethodPost, one+"/reprovision", q, nil, &f); err != nil {
			return err
		}
		return finishOp(ctx, env, c, conn.output, f, *wait)
	}
}
