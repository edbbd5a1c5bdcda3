package cli

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/client"
)

// resource is one kind of object the CLI manages through the REST API. The
// verbs are the same for every kind; what differs is described here.
type resource struct {
	command string // fm <command> …
	kind    string // for messages
	path    string // collection path under the tenant prefix
	columns []column
	// fields are the flags that set fields of the object on create and
	// update.
	fields []objField
	// createQuery adds query parameters to a create (networks).
	createQuery func(fs *flag.FlagSet) func() url.Values
	// aliases maps extra verb names to the standard ones (image add/remove).
	aliases map[string]string
	// custom replaces the standard verbs (fm op).
	custom func(ctx context.Context, env Env, r *resource, args []string) error
}

// objField is a flag that sets one field of an object. key may be dotted
// (kit.path) to reach into a nested object.
type objField struct {
	flag, key, kind, usage string // kind: string, int, bool, list, map
}

var resources = []*resource{accountResource, networkResource, templateResource, instanceResource, lbResource, snapshotResource, imageResource, opResource,
	apikeyResource, auditResource, natsCredsResource, statusResource, alertResource, agentUpgradeResource}

func (r *resource) usage() string {
	if r.command == "instance" {
		return "usage: fm instance list|get ID|create|update ID|delete ID|status ID|provision ID|reprovision ID|deprovision ID|" +
			"start ID|stop ID|restart-dss ID|replay-setup-actions ID|upgrade-agent ID|reset-password ID|password ID|logs ID|diagnosis ID [flags]"
	}
	if r.command == "lb" {
		return r.lbUsage()
	}
	if r.command == "template" {
		return "usage: fm template list|get ID|create|update ID|delete ID|replay-setup-actions ID [flags]"
	}
	return fmt.Sprintf("usage: fm %s list|get ID|create|update ID|delete ID [flags]", r.command)
}

func (r *resource) run(ctx context.Context, env Env, args []string) error {
	if r.custom != nil {
		return r.custom(ctx, env, r, args)
	}
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		return usagef("%s", r.usage())
	}
	verb := args[0]
	if v, ok := r.aliases[verb]; ok {
		verb = v
	}
	if r.command == "instance" {
		if handled, err := runInstanceVerb(ctx, env, r, verb, args[1:]); handled {
			return err
		}
	}
	if r.command == "lb" {
		if handled, err := runLBVerb(ctx, env, r, verb, args[1:]); handled {
			return err
		}
	}
	if r.command == "template" {
		if handled, err := runTemplateVerb(ctx, env, r, verb, args[1:]); handled {
			return err
		}
	}
	fs := flag.NewFlagSet("fm "+r.command+" "+args[0], flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	var conn connFlags
	conn.register(fs)
	switch verb {
	case "list":
		// FM's own paging and filters, where the server has them.
		var limit int
		var after, state, label string
		if r.command == "instance" || r.command == "network" || r.command == "template" {
			fs.IntVar(&limit, "limit", 0, "at most this many, in id order (default: every one)")
			fs.StringVar(&after, "after", "", "only those whose id comes after this one (the last id of the previous page)")
		}
		if r.command == "instance" {
			fs.StringVar(&state, "state", "", "only instances in this state (or these, comma-separated: running,failed)")
			fs.StringVar(&label, "label", "", "only instances whose label holds this, whatever its case")
		}
		pos, err := ParseFlags(fs, args[1:])
		if err != nil {
			return err
		}
		if len(pos) != 0 {
			return usagef("fm %s list takes no arguments", r.command)
		}
		if limit < 0 {
			return usagef("--limit must be at least 1")
		}
		q := url.Values{}
		for k, v := range map[string]string{"after": after, "state": state, "label": label} {
			if v != "" {
				q.Set(k, v)
			}
		}
		if limit > 0 {
			q.Set("limit", strconv.Itoa(limit))
		}
		c, err := conn.client()
		if err != nil {
			return err
		}
		var objs []map[string]any
		if err := c.Do(ctx, http.MethodGet, r.path, q, nil, &objs); err != nil {
			return err
		}
		if conn.output == "json" {
			return printJSON(env.Stdout, objs)
		}
		if r.command == "instance" {
			if err := withStatus(ctx, c, q, objs); err != nil {
				return err
			}
		}
		return printTable(env.Stdout, r.columns, objs)
	case "get":
		id, c, err := r.parseWithID(fs, &conn, args[1:])
		if err != nil {
			return err
		}
		var obj map[string]any
		if err := c.Do(ctx, http.MethodGet, r.path+"/"+url.PathEscape(id), nil, nil, &obj); err != nil {
			return err
		}
		return r.print(env, conn.output, obj)
	case "create", "update":
		return r.write(ctx, env, fs, &conn, verb, args[1:])
	case "delete":
		wait := fs.Bool("wait", true, "wait for the deletion to finish")
		id, c, err := r.parseWithID(fs, &conn, args[1:])
		if err != nil {
			return err
		}
		var fut api.Future
		if err := c.Do(ctx, http.MethodDelete, r.path+"/"+url.PathEscape(id), nil, nil, &fut); err != nil {
			return err
		}
		return finishOp(ctx, env, c, conn.output, fut, *wait)
	}
	return usagef("unknown verb %q; %s", args[0], r.usage())
}

func (r *resource) parseWithID(fs *flag.FlagSet, conn *connFlags, args []string) (string, *client.Client, error) {
	pos, err := ParseFlags(fs, args)
	if err != nil {
		return "", nil, err
	}
	if len(pos) != 1 {
		return "", nil, usagef("fm %s %s needs exactly one id", r.command, fs.Name()[len("fm "+r.command+" "):])
	}
	c, err := conn.client()
	return pos[0], c, err
}

func (r *resource) print(env Env, output string, obj map[string]any) error {
	if output == "json" {
		return printJSON(env.Stdout, obj)
	}
	return printObject(env.Stdout, obj)
}

// write creates an object or updates one: the base is --file (if given) or,
// for an update, the current object; flags given on the line are applied on
// top. An update sends the revision it read, so a concurrent change is
// refused instead of overwritten.
func (r *resource) write(ctx context.Context, env Env, fs *flag.FlagSet, conn *connFlags, verb string, args []string) error {
	file := fs.String("file", "", "JSON file with the whole object (- for standard input); flags apply on top")
	values := make([]*string, len(r.fields))
	for i, f := range r.fields {
		values[i] = fs.String(f.flag, "", f.usage)
	}
	var query func() url.Values
	if verb == "create" && r.createQuery != nil {
		query = r.createQuery(fs)
	}
	pos, err := ParseFlags(fs, args)
	if err != nil {
		return err
	}
	if verb == "create" && len(pos) != 0 || verb == "update" && len(pos) != 1 {
		return usagef("usage: fm %s create [flags] | fm %s update ID [flags]", r.command, r.command)
	}
	c, err := conn.client()
	if err != nil {
		return err
	}
	obj := map[string]any{}
	if *file != "" {
		if obj, err = readObjectFile(*file); err != nil {
			return err
		}
	} else if verb == "update" {
		if err := c.Do(ctx, http.MethodGet, r.path+"/"+url.PathEscape(pos[0]), nil, nil, &obj); err != nil {
			return err
		}
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	for i, f := range r.fields {
		if !given[f.flag] {
			continue
		}
		if err := f.apply(obj, *values[i]); err != nil {
			return err
		}
	}
	var out map[string]any
	if verb == "create" {
		var q url.Values
		if query != nil {
			q = query()
		}
		err = c.Do(ctx, http.MethodPost, r.path, q, obj, &out)
	} else {
		err = c.Do(ctx, http.MethodPut, r.path+"/"+url.PathEscape(pos[0]), nil, obj, &out)
	}
	if err != nil {
		return err
	}
	return r.print(env, conn.output, out)
}

func readObjectFile(name string) (map[string]any, error) {
	var rd io.Reader = os.Stdin
	if name != "-" {
		f, err := os.Open(name)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		rd = f
	}
	var obj map[string]any
	if err := json.NewDecoder(rd).Decode(&obj); err != nil {
		return nil, fmt.Errorf("%s: not a JSON object: %w", name, err)
	}
	return obj, nil
}

// apply sets the field from the flag's text.
func (f objField) apply(obj map[string]any, text string) error {
	var v any
	switch f.kind {
	case "string":
		v = text
	case "int":
		n, err := strconv.Atoi(text)
		if err != nil {
			return usagef("--%s: %q is not a whole number", f.flag, text)
		}
		v = n
	case "bool":
		b, err := strconv.ParseBool(text)
		if err != nil {
			return usagef("--%s: %q is not true or false", f.flag, text)
		}
		v = b
	case "list":
		list := []string{}
		for _, s := range strings.Split(text, ",") {
			if s = strings.TrimSpace(s); s != "" {
				list = append(list, s)
			}
		}
		v = list
	case "map":
		m := map[string]any{}
		for _, kv := range strings.Split(text, ",") {
			if strings.TrimSpace(kv) == "" {
				continue
			}
			k, val, ok := strings.Cut(kv, "=")
			if !ok {
				return usagef("--%s: %q is not key=value", f.flag, kv)
			}
			m[strings.TrimSpace(k)] = strings.TrimSpace(val)
		}
		v = m
	default:
		return fmt.Errorf("field %s: unknown kind %s", f.key, f.kind)
	}
	keys := strings.Split(f.key, ".")
	for _, k := range keys[:len(keys)-1] {
		sub, ok := obj[k].(map[string]any)
		if !ok {
			sub = map[string]any{}
			obj[k] = sub
		}
		obj = sub
	}
	obj[keys[len(keys)-1]] = v
	return nil
}

// finishOp prints an operation, after waiting for it to end if asked, and
// showing each of its steps as they come.
func finishOp(ctx context.Context, env Env, c *client.Client, output string, f api.Future, wait bool) error {
	var err error
	if wait {
		f, err = c.Wait(ctx, f, time.Second, stepPrinter(env, output))
	}
	if output == "json" {
		if perr := printJSON(env.Stdout, f); perr != nil {
			return perr
		}
	} else {
		fmt.Fprintf(env.Stdout, "operation %s: %s\n", f.JobID, f.State)
	}
	return err
}

// stepPrinter shows an operation's new steps on stderr as client.Wait sees
// them (nothing for --output json). A long step's progress is one step the
// server rewrites in place (a kit's download: "kit: 120 MiB of 270 MiB
// (44%)"): shown again when it changed. The server keeps an operation's
// last 200 steps: the new ones are those after the last one shown, found
// from the end.
func stepPrinter(env Env, output string) func(api.Future) {
	var last *api.ProgressStep // the last step shown, as it was
	show := func(s api.ProgressStep) {
		fmt.Fprintf(env.Stderr, "%s  %-11s %s  %s\n", s.Time.Local().Format("15:04:05"),
			printable(s.Status), printable(s.Name), printable(s.Message))
		last = &s
	}
	return func(f api.Future) {
		if output == "json" {
			return
		}
		steps := f.Progress.Steps
		from := 0
		if last != nil {
			from = 0 // not found: trimmed past it, everything is new
			for i := len(steps) - 1; i >= 0; i-- {
				s := steps[i]
				if s.Name != last.Name || s.Status != last.Status {
					continue
				}
				if s.Message == last.Message && s.Time.Equal(last.Time) {
					from = i + 1
					break
				}
				if s.Status == "progress" && !s.Time.Before(last.Time) {
					from = i // the same step, further on: shown again
					break
				}
			}
		}
		for _, s := range steps[from:] {
			// Steps say what agents and provisioners reported.
			show(s)
		}
	}
}
