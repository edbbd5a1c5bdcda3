package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/cli"
	"github.com/fleetmanager/fm/internal/agentcmd"
	"github.com/fleetmanager/fm/internal/buildinfo"
	"github.com/fleetmanager/fm/internal/startup"
)

// version is set at build time (-ldflags "-X main.version=…").
var version = "dev"

// commit and commitDate name the commit built (-ldflags "-X main.commit=…
// -X main.commitDate=…", as make build sets them): fm version says them.
var commit, commitDate string

// agentSHA256 is the digest of the slim agent build (cmd/fm-agent) built
// with this binary (-ldflags "-X main.agentSHA256=…"): defaultAgentBinary
// uses the fm-agent beside this binary only if it is that one.
var agentSHA256 string

const usage = `Fleet Manager: deploys, upgrades, backs up and configures a fleet of Dataiku DSS nodes.

Roles:
  fm dev            everything in one process on an embedded bus (the embedded default)
  fm server         the FM server, on an external NATS or an embedded one
  fm agent          the daemon beside DSS on each machine
  fm provisioner    the provisioner on its own (--backend local)
  fm nats-config    the nats-server configuration that trusts FM's NATS authority
  fm admin          backup --out FILE | restore FILE: FM's own state (docs/backup.md)

Client commands (talk to the REST API; --url, --key-file, --output json):
  fm network        list|get|create|update|delete virtual networks
  fm template       list|get|create|update|delete instance settings templates
  fm instance       list|get|create|update|delete|status|logs instances, and their actions
  fm snapshot       list|get|create|delete|restore snapshots of an instance's data volume
  fm image          list|get|add|remove deployable DSS images
  fm status         the fleet summed up: states, DSS versions, what needs a look
  fm op             list|get|wait|abort operations
  fm agent-upgrade  start|status|stop: the agents upgraded to FM's binary, a batch at a time (admin)
  fm apikey         list|create|revoke API keys and their roles (admin)
  fm audit          the audit trail, --follow to keep reading (admin)
  fm nats-creds     NATS credentials for an operator or a provisioner (admin)

  fm bench fleet    measure FM under a fleet of simulated agents (docs/benchmarks.md)
  fm version        print the version, the commit built and its date

Every flag can also be set as FM_<FLAG> (e.g. --data is FM_DATA).
Run "fm <command> -h" for a command's flags.
`

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stdout, usage)
		if len(args) == 0 {
			return cli.ExitUsage
		}
		return 0
	}
	var err error
	switch cmd := args[0]; {
	case cmd == "dev":
		err = runDev(ctx, args[1:], stdout, stderr)
	case cmd == "server":
		err = runServer(ctx, args[1:], stdout, stderr)
	case cmd == "agent":
		return agentcmd.Main(ctx, "fm", args[1:], stderr, version)
	case cmd == "provisioner":
		err = runProvisioner(ctx, args[1:], stdout, stderr)
	case cmd == "admin":
		err = runAdmin(ctx, args[1:], stdout, stderr)
	case cmd == "nats-config":
		err = runNATSConfig(args[1:], stdout, stderr)
	case cmd == "bench":
		err = runBench(ctx, args[1:], stdout, stderr)
	case cmd == "version":
		fmt.Fprintln(stdout, buildinfo.Describe("fm", version, commit, commitDate))
	case slices.Contains(cli.Commands(), cmd):
		return cli.Run(ctx, cli.Env{Stdout: stdout, Stderr: stderr}, args)
	default:
		fmt.Fprintf(stderr, "fm: unknown command %q\n\n%s", cmd, usage)
		return cli.ExitUsage
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "fm:", err)
		var u usageError
		if errors.As(err, &u) {
			return cli.ExitUsage
		}
		return 1
	}
	return 0
}

// usageError is a command line that cannot run (exit 2).
type usageError = startup.UsageError

// startError is a role's failure to start. A bus laid out by a newer FM,
// or stamped with a layout no FM writes, cannot run this FM however often
// it is restarted: it exits 2, which the units do not restart
// (RestartPreventExitStatus=2).
func startError(err error) error {
	var layout *bus.LayoutError
	if errors.As(err, &layout) {
		return usageError{Err: err}
	}
	return err
}

// checkHeartbeat checks --heartbeat-seconds: agents beat at least once a
// second and at least once an hour.
func checkHeartbeat(seconds int) error {
	if seconds < 1 || seconds > 3600 {
		return usageError{Err: fmt.Errorf("--heartbeat-seconds must be 1 to 3600, not %d", seconds)}
	}
	return nil
}
