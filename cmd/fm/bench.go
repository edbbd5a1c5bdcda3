package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/fleetmanager/fm/internal/fleetsim"
	"github.com/fleetmanager/fm/internal/startup"
)

// runBench is `fm bench fleet`: FM measured under a fleet of simulated
// agents (internal/fleetsim).
func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] != "fleet" {
		return usageError{Err: fmt.Errorf("fm bench: the one benchmark is \"fleet\" (fm bench fleet -h)")}
	}
	fs := flag.NewFlagSet("fm bench fleet", flag.ContinueOnError)
	fs.SetOutput(stderr)
	agents := fs.Int("agents", 100, "simulated agents, each with its own bus connection and credentials")
	samples := fs.Int("samples", 200, "command round trips (and REST reads, floor round trips) timed")
	steady := fs.Duration("steady", 30*time.Second, "how long the fleet at rest is measured")
	heartbeat := fs.Int("heartbeat-seconds", 10, "the agents' heartbeat interval")
	syncAlways := fs.Bool("sync-always", false, "run the bus with fsync before every acknowledgement (fm server's default; fm dev's is off)")
	storm := fs.Bool("reconnect-storm", true, "restart the server under the fleet and time its return")
	workers := fs.Int("workers", 16, "REST calls in flight while the fleet is made")
	dir := fs.String("dir", "", "folder for the server's data and the machines (default: a temporary one, removed after)")
	memLimit := fs.String("server-memory-limit", "", "the server's GOMEMLIMIT (e.g. 900MiB): Go's soft memory limit, trading its CPU for RSS")
	profileDir := fs.String("profile-dir", "", "write the server's CPU profiles (steady state, round trips, lists, fleet-wide change, reconnect storm) and heap profile here, for go tool pprof")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	logLevel := fs.String("log-level", "error", "the simulated agents' and provisioner's log level (to stderr)")
	if err := startup.ParseRoleFlags(fs, args[1:]); err != nil {
		return err
	}
	if err := checkHeartbeat(*heartbeat); err != nil {
		return err
	}
	if *memLimit != "" && !goMemLimit.MatchString(*memLimit) {
		return usageError{Err: fmt.Errorf("--server-memory-limit %q: a size such as 900MiB or 1GiB (GOMEMLIMIT's form)", *memLimit)}
	}
	if *agents < 1 || *samples < 1 || *workers < 1 {
		return usageError{Err: fmt.Errorf("--agents, --samples and --workers must be at least 1")}
	}
	log, err := startup.NewLogger("json", *logLevel, stderr)
	if err != nil {
		return err
	}
	bin, err := os.Executable()
	if err != nil {
		return err
	}
	if *dir == "" {
		tmp, err := os.MkdirTemp("", "fm-bench-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(tmp)
		*dir = tmp
	} else if entries, err := os.ReadDir(*dir); err == nil && len(entries) > 0 {
		return usageError{Err: fmt.Errorf("--dir %s is not empty: a run needs a folder of its own", *dir)}
	} else if err := os.MkdirAll(*dir, 0o700); err != nil {
		return err
	}
	if *profileDir != "" {
		if err := os.MkdirAll(*profileDir, 0o700); err != nil {
			return err
		}
	}
	if n, raised := raiseOpenFileLimit(); raised {
		fmt.Fprintf(stderr, "open files: hard limit raised to %d\n", n)
	} else {
		fmt.Fprintf(stderr, "open files: up to %d (the hard limit, which this process may not raise)\n", n)
	}
	rep, err := fleetsim.Run(ctx, fleetsim.Config{FM: bin, Dir: *dir, Agents: *agents, Samples: *samples, Steady: *steady,
		HeartbeatSeconds: *heartbeat, SyncAlways: *syncAlways, ReconnectStorm: *storm, Workers: *workers,
		ServerMemoryLimit: *memLimit, ProfileDir: *profileDir, Progress: stderr, Logger: log})
	if err != nil {
		// What was measured before the failure is kept: a run at 10,000
		// agents takes minutes.
		fmt.Fprintln(stderr, "what was measured before the failure:")
		rep.Write(stderr)
		return err
	}
	if *asJSON {
		b, err := rep.JSON()
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(stdout, "%s\n", b)
		return err
	}
	rep.Write(stdout)
	return nil
}

// goMemLimit is the form of GOMEMLIMIT: a number of bytes, with a unit.
var goMemLimit = regexp.MustCompile(`^[0-9]+(B|KiB|MiB|GiB|TiB)?$`)

// raiseOpenFileLimit raises the process's hard limit of open files as far
// as the system allows (Go raises the soft limit to the hard one at start,
// and so does the fm server this starts, which inherits it): 10,000 agents'
// connections, remade at once in the reconnect storm, outgrow a limit of
// 20,000. Raising it takes privilege; it returns the limit in force.
func raiseOpenFileLimit() (uint64, bool) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, false
	}
	most := uint64(1 << 20)
	if b, err := os.ReadFile("/proc/sys/fs/nr_open"); err == nil {
		if n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil {
			most = min(most, n)
		}
	}
	if most <= lim.Max || syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: most, Max: most}) != nil {
		return lim.Cur, false
	}
	return most, true
}
