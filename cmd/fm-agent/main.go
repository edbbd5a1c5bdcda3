// Command fm-agent is the slim build of fm for machines: only `fm agent`
// (and `fm version`), without the server, the provisioners, the embedded
// nats-server or the AWS SDK, so that the daemon beside every DSS keeps
// little memory (docs/benchmarks.md). It takes the same command line as the
// fm binary, `agent` first, so either can be installed as a machine's
// /usr/local/bin/fm; fm server serves it at /download/fm when it is beside
// the fm binary (docs/agent.md).
package main

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/fleetmanager/fm/internal/agentcmd"
	"github.com/fleetmanager/fm/internal/buildinfo"
	"github.com/fleetmanager/fm/internal/startup"
)

// version is set at build time (-ldflags "-X main.version=…").
var version = "dev"

// commit and commitDate name the commit built (-ldflags "-X main.commit=…
// -X main.commitDate=…", as make build sets them): fm version says them.
var commit, commitDate string

const usage = `fm-agent: the slim agent build of Fleet Manager (only the agent).

  fm-agent agent [flags]   the daemon beside DSS on a machine ("agent -h" for its flags)
  fm-agent version         print the version, the commit built and its date
`

func main() {
	ctx, stop := startup.SignalContext("fm-agent", os.Stderr)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return agentcmd.ExitUsage
	}
	switch args[0] {
	case "agent":
		return agentcmd.Main(ctx, "fm-agent", args[1:], stderr, version)
	case "version":
		fmt.Fprintln(stdout, buildinfo.Describe("fm", version, commit, commitDate), "(agent build)")
		return agentcmd.ExitOK
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return agentcmd.ExitOK
	}
	fmt.Fprintf(stderr, "fm-agent: %q is not a command of the agent build (the fm binary has the others)\n\n%s", args[0], usage)
	return agentcmd.ExitUsage
}
