package cli

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/fleetmanager/fm/internal/atomicfile"
)

// apikeyResource is `fm apikey`: API keys and their roles (admin only).
var apikeyResource = &resource{
	command: "apikey", kind: "API key", path: "/api-keys",
	columns: []column{field("ID", "id"), field("LABEL", "label"), field("ROLE", "role"), field("CREATED", "createdAt"),
		field("BY", "createdBy"), field("REVOKED", "revokedAt")},
	custom: runAPIKey,
}

func runAPIKey(ctx context.Context, env Env, r *resource, args []string) error {
	const usage = "usage: fm apikey list | create --label L --role admin|operator|viewer | revoke ID"
	if len(args) == 0 {
		return usagef(usage)
	}
	fs := flag.NewFlagSet("fm apikey "+args[0], flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	var conn connFlags
	conn.register(fs)
	switch args[0] {
	case "list":
		if _, err := ParseFlags(fs, args[1:]); err != nil {
			return err
		}
		c, err := conn.client()
		if err != nil {
			return err
		}
		var keys []map[string]any
		if err := c.Do(ctx, http.MethodGet, r.path, nil, nil, &keys); err != nil {
			return err
		}
		if conn.output == "json" {
			return printJSON(env.Stdout, keys)
		}
		return printTable(env.Stdout, r.columns, keys)
	case "create":
		label := fs.String("label", "", "what the key is for")
		role := fs.String("role", "viewer", "admin, operator or viewer")
		if _, err := ParseFlags(fs, args[1:]); err != nil {
			return err
		}
		c, err := conn.client()
		if err != nil {
			return err
		}
		var k map[string]any
		if err := c.Do(ctx, http.MethodPost, r.path, nil, map[string]string{"label": *label, "role": *role}, &k); err != nil {
			return err
		}
		// The key file format of Dataiku's tooling; the secret is shown once.
		return printJSON(env.Stdout, map[string]any{"id": k["id"], "secret": k["secret"], "role": k["role"], "label": k["label"]})
	case "revoke":
		id, c, err := r.parseWithID(fs, &conn, args[1:])
		if err != nil {
			return err
		}
		var k map[string]any
		if err := c.Do(ctx, http.MethodDelete, r.path+"/"+url.PathEscape(id), nil, nil, &k); err != nil {
			return err
		}
		return r.print(env, conn.output, k)
	}
	return usagef(usage)
}

// auditResource is `fm audit`: the audit trail (admin only).
var auditResource = &resource{
	command: "audit", kind: "audit record", path: "/audit",
	columns: []column{field("SEQ", "seq"), field("TIME", "time"), field("WHO", "who"), field("FROM", "from"),
		field("ACTION", "action"), field("OUTCOME", "outcome"), field("STATUS", "status")},
	custom: runAudit,
}

func runAudit(ctx context.Context, env Env, r *resource, args []string) error {
	fs := flag.NewFlagSet("fm audit", flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	var conn connFlags
	conn.register(fs)
	limit := fs.Int("limit", 50, "how many of the last records to show")
	object := fs.String("object", "", "only records about this kind of object (instances, api-keys, credentials, …)")
	follow := fs.Bool("follow", false, "keep printing new records until interrupted")
	pos, err := ParseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usagef("usage: fm audit [--limit N] [--object KIND] [--follow]")
	}
	c, err := conn.client()
	if err != nil {
		return err
	}
	q := url.Values{"limit": {strconv.Itoa(*limit)}}
	if *object != "" {
		q.Set("object", *object)
	}
	// Following one kind of object, the trail's end is read before each
	// page: a page with no record of that kind reads on from there next
	// time, not from where following began (the trail grows meanwhile).
	// Read before the page, it cannot pass a record the page did not see.
	trailEnd := func() (uint64, error) {
		var last []map[string]any
		if err := c.Do(ctx, http.MethodGet, r.path, url.Values{"limit": {"1"}}, nil, &last); err != nil {
			return 0, err
		}
		if len(last) == 1 {
			if seq, ok := auditSeq(last[0]); ok {
				return seq, nil
			}
		}
		return 0, nil
	}
	headerDone := false
	for {
		end := uint64(0)
		if *follow && *object != "" {
			var err error
			if end, err = trailEnd(); err != nil {
				return err
			}
		}
		var recs []map[string]any
		if err := c.Do(ctx, http.MethodGet, r.path, q, nil, &recs); err != nil {
			return err
		}
		if conn.output == "json" {
			for _, rec := range recs {
				if err := printJSON(env.Stdout, rec); err != nil {
					return err
				}
			}
		} else if len(recs) > 0 || !headerDone {
			cols := r.columns
			if headerDone {
				cols = nil
			}
			if err := printAuditRows(env, r.columns, cols != nil, recs); err != nil {
				return err
			}
			headerDone = true
		}
		if len(recs) > 0 {
			seq, ok := auditSeq(recs[len(recs)-1])
			if !ok {
				return fmt.Errorf("the audit record %v has no sequence to read on from", recs[len(recs)-1]["id"])
			}
			q.Set("after", strconv.FormatUint(seq, 10))
			q.Set("limit", "1000")
		} else if after, _ := strconv.ParseUint(q.Get("after"), 10, 64); !q.Has("after") || end > after {
			q.Set("after", strconv.FormatUint(end, 10))
			q.Set("limit", "1000")
		}
		if !*follow {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Second):
		}
	}
}

// auditSeq is an audit record's sequence in the trail. JSON gives a
// float64: exact for every sequence below 2^53, and written back as an
// integer (fmt.Sprint would write 1e+06).
func auditSeq(rec map[string]any) (uint64, bool) {
	seq, ok := rec["seq"].(float64)
	return uint64(seq), ok
}

func printAuditRows(env Env, cols []column, header bool, recs []map[string]any) error {
	if header {
		return printTable(env.Stdout, cols, recs)
	}
	for _, rec := range recs {
		line := ""
		for i, c := range cols {
			if i > 0 {
				line += "  "
			}
			line += c.cell(rec)
		}
		fmt.Fprintln(env.Stdout, line)
	}
	return nil
}

// natsCredsResource is `fm nats-creds`: NATS credentials minted by FM for an
// operator or a provisioner run on its own (admin only).
var natsCredsResource = &resource{
	command: "nats-creds", kind: "NATS credentials", path: "/nats-credentials",
	custom: runNATSCreds,
}

func runNATSCreds(ctx context.Context, env Env, r *resource, args []string) error {
	fs := flag.NewFlagSet("fm nats-creds", flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	var conn connFlags
	conn.register(fs)
	role := fs.String("role", "readonly", "readonly (look at streams and buckets), admin (everything), provisioner, "+
		"or monitor (the servers' state: nats server report jetstream)")
	hours := fs.Int("expires-hours", 24*30, "hours until the credentials expire; 0 never")
	out := fs.String("o", "", "write the credentials to this file (mode 0600) instead of standard output")
	pos, err := ParseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usagef("usage: fm nats-creds --role readonly|admin|provisioner|monitor [--expires-hours N] [-o FILE]")
	}
	c, err := conn.client()
	if err != nil {
		return err
	}
	var resp struct {
		Credentials string `json:"credentials"`
		User        string `json:"user"`
		Expires     string `json:"expires"`
	}
	if err := c.Do(ctx, http.MethodPost, r.path, nil, map[string]any{"role": *role, "expiresHours": *hours}, &resp); err != nil {
		return err
	}
	if *out == "" {
		_, err := fmt.Fprint(env.Stdout, resp.Credentials)
		return err
	}
	if err := atomicfile.WriteFile(*out, []byte(resp.Credentials), 0o600); err != nil {
		return err
	}
	_, err = fmt.Fprintf(env.Stdout, "wrote %s credentials (user %s) to %s\n", *role, resp.User, *out)
	return err
}
