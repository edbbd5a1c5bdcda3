// Command fm is Fleet Manager: every role (fm dev, fm server, …) and the
// client commands (fm instance …, fm network …) in one binary.
package main

import (
	"os"

	"github.com/fleetmanager/fm/internal/startup"
)

func main() {
	ctx, stop := startup.SignalContext("fm", os.Stderr)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
