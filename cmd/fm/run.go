package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"github.com/fleetmanager/fm/agent"
	"github.com/fleetmanager/fm/cli"
	"github.com/rs/zerolog"
)

// version is set at build time (-ldflags "-X main.version=…").
var version = "dev"

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
  fm instance       list|get|create|update|delete instances
  fm snapshot       list|get|create|delete|restore snapshots of an instance's data volume
  fm image          list|get|add|remove deployable DSS images
  fm op             list|get|wait|abort operations
  fm apikey         list|create|revoke API keys and their roles (admin)
  fm audit          the audit trail, --follow to keep reading (admin)
  fm nats-creds     NATS credentials for an operator or a provisioner (admin)

  fm bench fleet    measure FM under a fleet of simulated agents (docs/benchmarks.md)
  fm version        print the version

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
		err = runAgent(ctx, args[1:], stdout, stderr)
	case cmd == "provisioner":
		err = runProvisioner(ctx, args[1:], stdout, stderr)
	case cmd == "admin":
		err = runAdmin(ctx, args[1:], stdout, stderr)
	case cmd == "nats-config":
		err = runNATSConfig(args[1:], stdout, stderr)
	case cmd == "bench":
		err = runBench(ctx, args[1:], stdout, stderr)
	case cmd == "version":
		fmt.Fprintln(stdout, "fm", version)
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
		if errors.Is(err, agent.ErrJoinRefused) {
			// fm-agent.service does not restart on it: a new token takes a
			// reprovision.
			return exitJoinRefused
		}
		return 1
	}
	return 0
}

// exitJoinRefused is fm agent's exit code when FM refused its join token
// (deploy/cloudinit/fm-agent.service: RestartPreventExitStatus).
const exitJoinRefused = 3

// usageError is a command line that cannot run.
type usageError struct{ error }

// parseRoleFlags parses a role's flags (flags and FM_* variables) and
// refuses positional arguments.
func parseRoleFlags(fs *flag.FlagSet, args []string) error {
	pos, err := cli.ParseFlags(fs, args)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err}
	}
	if len(pos) > 0 {
		return usageError{fmt.Errorf("%s takes no arguments (got %q)", fs.Name(), strings.Join(pos, " "))}
	}
	return nil
}

// newLogger builds the process's logger: JSON lines, or a console format for
// people. Components add their own "component" field.
func newLogger(format, level string, w io.Writer) (zerolog.Logger, error) {
	lvl, err := zerolog.ParseLevel(level)
	if err != nil || level == "" {
		return zerolog.Logger{}, usageError{fmt.Errorf("--log-level: %q is not one of trace, debug, info, warn, error", level)}
	}
	if format != "json" && format != "console" {
		return zerolog.Logger{}, usageError{fmt.Errorf("--log-format: %q is not console or json", format)}
	}
	return zerolog.New(logOutput(format, w)).Level(lvl).With().Timestamp().Logger(), nil
}

// logOutput is where a logger of the format writes on w.
func logOutput(format string, w io.Writer) io.Writer {
	if format == "console" {
		return zerolog.ConsoleWriter{Out: w, TimeFormat: "15:04:05", NoColor: !isTerminal(w)}
	}
	return w
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// checkHeartbeat checks --heartbeat-seconds: agents beat at least once a
// second and at least once an hour.
func checkHeartbeat(seconds int) error {
	if seconds < 1 || seconds > 3600 {
		return usageError{fmt.Errorf("--heartbeat-seconds must be 1 to 3600, not %d", seconds)}
	}
	return nil
}
