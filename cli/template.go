package cli

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"net/url"

	"github.com/fleetmanager/fm/api"
)

// runTemplateVerb runs the verbs only templates have: replay-setup-actions
// on every instance made from the template (FM's own call).
func runTemplateVerb(ctx context.Context, env Env, r *resource, verb string, args []string) (handled bool, err error) {
	if verb != "replay-setup-actions" {
		return false, nil
	}
	fs := flag.NewFlagSet("fm template "+verb, flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	var conn connFlags
	conn.register(fs)
	id, c, err := r.parseWithID(fs, &conn, args)
	if err != nil {
		return true, err
	}
	var out api.TemplateReplay
	if err := c.Do(ctx, http.MethodPost, r.path+"/"+url.PathEscape(id)+"/actions/replay-setup-actions", nil, nil, &out); err != nil {
		return true, err
	}
	if conn.output == "json" {
		return true, printJSON(env.Stdout, out)
	}
	fmt.Fprintf(env.Stdout, "setup actions replayed on %d instance(s) of template %s (fm op list --state running); %d skipped\n",
		len(out.Futures), out.TemplateID, len(out.Skipped))
	if len(out.Skipped) == 0 {
		return true, nil
	}
	rows := make([]map[string]any, len(out.Skipped))
	for i, s := range out.Skipped {
		rows[i] = map[string]any{"instanceId": s.InstanceID, "why": s.Error.DetailedMessage}
	}
	return true, printTable(env.Stdout, []column{field("SKIPPED", "instanceId"), field("WHY", "why")}, rows)
}
