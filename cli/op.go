package cli

import (
	"context"
	"flag"
	"net/http"
	"net/url"
	"strconv"

	"github.com/fleetmanager/fm/api"
)

// opResource is `fm op`: operations (futures) are read, waited for and
// aborted, never created or updated directly.
var opResource = &resource{
	command: "op", kind: "operation", path: "/futures",
	columns: []column{field("ID", "jobId"), field("KIND", "kind"), field("TARGET", "targetId"), field("STATE", "state"),
		field("STARTED", "startedAt"), field("BY", "startedBy")},
	custom: runOp,
}

func runOp(ctx context.Context, env Env, r *resource, args []string) error {
	const usage = "usage: fm op list [--target ID] [--state S] [--limit N] [--after ID] | get ID | wait ID | abort ID"
	if len(args) == 0 {
		return usagef(usage)
	}
	fs := flag.NewFlagSet("fm op "+args[0], flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	var conn connFlags
	conn.register(fs)
	switch args[0] {
	case "list":
		target := fs.String("target", "", "only operations on this object id")
		state := fs.String("state", "", "only operations in this state: running, succeeded, failed, aborted")
		limit := fs.Int("limit", 0, "at most this many, newest first (default: every one)")
		after := fs.String("after", "", "only those listed after this operation (the last id of the previous page)")
		pos, err := ParseFlags(fs, args[1:])
		if err != nil {
			return err
		}
		if len(pos) != 0 {
			return usagef(usage)
		}
		if *limit < 0 {
			return usagef("--limit must be at least 1")
		}
		c, err := conn.client()
		if err != nil {
			return err
		}
		q := url.Values{}
		if *limit > 0 {
			q.Set("limit", strconv.Itoa(*limit))
		}
		if *after != "" {
			q.Set("after", *after)
		}
		if *target != "" {
			q.Set("targetId", *target)
		}
		if *state != "" {
			q.Set("state", *state)
		}
		var ops []map[string]any
		if err := c.Do(ctx, http.MethodGet, r.path, q, nil, &ops); err != nil {
			return err
		}
		if conn.output == "json" {
			return printJSON(env.Stdout, ops)
		}
		return printTable(env.Stdout, r.columns, ops)
	case "get", "wait", "abort":
		id, c, err := r.parseWithID(fs, &conn, args[1:])
		if err != nil {
			return err
		}
		var f api.Future
		switch args[0] {
		case "get":
			// Peek, so that a failed operation is shown rather than raised.
			var obj map[string]any
			if err := c.Do(ctx, http.MethodGet, r.path+"/"+url.PathEscape(id), url.Values{"peek": {"True"}}, nil, &obj); err != nil {
				return err
			}
			return r.print(env, conn.output, obj)
		case "wait":
			if f, err = c.GetFuture(ctx, id, true); err != nil {
				return err
			}
			return finishOp(ctx, env, c, conn.output, f, true)
		default:
			if err := c.Do(ctx, http.MethodDelete, r.path+"/"+url.PathEscape(id), nil, nil, &f); err != nil {
				return err
			}
			return finishOp(ctx, env, c, conn.output, f, false)
		}
	}
	return usagef(usage)
}
