package cli

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/client"
)

// agentUpgradeResource is `fm agent-upgrade`: the rollout of the agent
// binary FM serves to the fleet's machines, one batch at a time (GET,
// POST and DELETE /agent-upgrade).
var agentUpgradeResource = &resource{command: "agent-upgrade", kind: "agent upgrade", path: "/agent-upgrade", custom: runAgentUpgrade}

const agentUpgradeUsage = "usage: fm agent-upgrade start [--batch N] [--max-failures N] [--instance ID]... [--wait] | status [--wait] | stop"

// instanceList is a repeatable --instance flag.
type instanceList []string

func (l *instanceList) String() string     { return strings.Join(*l, ",") }
func (l *instanceList) Set(v string) error { *l = append(*l, v); return nil }

func runAgentUpgrade(ctx context.Context, env Env, r *resource, args []string) error {
	if len(args) == 0 {
		return usagef(agentUpgradeUsage)
	}
	fs := flag.NewFlagSet("fm agent-upgrade "+args[0], flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	var conn connFlags
	conn.register(fs)
	var (
		req  api.AgentUpgradeRequest
		ids  instanceList
		wait *bool
	)
	switch args[0] {
	case "start":
		fs.IntVar(&req.BatchSize, "batch", 1, "how many instances' agents are upgraded at a time")
		fs.IntVar(&req.MaxFailures, "max-failures", 0, "how many may fail before no further batch starts")
		fs.Var(&ids, "instance", "an instance to upgrade (repeat it; default: every instance)")
		wait = fs.Bool("wait", false, "wait for the upgrade to end, showing its progress; exit non-zero unless it succeeded")
	case "status":
		wait = fs.Bool("wait", false, "wait for the upgrade to end, showing its progress; exit non-zero unless it succeeded")
	case "stop":
	default:
		return usagef(agentUpgradeUsage)
	}
	pos, err := ParseFlags(fs, args[1:])
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usagef(agentUpgradeUsage)
	}
	c, err := conn.client()
	if err != nil {
		return err
	}
	var ru api.AgentUpgrade
	switch args[0] {
	case "start":
		req.InstanceIDs = ids
		err = c.Do(ctx, http.MethodPost, r.path, nil, req, &ru)
	case "status":
		err = c.Do(ctx, http.MethodGet, r.path, nil, nil, &ru)
	case "stop":
		err = c.Do(ctx, http.MethodDelete, r.path, nil, nil, &ru)
	}
	if err != nil {
		return err
	}
	if wait != nil && *wait {
		if ru, err = waitAgentUpgrade(ctx, env, c, r.path, ru, conn.output); err != nil {
			return err
		}
	}
	if conn.output == "json" {
		if err := printJSON(env.Stdout, ru); err != nil {
			return err
		}
	} else {
		printAgentUpgrade(env, ru)
	}
	if wait != nil && *wait && ru.State != "succeeded" {
		return fmt.Errorf("agent upgrade %s %s", ru.ID, ru.State)
	}
	return nil
}

// waitAgentUpgrade polls the rollout until it ends, saying on stderr how
// far it got whenever that changes.
func waitAgentUpgrade(ctx context.Context, env Env, c *client.Client, path string, ru api.AgentUpgrade, output string) (api.AgentUpgrade, error) {
	last := ""
	for ru.State == "running" {
		if line := agentUpgradeLine(ru); line != last && output != "json" {
			fmt.Fprintf(env.Stderr, "%s  %s\n", time.Now().Format("15:04:05"), line)
			last = line
		}
		select {
		case <-ctx.Done():
			return ru, ctx.Err()
		case <-time.After(2 * time.Second):
		}
		if err := c.Do(ctx, http.MethodGet, path, nil, nil, &ru); err != nil {
			return ru, err
		}
	}
	return ru, nil
}

func agentUpgradeLine(ru api.AgentUpgrade) string {
	s := fmt.Sprintf("%s: batch %d of %d at a time; upgraded %d, already current %d, failed %d, skipped %d, pending %d",
		ru.State, ru.Batches, ru.BatchSize, ru.Upgraded, ru.AlreadyCurrent, ru.FailedCount, ru.SkippedCount, len(ru.Pending))
	if ru.AbortRequested && ru.State == "running" {
		s += " (stopping after this batch)"
	}
	return s
}

func printAgentUpgrade(env Env, ru api.AgentUpgrade) {
	fmt.Fprintf(env.Stdout, "agent upgrade %s to %s (sha256 %s), started %s by %s\n  %s\n", ru.ID, ru.Version, ru.SHA256,
		ru.StartedAt.Local().Format(time.RFC3339), printable(ru.StartedBy), agentUpgradeLine(ru))
	for _, e := range ru.Batch {
		fmt.Fprintf(env.Stdout, "  upgrading %s (operation %s)\n", e.InstanceID, e.JobID)
	}
	for _, e := range ru.Failed {
		fmt.Fprintf(env.Stdout, "  failed    %s: %s\n", e.InstanceID, printable(e.Message))
	}
	for _, e := range ru.Skipped {
		fmt.Fprintf(env.Stdout, "  skipped   %s: %s\n", e.InstanceID, printable(e.Message))
	}
}
