package cli

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/client"
)

// instanceColumns are fm instance list's: the instance, then its state as
// GET /fleet says it (withStatus), then where it lives.
var instanceColumns = []column{field("ID", "id"), field("LABEL", "label"), field("NODE", "dssNodeType"),
	field("STATE", "_state"), field("DSS", "_dss"), field("URL", "_url"), field("SEEN", "_seen"), field("VOLUME", "_volume"),
	field("NETWORK", "virtualNetworkLabel"), field("TEMPLATE", "instanceSettingsTemplateLabel")}

// withStatus adds to each listed instance what GET /fleet (with the same
// filters and page) says of it, for the table: its state and operation,
// DSS's version and state, its URL, how long ago its agent was heard from,
// and its data volume's use. An instance made between the two calls has
// empty cells.
func withStatus(ctx context.Context, c *client.Client, q url.Values, objs []map[string]any) error {
	var view api.Fleet
	if err := c.Do(ctx, http.MethodGet, "/fleet", q, nil, &view); err != nil {
		return err
	}
	rows := make(map[string]api.FleetRow, len(view.Instances))
	for _, r := range view.Instances {
		rows[r.ID] = r
	}
	now := time.Now()
	for _, o := range objs {
		r, ok := rows[cellText(o["id"])]
		if !ok {
			continue
		}
		state := r.State
		if r.Operation != nil && r.Operation.State == "running" {
			state += " (" + r.Operation.Kind + ")"
		}
		o["_state"] = state
		dss := r.DSSVersion
		if r.DSSState != "" && r.DSSState != "running" {
			dss += " " + r.DSSState
		}
		o["_dss"] = dss
		o["_url"] = r.PublicURL
		if r.LastSeen != nil {
			seen := ago(now.Sub(*r.LastSeen))
			if !r.AgentResponding && r.State == "running" {
				seen += " (silent)"
			}
			o["_seen"] = seen
		}
		if r.VolumeUsedRatio != nil {
			o["_volume"] = fmt.Sprintf("%.0f%%", *r.VolumeUsedRatio*100)
		}
	}
	return nil
}

// ago is a duration as a person reads it: 3s, 4m, 2h, 5d.
func ago(d time.Duration) string {
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", max(0, int(d.Seconds())))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}

var statusResource = &resource{command: "status", kind: "fleet", custom: runStatus}

// runStatus is fm status: the fleet summarised, what needs a look first.
func runStatus(ctx context.Context, env Env, r *resource, args []string) error {
	fs := flag.NewFlagSet("fm status", flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	var conn connFlags
	conn.register(fs)
	var state, label string
	fs.StringVar(&state, "state", "", "only instances in this state (or these, comma-separated)")
	fs.StringVar(&label, "label", "", "only instances whose label holds this, whatever its case")
	pos, err := ParseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usagef("usage: fm status [--state S] [--label L] [--output json]")
	}
	c, err := conn.client()
	if err != nil {
		return err
	}
	q := url.Values{"rows": {"false"}}
	for k, v := range map[string]string{"state": state, "label": label} {
		if v != "" {
			q.Set(k, v)
		}
	}
	var view api.Fleet
	if err := c.Do(ctx, http.MethodGet, "/fleet", q, nil, &view); err != nil {
		return err
	}
	if conn.output == "json" {
		return printJSON(env.Stdout, view.Summary)
	}
	printStatus(env.Stdout, view, colorful(env.Stdout))
	return nil
}

func printStatus(w io.Writer, view api.Fleet, color bool) {
	s := view.Summary
	// A count that needs a look is red on a terminal, and only there.
	problem := func(n int, what string) string {
		text := fmt.Sprintf("%d %s", n, what)
		if color && n > 0 {
			return "\x1b[31m" + text + "\x1b[0m"
		}
		return text
	}
	byState := ""
	if s.Instances > 0 {
		byState = " (" + counts(s.ByState) + ")"
	}
	fmt.Fprintf(w, "instances   %d%s\n", s.Instances, byState)
	fmt.Fprintf(w, "node types  %s\n", counts(s.ByNodeType))
	fmt.Fprintf(w, "DSS         %s\n", counts(s.ByDSSVersion))
	fmt.Fprintf(w, "health      %s, %s, %s, %s\n", problem(s.AgentsNotResponding, "agents not responding"),
		problem(s.DSSDown, "DSS down"), problem(s.VolumesAbove80Percent, "data volumes above 80%"),
		problem(s.FailedInstances, "failed"))
	fmt.Fprintf(w, "operations  %d running\n", s.OperationsRunning)
}

// counts is "a 3, b 1", largest first, or "none".
func counts(m map[string]int) string {
	if len(m) == 0 {
		return "none"
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if m[keys[i]] != m[keys[j]] {
			return m[keys[i]] > m[keys[j]]
		}
		return keys[i] < keys[j]
	})
	parts := make([]string, len(keys))
	for i, k := range keys {
		name := k
		if name == "" {
			name = "none"
		}
		parts[i] = fmt.Sprintf("%s %d", printable(name), m[k])
	}
	return strings.Join(parts, ", ")
}

// colorful says whether w is a terminal that takes colours: not a pipe or
// a file, and NO_COLOR (no-color.org) unset.
func colorful(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok || os.Getenv("NO_COLOR") != "" {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
