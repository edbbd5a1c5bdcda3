// Package startup is what every fm process does as it starts: flags that an
// FM_<FLAG> environment variable may set too, the logger, and the signals
// that become a context's cancellation. The fm binary (cmd/fm, cli) and the
// slim agent binary (cmd/fm-agent) share it, so it imports no project
// package and nothing heavier than zerolog. Only cmd/, cli and
// internal/agentcmd import it.
package startup

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/rs/zerolog"
)

// SignalContext is cancelled by the first SIGINT or SIGTERM, which starts a
// graceful shutdown; a second one exits at once (status 130). Only a main
// function calls it.
func SignalContext(prog string, stderr io.Writer) (context.Context, func()) {
	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sigs
		cancel()
		<-sigs
		fmt.Fprintln(stderr, prog+": second signal, exiting now")
		os.Exit(130)
	}()
	return ctx, func() { signal.Stop(sigs); cancel() }
}

// ExitUsage is the exit code of a command line (or configuration) that
// cannot run.
const ExitUsage = 2

// UsageError is a command line or configuration that cannot run: the
// process exits with ExitUsage.
type UsageError struct{ Err error }

func (e UsageError) Error() string { return e.Err.Error() }
func (e UsageError) Unwrap() error { return e.Err }

// ParseRoleFlags parses a role's flags (ParseFlags) and refuses positional
// arguments, which no role takes. Its errors are UsageErrors, but for
// flag.ErrHelp, given as it is (-h asked for the flags, which are printed).
func ParseRoleFlags(fs *flag.FlagSet, args []string) error {
	pos, err := ParseFlags(fs, args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		return err
	case err != nil:
		return UsageError{err}
	case len(pos) > 0:
		return UsageError{fmt.Errorf("%s takes no arguments (got %q)", fs.Name(), strings.Join(pos, " "))}
	}
	return nil
}

// EnvError is a flag's environment variable holding a value the flag
// refuses.
type EnvError struct {
	Name, Value string
	Err         error
}

func (e *EnvError) Error() string { return fmt.Sprintf("%s=%q: %v", e.Name, e.Value, e.Err) }
func (e *EnvError) Unwrap() error { return e.Err }

// ParseFlags parses args into fs allowing flags after positional arguments
// (`fm instance get ID --output json`), then sets every flag not given from
// its environment variable (EnvName), if set. It returns the positional
// arguments; "--" ends the flags.
func ParseFlags(fs *flag.FlagSet, args []string) ([]string, error) {
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		if args[0] == "--" {
			positional = append(positional, args[1:]...)
			break
		}
		positional = append(positional, args[0])
		args = args[1:]
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if given[f.Name] || err != nil {
			return
		}
		name := EnvName(f.Name)
		if v, ok := os.LookupEnv(name); ok {
			if serr := f.Value.Set(v); serr != nil {
				err = &EnvError{Name: name, Value: v, Err: serr}
			}
		}
	})
	return positional, err
}

// EnvName is the environment variable of a flag: FM_ and the flag's name in
// capitals, dashes as underscores.
func EnvName(flagName string) string {
	return "FM_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// NewLogger builds the process's logger: JSON lines, or a console format
// for people. Components add their own "component" field. Its errors are
// UsageErrors naming the flag at fault (--log-level, --log-format).
func NewLogger(format, level string, w io.Writer) (zerolog.Logger, error) {
	lvl, err := zerolog.ParseLevel(level)
	if err != nil || level == "" {
		return zerolog.Logger{}, UsageError{fmt.Errorf("--log-level: %q is not one of trace, debug, info, warn, error", level)}
	}
	if format != "json" && format != "console" {
		return zerolog.Logger{}, UsageError{fmt.Errorf("--log-format: %q is not console or json", format)}
	}
	return zerolog.New(LogOutput(format, w)).Level(lvl).With().Timestamp().Logger(), nil
}

// LogOutput is where a logger of the format writes on w.
func LogOutput(format string, w io.Writer) io.Writer {
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
