package cli

import (
	"context"
	"flag"
	"net/http"
	"net/url"
	"strings"

	"github.com/fleetmanager/fm/api"
)

// lbResource is fm lb: load balancers' settings with the standard verbs,
// their nodes with add-node and remove-node, and what is in the cloud with
// their actions (apply is the API's update action: fm lb update changes
// the settings).
var lbResource = &resource{
	command: "lb", kind: "load balancer", path: "/load-balancers",
	columns: []column{field("ID", "id"), field("NAME", "name"), field("NETWORK", "virtualNetworkId"), field("STATE", "state"),
		field("ADDRESS", "address"), field("PUBLIC IP", "publicIpMode")},
	fields: []objField{
		{"name", "name", "string", "name"},
		{"description", "description", "string", "description"},
		{"network", "virtualNetworkId", "string", "virtual network id (its two subnets on AWS)"},
		{"certificate-arn", "awsCertificateARN", "string", "ACM certificate ARN of the HTTPS listener (HTTP is then redirected to HTTPS)"},
		{"public-ip", "publicIpMode", "string", "NO_PUBLIC_IP (internal), or DYNAMIC_PUBLIC_IP (internet-facing, as when not given)"},
		{"tags", "cloudTags", "map", "cloud tags, key=value,key=value"},
		{"fm-tags", "fmTags", "list", "comma-separated FM tags"},
	},
}

// lbActions maps fm lb verbs to the API's actions.
var lbActions = map[string]string{"provision": "provision", "apply": "update", "reprovision": "reprovision", "deprovision": "deprovision"}

func (r *resource) lbUsage() string {
	return "usage: fm lb list|get ID|create|update ID|delete ID|add-node ID HOSTNAME INSTANCE|remove-node ID HOSTNAME|" +
		"provision ID|apply ID|reprovision ID|deprovision ID|status ID [flags]"
}

// runLBVerb runs the verbs only load balancers have.
func runLBVerb(ctx context.Context, env Env, r *resource, verb string, args []string) (handled bool, err error) {
	fs := flag.NewFlagSet("fm lb "+verb, flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	var conn connFlags
	conn.register(fs)
	if action, ok := lbActions[verb]; ok {
		wait := fs.Bool("wait", false, "wait for the operation, showing its steps; exit non-zero if it fails")
		id, c, err := r.parseWithID(fs, &conn, args)
		if err != nil {
			return true, err
		}
		var f api.Future
		if err := c.Do(ctx, http.MethodPost, r.path+"/"+url.PathEscape(id)+"/actions/"+action, nil, nil, &f); err != nil {
			return true, err
		}
		return true, finishOp(ctx, env, c, conn.output, f, *wait)
	}
	switch verb {
	case "status":
		id, c, err := r.parseWithID(fs, &conn, args)
		if err != nil {
			return true, err
		}
		var obj map[string]any
		if err := c.Do(ctx, http.MethodGet, r.path+"/"+url.PathEscape(id)+"/physical/status", nil, nil, &obj); err != nil {
			return true, err
		}
		return true, r.print(env, conn.output, obj)
	case "add-node", "remove-node":
		pos, err := ParseFlags(fs, args)
		if err != nil {
			return true, err
		}
		if verb == "add-node" && len(pos) != 3 || verb == "remove-node" && len(pos) != 2 {
			return true, usagef("usage: fm lb add-node ID HOSTNAME INSTANCE | fm lb remove-node ID HOSTNAME (then fm lb apply ID)")
		}
		c, err := conn.client()
		if err != nil {
			return true, err
		}
		// As Dataiku's client does: the object read, changed, saved whole.
		var obj map[string]any
		if err := c.Do(ctx, http.MethodGet, r.path+"/"+url.PathEscape(pos[0]), nil, nil, &obj); err != nil {
			return true, err
		}
		nodes, _ := obj["nodes"].([]any)
		kept := []any{}
		found := false
		for _, n := range nodes {
			if m, ok := n.(map[string]any); ok && strings.EqualFold(m["hostname"].(string), pos[1]) {
				found = true
				continue
			}
			kept = append(kept, n)
		}
		switch {
		case verb == "remove-node" && !found:
			return true, usagef("load balancer %s has no node %s", pos[0], pos[1])
		case verb == "add-node" && found:
			return true, usagef("load balancer %s has a node %s already", pos[0], pos[1])
		case verb == "add-node":
			kept = append(kept, map[string]any{"hostname": pos[1], "instanceId": pos[2]})
		}
		obj["nodes"] = kept
		var out map[string]any
		if err := c.Do(ctx, http.MethodPut, r.path+"/"+url.PathEscape(pos[0]), nil, obj, &out); err != nil {
			return true, err
		}
		return true, r.print(env, conn.output, out)
	}
	return false, nil
}
