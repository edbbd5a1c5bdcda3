// Package cli implements fm's client subcommands (fm network, template,
// instance, image, op …), which talk to an FM server's REST API, and the flag
// handling every fm subcommand shares (flags anywhere on the line, FM_*
// environment variables).
//
// cmd/fm imports it; it imports api and client.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/fleetmanager/fm/client"
	"github.com/fleetmanager/fm/internal/startup"
)

// Env is what a command runs with.
type Env struct {
	Stdout io.Writer
	Stderr io.Writer
}

// ExitUsage is the exit code for a command line that cannot be run.
const ExitUsage = startup.ExitUsage

// usagef is an error the user can fix on the command line.
func usagef(format string, args ...any) error {
	return startup.UsageError{Err: fmt.Errorf(format, args...)}
}

// Commands lists the client subcommands this package runs.
func Commands() []string {
	names := make([]string, len(resources))
	for i, r := range resources {
		names[i] = r.command
	}
	return names
}

// Run runs a client subcommand (args[0] is its name) and returns the exit
// code.
func Run(ctx context.Context, env Env, args []string) int {
	var res *resource
	for _, r := range resources {
		if r.command == args[0] {
			res = r
		}
	}
	var err error
	if res == nil {
		err = usagef("unknown command %q", args[0])
	} else {
		err = res.run(ctx, env, args[1:])
	}
	if err == nil {
		return 0
	}
	// An error may carry what an agent said (a failed operation's).
	fmt.Fprintln(env.Stderr, "fm:", printableText(err.Error()))
	var u startup.UsageError
	if errors.As(err, &u) || errors.Is(err, flag.ErrHelp) {
		return ExitUsage
	}
	return 1
}

// ParseFlags parses args into fs allowing flags after positional arguments
// (fm instance get ID --output json), then sets every flag not given on the
// line from its environment variable FM_<NAME> (startup.ParseFlags). It
// returns the positional arguments; a bad variable is a usage error.
func ParseFlags(fs *flag.FlagSet, args []string) ([]string, error) {
	pos, err := startup.ParseFlags(fs, args)
	var envErr *startup.EnvError
	if errors.As(err, &envErr) {
		return nil, usagef("%v", envErr)
	}
	return pos, err
}

// connFlags are the flags every client command has.
type connFlags struct {
	url     string
	keyFile string
	caFile  string
	output  string
}

func (c *connFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&c.url, "url", "http://127.0.0.1:10000", "FM server URL (env FM_URL)")
	fs.StringVar(&c.keyFile, "key-file", "./.fm/admin-key.json", "API key file {\"id\",\"secret\"} (env FM_KEY_FILE)")
	fs.StringVar(&c.caFile, "ca-file", "", "CA to verify an HTTPS server with, e.g. DATA/tls/ca.pem of fm server (env FM_CA_FILE)")
	fs.StringVar(&c.output, "output", "table", "output format: table or json (env FM_OUTPUT)")
}

func (c *connFlags) client() (*client.Client, error) {
	if c.output != "table" && c.output != "json" {
		return nil, usagef("--output must be table or json, not %q", c.output)
	}
	key, err := client.ReadKeyFile(c.keyFile)
	if err != nil {
		return nil, fmt.Errorf("%w (set --key-file or FM_KEY_FILE)", err)
	}
	cl := client.New(c.url, key)
	if c.caFile != "" {
		if err := cl.TrustCA(c.caFile); err != nil {
			return nil, err
		}
	}
	return cl, nil
}

// printJSON writes v indented.
func printJSON(w io.Writer, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(w, string(b))
	return err
}

// column is one column of a table: a header and how to read the cell from
// an object decoded as a map.
type column struct {
	header string
	cell   func(obj map[string]any) string
}

func field(header, key string) column {
	return column{header, func(o map[string]any) string { return cellText(o[key]) }}
}

// printableText is printable for text of several lines (logs): line
// breaks and tabs stay, other control characters show as '?'.
func printableText(s string) string {
	return strings.Map(func(r rune) rune {
		if r == '\n' || r == '\t' {
			return r
		}
		if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) {
			return '?'
		}
		return r
	}, s)
}

// printable shows a line break as \n and any other control character
// (an escape sequence's start, a tab) as '?': what the server passes on
// may come from a machine, and must not rewrite an operator's terminal or
// forge a row of a table.
func printable(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) {
			return '?'
		}
		return r
	}, strings.ReplaceAll(s, "\n", `\n`))
}

func cellText(v any) string {
	switch x := v.(type) {
	case nil:
		return ""
	case string:
		return printable(x)
	case bool:
		if x {
			return "yes"
		}
		return "no"
	case float64:
		return strconv.FormatFloat(x, 'f', -1, 64)
	case []any:
		parts := make([]string, len(x))
		for i, e := range x {
			parts[i] = cellText(e)
		}
		return strings.Join(parts, ",")
	case map[string]any:
		keys := make([]string, 0, len(x))
		for k := range x {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		parts := make([]string, len(keys))
		for i, k := range keys {
			parts[i] = k + "=" + cellText(x[k])
		}
		return strings.Join(parts, ",")
	}
	b, _ := json.Marshal(v)
	return string(b)
}

func printTable(w io.Writer, cols []column, objs []map[string]any) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	headers := make([]string, len(cols))
	for i, c := range cols {
		headers[i] = c.header
	}
	fmt.Fprintln(tw, strings.Join(headers, "\t"))
	for _, o := range objs {
		cells := make([]string, len(cols))
		for i, c := range cols {
			cells[i] = strings.ReplaceAll(c.cell(o), "\t", " ")
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	return tw.Flush()
}

// printObject writes one object as "key: value" lines, keys sorted.
func printObject(w io.Writer, obj map[string]any) error {
	keys := make([]string, 0, len(obj))
	for k := range obj {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, k := range keys {
		fmt.Fprintf(tw, "%s:\t%s\n", k, strings.ReplaceAll(cellText(obj[k]), "\n", `\n`))
	}
	return tw.Flush()
}
