package cli

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"os"
	"strings"

	"github.com/fleetmanager/fm/api"
)

// alertResource is `fm alert`: the alerts FM raised (GET /alerts), and
// where it sends them (GET and PUT /alerting).
var alertResource = &resource{
	command: "alert", kind: "alert", path: "/alerts",
	columns: []column{field("NAME", "name"), field("STATUS", "status"), field("LABELS", "_labels"), field("SINCE", "startsAt"),
		field("TOLD", "_told"), field("SUMMARY", "_summary")},
	custom: runAlert,
}

func runAlert(ctx context.Context, env Env, r *resource, args []string) error {
	const usage = "usage: fm alert list | webhook [--set URL|none] [--secret-file FILE | --clear-secret]"
	if len(args) == 0 {
		return usagef(usage)
	}
	fs := flag.NewFlagSet("fm alert "+args[0], flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	var conn connFlags
	conn.register(fs)
	switch args[0] {
	case "list":
		pos, err := ParseFlags(fs, args[1:])
		if err != nil {
			return err
		}
		if len(pos) != 0 {
			return usagef(usage)
		}
		c, err := conn.client()
		if err != nil {
			return err
		}
		var alerts []map[string]any
		if err := c.Do(ctx, http.MethodGet, r.path, nil, nil, &alerts); err != nil {
			return err
		}
		if conn.output == "json" {
			return printJSON(env.Stdout, alerts)
		}
		for _, a := range alerts {
			labels, _ := a["labels"].(map[string]any)
			shown := map[string]any{}
			for k, v := range labels {
				if k != "alertname" && k != "severity" {
					shown[k] = v
				}
			}
			a["_labels"] = shown
			if ann, ok := a["annotations"].(map[string]any); ok {
				a["_summary"] = ann["summary"]
			}
			switch {
			case a["notified"] == true:
				a["_told"] = "yes"
			case a["gaveUp"] == true:
				a["_told"] = "gave up"
			case a["lastError"] != nil:
				a["_told"] = fmt.Sprintf("no (%v tries: %v)", a["attempts"], a["lastError"])
			default:
				a["_told"] = "no"
			}
		}
		return printTable(env.Stdout, r.columns, alerts)
	case "webhook":
		hookURL := fs.String("set", "", "the webhook's URL (\"none\" sends no alerts); without --set, --secret-file or --clear-secret, shows the settings")
		secretFile := fs.String("secret-file", "", "file holding the secret that signs each request (X-FM-Signature)")
		clearSecret := fs.Bool("clear-secret", false, "sign the requests no more")
		pos, err := ParseFlags(fs, args[1:])
		if err != nil {
			return err
		}
		if len(pos) != 0 || *secretFile != "" && *clearSecret {
			return usagef(usage)
		}
		c, err := conn.client()
		if err != nil {
			return err
		}
		var as api.AlertSettings
		if err := c.Do(ctx, http.MethodGet, "/alerting", nil, nil, &as); err != nil {
			return err
		}
		if *hookURL != "" || *secretFile != "" || *clearSecret {
			if *hookURL == "none" {
				as.WebhookURL = ""
			} else if *hookURL != "" {
				as.WebhookURL = *hookURL
			}
			if *secretFile != "" {
				b, err := os.ReadFile(*secretFile)
				if err != nil {
					return fmt.Errorf("--secret-file: %w", err)
				}
				if as.WebhookSecret = strings.TrimSpace(string(b)); as.WebhookSecret == "" {
					return usagef("--secret-file %s is empty", *secretFile)
				}
			}
			as.ClearWebhookSecret = *clearSecret
			if err := c.Do(ctx, http.MethodPut, "/alerting", nil, as, &as); err != nil {
				return err
			}
		}
		if conn.output == "json" {
			return printJSON(env.Stdout, as)
		}
		url := as.WebhookURL
		if url == "" {
			url = "(none: alerts are listed by fm alert list, and sent nowhere)"
		}
		fmt.Fprintf(env.Stdout, "webhook: %s\nsigned:  %s\n", printable(url), cellText(as.HasWebhookSecret))
		return nil
	}
	return usagef(usage)
}
