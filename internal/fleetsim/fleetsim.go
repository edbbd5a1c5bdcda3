// Package fleetsim is FM's fleet simulator: it starts a real `fm server`
// (with its embedded bus) in a process of its own, runs the real
// provisioner role in this process over a backend whose machines are
// simulated agents (the real agent's bus code over no machine), makes a
// fleet of them through the REST API, and measures FM at that scale beside
// the floors of the same work (docs/benchmarks.md).
//
// `fm bench fleet` and the e2e benchmarks import it; nothing else should.
package fleetsim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fleetmanager/fm/agent"
	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/client"
	"github.com/fleetmanager/fm/internal/natsauth"
	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/provisioner"
	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// Config configures a simulated fleet's run.
type Config struct {
	// FM is the fm binary started as the server.
	FM string
	// Dir holds the server's data folder and the machines' folders.
	Dir string
	// Agents is the size of the fleet.
	Agents int
	// Samples is how many command round trips (and gets, statuses and
	// floor round trips) are timed; lists are timed a tenth as often
	// (at least 5). Default 200.
	Samples int
	// Steady is how long the fleet at rest is measured (default 30s).
	Steady time.Duration
	// HeartbeatSeconds is the agents' heartbeat interval (default 10).
	HeartbeatSeconds int
	// SyncAlways runs the embedded bus with fsync before every
	// acknowledgement (fm server's default; fm dev's is off).
	SyncAlways bool
	// ReconnectStorm restarts the server under the fleet and times its
	// return.
	ReconnectStorm bool
	// Workers is how many REST calls make the fleet at once (default 16).
	Workers int
	// ServerMemoryLimit, if set, is the server process's GOMEMLIMIT (Go's
	// soft memory limit: the garbage collector works harder near it), so
	// that its RSS can be traded against its CPU.
	ServerMemoryLimit string
	// ProfileDir, if set, receives the server's CPU profiles of the steady
	// window (server-steady.cpu.pprof), of the command round trips
	// (server-roundtrips.cpu.pprof), of lists (server-list.cpu.pprof), of
	// the fleet-wide change (server-change.cpu.pprof) and of the reconnect
	// storm's first minute (server-storm.cpu.pprof), and its heap after the
	// steady window (server.heap.pprof), for `go tool pprof`.
	ProfileDir string
	// Progress, if set, gets a line per phase.
	Progress io.Writer
	Logger   zerolog.Logger
}

func (c *Config) setDefaults() error {
	if c.FM == "" || c.Dir == "" {
		return errors.New("fleetsim: the fm binary and a folder are required")
	}
	if c.Agents < 1 {
		return fmt.Errorf("fleetsim: a fleet needs at least one agent, not %d", c.Agents)
	}
	if c.Samples <= 0 {
		c.Samples = 200
	}
	if c.Steady <= 0 {
		c.Steady = 30 * time.Second
	}
	if c.HeartbeatSeconds <= 0 {
		c.HeartbeatSeconds = 10
	}
	if c.Workers <= 0 {
		c.Workers = 16
	}
	if c.Progress == nil {
		c.Progress = io.Discard
	}
	return nil
}

// Report is what a run measured.
type Report struct {
	Agents            int
	Workers           int
	SyncAlways        bool
	Heartbeat         time.Duration
	ServerMemoryLimit string

	Create Latencies // POST /instances, making the fleet (many at once)
	// CreateAlone is POST /instances one at a time, beside the fleet made.
	CreateAlone Latencies
	Provision   time.Duration // from the first reprovision until every agent is ready
	// RoundTrip is a command's: REST action, command, the agent's no-op,
	// its result folded, the future read done.
	RoundTrip Latencies
	// FloorRequestReply is a bare NATS request-reply between two
	// connections; FloorJetStream the round trip's bus writes and reads
	// done back to back by a bare client (KV put, publish, consume,
	// publish, consume, KV put); FloorFMSequence every bus call FM makes
	// for the round trip (a trace of fm dev: 14 round trips on the bus and
	// an ack), in FM's order, by a bare client (measure.go, fmSequence).
	FloorRequestReply Latencies
	FloorJetStream    Latencies
	FloorFMSequence   Latencies

	List       Latencies // GET /instances, read but not parsed
	ListBytes  int
	ListEncode Latencies // json.Marshal of the same instances (the floor)
	Get        Latencies // GET /instances/{id}
	Status     Latencies // GET /instances/{id}/status

	Steady Steady
	// A fleet-wide change: a setup action added to the template all share,
	// then replay-setup-actions on every instance of it, in one call
	// (POST …/instance-settings-templates/{id}/actions/replay-setup-actions).
	// ChangeAsked is when the call returned (every replay started),
	// ChangeReached when every agent reported the new generation,
	// ChangeDone when FM had ended every operation (each from the call).
	ChangeAsked, ChangeReached, ChangeDone time.Duration
	// Reconnect is how long after the server was stopped every agent beat
	// again and a command to each of up to 100 of them was answered
	// (zero: not measured).
	Reconnect time.Duration
	// Its parts: how long the server took to stop and to start again, and
	// when the commands were answered (from the stop).
	StormStop, StormStart, StormCommands time.Duration
}

// Steady is the fleet at rest.
type Steady struct {
	Window    time.Duration
	ServerCPU float64 // cores: the fm server process, bus included
	ServerRSS int64   // bytes, at the end of the window
	// Per agent per second, as the agents' connections counted them
	// (both directions).
	MsgsPerAgent  float64
	BytesPerAgent float64
	// SimulatorRSS is this process's resident memory (the simulated
	// agents, the provisioner, the measuring clients).
	SimulatorRSS int64
}

// Run makes the fleet, measures it, and takes it down.
func Run(ctx context.Context, cfg Config) (Report, error) {
	if err := cfg.setDefaults(); err != nil {
		return Report{}, err
	}
	rep := Report{Agents: cfg.Agents, Workers: cfg.Workers, SyncAlways: cfg.SyncAlways, Heartbeat: time.Duration(cfg.HeartbeatSeconds) * time.Second,
		ServerMemoryLimit: cfg.ServerMemoryLimit}
	say := func(format string, args ...any) {
		fmt.Fprintf(cfg.Progress, "%s  "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
	}
	srv, err := startServer(ctx, cfg)
	if err != nil {
		return rep, err
	}
	defer srv.close()
	say("fm server up: %s, bus %s (sync always: %v)", srv.restURL, srv.natsURL, cfg.SyncAlways)

	f, err := newFleet(ctx, cfg, srv)
	if err != nil {
		return rep, err
	}
	defer f.close()

	if err := f.make(ctx, &rep, say); err != nil {
		return rep, err
	}
	steps := []struct {
		name string
		fn   func(context.Context, *Report) error
	}{
		{"steady state", f.steady},
		{"command round trips", f.roundTrips},
		{"floors", f.floors},
		{"REST reads", f.reads},
		{"fleet-wide change", f.change},
	}
	if cfg.ReconnectStorm {
		steps = append(steps, struct {
			name string
			fn   func(context.Context, *Report) error
		}{"reconnect storm", f.storm})
	}
	for _, s := range steps {
		say("%s…", s.name)
		if err := s.fn(ctx, &rep); err != nil {
			return rep, fmt.Errorf("%s: %w", s.name, err)
		}
	}
	return rep, nil
}

// fleet is a run's moving parts.
type fleet struct {
	cfg     Config
	srv     *serverProc
	api     *client.Client
	creds   []byte     // FM's account, as FM's roles
	nc      *nats.Conn // with creds
	js      jetstream.JetStream
	life    context.Context
	end     context.CancelFunc
	backend *backend
	prov    *provisioner.Provisioner
	provRun chan error
	ids     []string
	tpl     string // the template every instance shares
	vn, im  string // the network and image every instance shares
	ready   *readiness
}

func newFleet(ctx context.Context, cfg Config, srv *serverProc) (*fleet, error) {
	key, err := client.ReadKeyFile(filepath.Join(srv.data, "admin-key.json"))
	if err != nil {
		return nil, err
	}
	f := &fleet{cfg: cfg, srv: srv, api: client.New(srv.restURL, key)}
	f.api.SetTransport(&http.Transport{MaxIdleConnsPerHost: cfg.Workers * 2, MaxConnsPerHost: cfg.Workers * 2})
	authority, err := natsauth.Open(filepath.Join(srv.data, "nats-auth"))
	if err != nil {
		return nil, err
	}
	if f.creds, _, err = authority.Creds("fm-bench", jwt.Permissions{}, time.Time{}); err != nil {
		return nil, err
	}
	// Back at once after the reconnect storm's restart, to hear every
	// agent's first heartbeat.
	fast := func(int) time.Duration { return 50 * time.Millisecond }
	if f.nc, err = bus.Connect(bus.ConnectConfig{URL: srv.natsURL, Creds: f.creds, Name: "fm-bench", ReconnectDelay: fast, Logger: cfg.Logger}); err != nil {
		return nil, err
	}
	if f.js, err = jetstream.New(f.nc); err != nil {
		f.nc.Close()
		return nil, err
	}
	secret, err := seal.LoadKey(filepath.Join(srv.data, "secrets.key"))
	if err != nil {
		f.nc.Close()
		return nil, err
	}
	box, err := seal.New(secret)
	if err != nil {
		f.nc.Close()
		return nil, err
	}
	f.life, f.end = context.WithCancel(context.Background())
	f.backend = newBackend(f.life, filepath.Join(cfg.Dir, "machines"), srv.natsURL, "bench", cfg.Logger)
	f.prov, err = provisioner.New(provisioner.Config{Conn: f.nc, Backend: f.backend, OpenSecret: box.Open,
		Holder: "fm-bench", Logger: cfg.Logger.With().Str("component", "provisioner").Logger()})
	if err != nil {
		f.close()
		return nil, err
	}
	f.provRun = make(chan error, 1)
	go func() { f.provRun <- f.prov.Run(f.life) }()
	if f.ready, err = watchReadiness(ctx, f.js); err != nil {
		f.close()
		return nil, err
	}
	return f, nil
}

func (f *fleet) close() {
	f.end()
	if f.provRun != nil {
		<-f.provRun
	}
	f.backend.close()
	if f.ready != nil {
		f.ready.stop()
	}
	f.nc.Close()
}

// make creates the network, template, image and instances, provisions
// every instance, and waits until every agent is ready.
func (f *fleet) make(ctx context.Context, rep *Report, say func(string, ...any)) error {
	var vn, tpl api.Instance // only their ids are read
	if err := f.api.Do(ctx, http.MethodPost, "/virtual-networks", url.Values{"useDefaultValues": {"True"}}, map[string]any{"label": "bench"}, &vn); err != nil {
		return err
	}
	if err := f.api.Do(ctx, http.MethodPost, "/instance-settings-templates", nil, map[string]any{"label": "bench"}, &tpl); err != nil {
		return err
	}
	f.tpl, f.vn = tpl.ID, vn.ID
	// The simulated agents never fetch the kit: it only has to be valid.
	im := api.Image{ID: "dss-14.0.0-bench", DSSVersion: "14.0.0", Kit: &api.Kit{URL: "http://127.0.0.1:1/dataiku-dss-14.0.0.tar.gz",
		SHA256: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}}
	if err := f.api.Do(ctx, http.MethodPost, "/images", nil, im, nil); err != nil {
		return err
	}
	f.im = im.ID

	f.ids = make([]string, f.cfg.Agents)
	created := make([]time.Duration, f.cfg.Agents)
	began := time.Now()
	err := f.parallel(ctx, f.cfg.Agents, func(ctx context.Context, i int) error {
		var in api.Instance
		t0 := time.Now()
		err := f.api.Do(ctx, http.MethodPost, "/instances", nil, map[string]any{"label": fmt.Sprintf("bench-%05d", i),
			"instanceSettingsTemplateId": tpl.ID, "virtualNetworkId": vn.ID, "imageId": im.ID}, &in)
		created[i], f.ids[i] = time.Since(t0), in.ID
		return err
	})
	if err != nil {
		return fmt.Errorf("create instances: %w", err)
	}
	rep.Create = latencies(created)
	say("%d instances created in %v (p50 %v)", f.cfg.Agents, time.Since(began).Round(time.Millisecond), rep.Create.P50)

	began = time.Now()
	jobs := make([]api.Future, f.cfg.Agents)
	err = f.parallel(ctx, f.cfg.Agents, func(ctx context.Context, i int) error {
		return f.api.Do(ctx, http.MethodGet, "/instances/"+f.ids[i]+"/actions/reprovision", nil, nil, &jobs[i])
	})
	if err != nil {
		return fmt.Errorf("provision: %w", err)
	}
	say("%d reprovisions asked in %v; waiting for every agent", f.cfg.Agents, time.Since(began).Round(time.Millisecond))
	if err := f.ready.wait(ctx, f.cfg.Agents, 10*time.Minute+time.Duration(f.cfg.Agents)*20*time.Millisecond, say); err != nil {
		return err
	}
	say("every agent ready %v after the first reprovision; waiting for the operations to end", time.Since(began).Round(time.Millisecond))
	err = f.parallel(ctx, f.cfg.Agents, func(ctx context.Context, i int) error {
		return f.wait(ctx, jobs[i], 10*time.Minute, 100*time.Millisecond)
	})
	if err != nil {
		return fmt.Errorf("provision: %w", err)
	}
	rep.Provision = time.Since(began)
	say("every reprovision succeeded %v after the first", rep.Provision.Round(time.Millisecond))
	return nil
}

// wait waits (client.Wait, reading it every poll) until an operation
// ends, and fails unless it succeeded.
func (f *fleet) wait(ctx context.Context, fut api.Future, timeout, poll time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if _, err := f.api.Wait(ctx, fut, poll, nil); err != nil {
		return fmt.Errorf("operation %s: %w", fut.JobID, err)
	}
	return nil
}

// parallel runs fn for 0..n-1 on cfg.Workers goroutines; the first error
// stops the rest.
func (f *fleet) parallel(ctx context.Context, n int, fn func(context.Context, int) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var next atomic.Int64
	var once sync.Once
	var first error
	var wg sync.WaitGroup
	for range min(f.cfg.Workers, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				if err := fn(ctx, i); err != nil {
					once.Do(func() { first = err; cancel() })
					return
				}
			}
		}()
	}
	wg.Wait()
	if first == nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return first
}

// change adds a setup action to the template every instance shares and
// replays every instance's setup actions, as an operator rolls a change
// out to the fleet, and times it until every agent reports the new
// generation and FM has ended every operation.
func (f *fleet) change(ctx context.Context, rep *Report) error {
	var tpl map[string]any
	path := "/instance-settings-templates/" + f.tpl
	if err := f.api.Do(ctx, http.MethodGet, path, nil, nil, &tpl); err != nil {
		return err
	}
	tpl["setupActions"] = []any{map[string]any{"type": "ADD_ENV_VARIABLES",
		"params": map[string]any{"variables": []any{map[string]any{"key": "FLEET_CHANGE", "value": time.Now().UTC().Format(time.RFC3339)}}}}}
	if err := f.api.Do(ctx, http.MethodPut, path, nil, tpl, nil); err != nil {
		return err
	}
	before := f.ready.generations()
	// About how long the replays are asked for (a millisecond each).
	profiled := f.profile(fmt.Sprintf("profile?seconds=%d", max(1, len(f.ids)/1000)), "server-change.cpu.pprof")
	defer func() {
		if err := <-profiled; err != nil {
			fmt.Fprintf(f.cfg.Progress, "the fleet-wide change's profile was not taken: %v\n", err)
		}
	}()
	began := time.Now()
	// One call for the whole template (FM's own), as an operator would.
	var replay api.TemplateReplay
	if err := f.api.Do(ctx, http.MethodPost, path+"/actions/replay-setup-actions", nil, nil, &replay); err != nil {
		return fmt.Errorf("replay: %w", err)
	}
	if len(replay.Skipped) > 0 || len(replay.Futures) != len(f.ids) {
		return fmt.Errorf("replay: started on %d of %d instances; %d skipped (%+v)", len(replay.Futures), len(f.ids), len(replay.Skipped), replay.Skipped[:min(1, len(replay.Skipped))])
	}
	jobs := replay.Futures
	rep.ChangeAsked = time.Since(began)
	deadline := time.Now().Add(5*time.Minute + time.Duration(len(f.ids))*10*time.Millisecond)
	for {
		// Counted in place: a copy of 10,000 generations every 10 ms would
		// be the simulator's own load on the machine it measures.
		behind := f.ready.behind(f.ids, before)
		if behind == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d of %d agents did not report the new generation", behind, len(f.ids))
		}
		if err := sleep(ctx, 10*time.Millisecond); err != nil {
			return err
		}
	}
	rep.ChangeReached = time.Since(began)
	err := f.parallel(ctx, len(f.ids), func(ctx context.Context, i int) error {
		return f.wait(ctx, jobs[i], 5*time.Minute, 100*time.Millisecond)
	})
	if err != nil {
		return fmt.Errorf("replay: %w", err)
	}
	rep.ChangeDone = time.Since(began)
	return nil
}

// steady measures the fleet at rest: the server's CPU and memory and the
// agents' traffic over the window, after two heartbeats of settling.
func (f *fleet) steady(ctx context.Context, rep *Report) error {
	if err := sleep(ctx, 2*rep.Heartbeat); err != nil {
		return err
	}
	before, err := f.srv.usage()
	if err != nil {
		return err
	}
	traffic0 := f.traffic()
	t0 := time.Now()
	profiled := f.profile("profile?seconds="+fmt.Sprint(int(f.cfg.Steady.Seconds())), "server-steady.cpu.pprof")
	if err := sleep(ctx, f.cfg.Steady); err != nil {
		return err
	}
	if err := <-profiled; err != nil {
		return err
	}
	if err := <-f.profile("heap", "server.heap.pprof"); err != nil {
		return err
	}
	after, err := f.srv.usage()
	if err != nil {
		return err
	}
	traffic1 := f.traffic()
	window := time.Since(t0)
	perAgentSecond := float64(f.cfg.Agents) * window.Seconds()
	self, _ := ProcessUsage(os.Getpid())
	rep.Steady = Steady{Window: window, ServerCPU: (after.CPU - before.CPU).Seconds() / window.Seconds(), ServerRSS: after.RSS,
		MsgsPerAgent:  float64(traffic1.msgs-traffic0.msgs) / perAgentSecond,
		BytesPerAgent: float64(traffic1.bytes-traffic0.bytes) / perAgentSecond, SimulatorRSS: self.RSS}
	return nil
}

type traffic struct{ msgs, bytes uint64 }

func (f *fleet) traffic() traffic {
	var t traffic
	f.backend.each(func(_ string, a *agent.Agent) {
		s := a.BusStatistics()
		t.msgs += s.InMsgs + s.OutMsgs
		t.bytes += s.InBytes + s.OutBytes
	})
	return t
}

// roundTrips times commands one at a time, each to the next instance.
func (f *fleet) roundTrips(ctx context.Context, rep *Report) error {
	// A profile's length is set when it starts: the round trips' expected
	// length (a few ms each) or a second.
	profiled := f.profile(fmt.Sprintf("profile?seconds=%d", max(1, f.cfg.Samples/200)), "server-roundtrips.cpu.pprof")
	defer func() {
		if err := <-profiled; err != nil {
			f.cfg.Logger.Warn().Err(err).Msg("the round trips' profile was not taken")
		}
	}()
	d := make([]time.Duration, f.cfg.Samples)
	for i := range d {
		t0 := time.Now()
		if err := f.command(ctx, f.ids[i%len(f.ids)]); err != nil {
			return err
		}
		d[i] = time.Since(t0)
	}
	rep.RoundTrip = latencies(d)
	return nil
}

// profile fetches one of the server's profiles into ProfileDir (nothing
// without one); the channel gives the outcome.
func (f *fleet) profile(what, file string) <-chan error {
	return f.profileWhenUp(what, file, 0)
}

// profileWhenUp is profile of a server that may not listen yet: it tries
// for up to wait.
func (f *fleet) profileWhenUp(what, file string, wait time.Duration) <-chan error {
	done := make(chan error, 1)
	if f.cfg.ProfileDir == "" {
		done <- nil
		return done
	}
	// The file first: a simulator of 10,000 agents that reconnect at once
	// may have no descriptor left later.
	out, err := os.Create(filepath.Join(f.cfg.ProfileDir, file))
	if err != nil {
		done <- err
		return done
	}
	go func() {
		err := f.fetchProfile(what, out, wait)
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			_ = os.Remove(out.Name())
		}
		done <- err
	}()
	return done
}

// fetchProfile copies one of the server's profiles into out, trying for
// up to wait to reach the server.
func (f *fleet) fetchProfile(what string, out io.Writer, wait time.Duration) error {
	resp, err := http.Get(f.srv.pprofURL + what)
	for deadline := time.Now().Add(wait); err != nil && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
		resp, err = http.Get(f.srv.pprofURL + what)
	}
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("profile %s: %s", what, resp.Status)
	}
	_, err = io.Copy(out, resp.Body)
	return err
}

// command asks an instance's DSS to restart and waits until the future is
// done, reading it as often as a client that wants it at once would.
func (f *fleet) command(ctx context.Context, id string) error {
	return f.commandPolled(ctx, id, time.Minute, 500*time.Microsecond)
}

// commandPolled is command with its future read every poll, for at most
// timeout.
func (f *fleet) commandPolled(ctx context.Context, id string, timeout, poll time.Duration) error {
	var fut api.Future
	if err := f.api.Do(ctx, http.MethodGet, "/instances/"+id+"/actions/restart-dss", nil, nil, &fut); err != nil {
		return err
	}
	return f.wait(ctx, fut, timeout, poll)
}

// reads times the REST reads: the whole list (not parsed, as by curl),
// one instance, one status, and the floor of the list: encoding the same
// instances to JSON.
func (f *fleet) reads(ctx context.Context, rep *Report) error {
	// Lists are timed at least max(5, Samples/10) times and, while the
	// server is profiled, for the profile's 3 seconds.
	lists := max(5, f.cfg.Samples/10)
	var profiled <-chan error
	until := time.Now()
	if f.cfg.ProfileDir != "" {
		profiled, until = f.profile("profile?seconds=3", "server-list.cpu.pprof"), time.Now().Add(3*time.Second)
	}
	var d []time.Duration
	for len(d) < lists || time.Now().Before(until) {
		t0 := time.Now()
		if err := f.api.Do(ctx, http.MethodGet, "/instances", nil, nil, nil); err != nil {
			return err
		}
		d = append(d, time.Since(t0))
	}
	if profiled != nil {
		if err := <-profiled; err != nil {
			return err
		}
	}
	rep.List = latencies(d)
	var all []api.Instance
	if err := f.api.Do(ctx, http.MethodGet, "/instances", nil, nil, &all); err != nil {
		return err
	}
	for i := range d {
		t0 := time.Now()
		b, err := json.Marshal(all)
		if err != nil {
			return err
		}
		d[i], rep.ListBytes = time.Since(t0), len(b)
	}
	rep.ListEncode = latencies(d)
	if err := f.createAlone(ctx, rep); err != nil {
		return err
	}
	for _, r := range []struct {
		path func(id string) string
		into *Latencies
	}{
		{func(id string) string { return "/instances/" + id }, &rep.Get},
		{func(id string) string { return "/instances/" + id + "/status" }, &rep.Status},
	} {
		d := make([]time.Duration, f.cfg.Samples)
		for i := range d {
			t0 := time.Now()
			if err := f.api.Do(ctx, http.MethodGet, r.path(f.ids[i%len(f.ids)]), nil, nil, nil); err != nil {
				return err
			}
			d[i] = time.Since(t0)
		}
		*r.into = latencies(d)
	}
	return nil
}

// createAlone measures creates one at a time beside the fleet made (the
// fleet's own creates run many at once, and their latency is mostly their
// wait for each other), then deletes what it made, so that nothing after
// measures more than the fleet.
func (f *fleet) createAlone(ctx context.Context, rep *Report) error {
	d := make([]time.Duration, min(200, f.cfg.Samples))
	ids := make([]string, 0, len(d))
	for i := range d {
		var in api.Instance
		t0 := time.Now()
		err := f.api.Do(ctx, http.MethodPost, "/instances", nil, map[string]any{"label": fmt.Sprintf("alone-%05d", i),
			"instanceSettingsTemplateId": f.tpl, "virtualNetworkId": f.vn, "imageId": f.im}, &in)
		d[i] = time.Since(t0)
		if err != nil {
			return fmt.Errorf("create: %w", err)
		}
		ids = append(ids, in.ID)
	}
	rep.CreateAlone = latencies(d)
	return f.parallel(ctx, len(ids), func(ctx context.Context, i int) error {
		var fut api.Future
		if err := f.api.Do(ctx, http.MethodGet, "/instances/"+ids[i]+"/actions/delete", nil, nil, &fut); err != nil {
			return fmt.Errorf("delete: %w", err)
		}
		return f.wait(ctx, fut, time.Minute, 20*time.Millisecond)
	})
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
