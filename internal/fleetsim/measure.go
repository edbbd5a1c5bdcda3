package fleetsim

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Latencies summarize timed samples.
type Latencies struct {
	N             int
	P50, P99, Max time.Duration
}

func latencies(d []time.Duration) Latencies {
	if len(d) == 0 {
		return Latencies{}
	}
	s := slices.Clone(d)
	slices.Sort(s)
	at := func(q float64) time.Duration { return s[min(len(s)-1, int(q*float64(len(s))))] }
	return Latencies{N: len(s), P50: at(0.50), P99: at(0.99), Max: s[len(s)-1]}
}

func (l Latencies) String() string {
	return fmt.Sprintf("p50 %v  p99 %v  (n=%d)", round(l.P50), round(l.P99), l.N)
}

func round(d time.Duration) time.Duration {
	switch {
	case d >= time.Second:
		return d.Round(time.Millisecond)
	case d >= time.Millisecond:
		return d.Round(10 * time.Microsecond)
	default:
		return d.Round(time.Microsecond)
	}
}

// readiness follows fm_agents: which agents have reached the generation
// they were given.
type readiness struct {
	w      jetstream.KeyWatcher
	mu     sync.Mutex
	ready  map[string]bool
	gen    map[string]uint64 // the generation each agent last reached
	failed map[string]string
	done   chan struct{}
}

func watchReadiness(ctx context.Context, js jetstream.JetStream) (*readiness, error) {
	kv, err := js.KeyValue(ctx, protocol.BucketAgents)
	if err != nil {
		return nil, err
	}
	w, err := kv.WatchAll(context.Background(), jetstream.IgnoreDeletes())
	if err != nil {
		return nil, err
	}
	r := &readiness{w: w, ready: map[string]bool{}, gen: map[string]uint64{}, failed: map[string]string{}, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		for e := range w.Updates() {
			if e == nil {
				continue
			}
			var st protocol.AgentStatus
			if protocol.Decode(e.Value(), &st) != nil {
				continue
			}
			r.mu.Lock()
			r.ready[e.Key()] = st.Phase == protocol.PhaseReady && st.Generation > 0 && st.Generation == st.Target
			r.gen[e.Key()] = st.Generation
			if st.Phase == protocol.PhaseFailed && st.Error != nil {
				r.failed[e.Key()] = st.Error.Message
			} else {
				delete(r.failed, e.Key())
			}
			r.mu.Unlock()
		}
	}()
	return r, nil
}

func (r *readiness) count() (ready, failed int, aFailure string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, ok := range r.ready {
		if ok {
			ready++
		}
	}
	for id, msg := range r.failed {
		aFailure = id + ": " + msg
	}
	return ready, len(r.failed), aFailure
}

// generations is the generation each agent last reported reached.
func (r *readiness) generations() map[string]uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.gen)
}

// behind counts the agents of ids that reported no generation past the
// one in before.
func (r *readiness) behind(ids []string, before map[string]uint64) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, id := range ids {
		if r.gen[id] <= before[id] {
			n++
		}
	}
	return n
}

// wait waits until n agents are ready, saying how many are every 10s.
func (r *readiness) wait(ctx context.Context, n int, timeout time.Duration, say func(string, ...any)) error {
	deadline := time.Now().Add(timeout)
	lastSaid := time.Now()
	for {
		ready, failed, failure := r.count()
		if ready >= n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d of %d agents ready after %v (%d failed; %s)", ready, n, timeout, failed, failure)
		}
		if time.Since(lastSaid) >= 10*time.Second {
			say("%d of %d agents ready", ready, n)
			lastSaid = time.Now()
		}
		if err := sleep(ctx, 100*time.Millisecond); err != nil {
			return err
		}
	}
}

func (r *readiness) stop() {
	_ = r.w.Stop()
	<-r.done
}

// floors times what a command's round trip cannot beat: a bare NATS
// request-reply between two connections, and the round trip's bus writes
// and reads done back to back by one bare client on a stream and bucket of
// its own (removed after).
func (f *fleet) floors(ctx context.Context, rep *Report) error {
	other, err := bus.Connect(bus.ConnectConfig{URL: f.srv.natsURL, Creds: f.creds, Name: "fm-bench-floor", Logger: f.cfg.Logger})
	if err != nil {
		return err
	}
	defer other.Close()
	sub, err := f.nc.Subscribe("fmbench.echo", func(m *nats.Msg) { _ = m.Respond(m.Data) })
	if err != nil {
		return err
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := f.nc.Flush(); err != nil {
		return err
	}
	payload := make([]byte, 300)
	d := make([]time.Duration, f.cfg.Samples)
	for i := range d {
		t0 := time.Now()
		if _, err := other.Request("fmbench.echo", payload, 5*time.Second); err != nil {
			return err
		}
		d[i] = time.Since(t0)
	}
	rep.FloorRequestReply = latencies(d)

	const stream, bucket = "FMBENCH", "fmbench"
	if _, err := f.js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{Name: stream, Subjects: []string{"fmbench.js.>"},
		Storage: jetstream.FileStorage, MaxMsgs: 10000}); err != nil {
		return err
	}
	defer func() { _ = f.js.DeleteStream(context.Background(), stream) }()
	kv, err := f.js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: bucket, Storage: jetstream.FileStorage})
	if err != nil {
		return err
	}
	defer func() { _ = f.js.DeleteKeyValue(context.Background(), bucket) }()
	consume := func(js jetstream.JetStream, subject string) (chan struct{}, func(), error) {
		c, err := js.OrderedConsumer(ctx, stream, jetstream.OrderedConsumerConfig{FilterSubjects: []string{subject},
			DeliverPolicy: jetstream.DeliverNewPolicy})
		if err != nil {
			return nil, nil, err
		}
		got := make(chan struct{}, 1)
		cc, err := c.Consume(func(m jetstream.Msg) { got <- struct{}{} })
		if err != nil {
			return nil, nil, err
		}
		return got, cc.Stop, nil
	}
	// The command goes to the "agent" connection, the event back to FM's.
	otherJS, err := jetstream.New(other)
	if err != nil {
		return err
	}
	cmds, stopCmds, err := consume(otherJS, "fmbench.js.cmd")
	if err != nil {
		return err
	}
	defer stopCmds()
	evts, stopEvts, err := consume(f.js, "fmbench.js.evt")
	if err != nil {
		return err
	}
	defer stopEvts()
	for i := range d {
		t0 := time.Now()
		if _, err := kv.Put(ctx, "op", payload); err != nil {
			return err
		}
		if _, err := f.js.Publish(ctx, "fmbench.js.cmd", payload); err != nil {
			return err
		}
		if _, err := within(cmds, "a floor message"); err != nil {
			return err
		}
		if _, err := otherJS.Publish(ctx, "fmbench.js.evt", payload); err != nil {
			return err
		}
		if _, err := within(evts, "a floor message"); err != nil {
			return err
		}
		if _, err := kv.Put(ctx, "op", payload); err != nil {
			return err
		}
		d[i] = time.Since(t0)
	}
	rep.FloorJetStream = latencies(d)
	if rep.FloorFMSequence, err = fmSequence(ctx, f.js, other, f.nc, f.cfg.Samples); err != nil {
		return err
	}
	return nil
}

// within waits up to 5 s for what a floor waits for on ch.
func within[T any](ch <-chan T, what string) (T, error) {
	select {
	case v := <-ch:
		return v, nil
	case <-time.After(5 * time.Second):
		var zero T
		return zero, fmt.Errorf("%s did not arrive within 5s", what)
	}
}

// fmSequence times, by bare clients, the bus calls FM makes for one
// command's round trip, one after another in FM's order (traced with
// `nats sub '>'` on fm dev during `fm instance restart-dss`):
//
//	the action:  get lifecycle, get machine, create the operation, claim
//	             the lifecycle, get the instance, mark the operation
//	             claimed, publish the command (republished live to the
//	             agent), publish the audit record;
//	the agent:   its result, through the relay: a request into FM's
//	             account, which publishes it to the events' stream and
//	             answers;
//	the fold:    the event delivered, get the operation, end it, get the
//	             lifecycle, release the lifecycle, ack the event;
//	the client:  the operation's end seen by a watcher (FM's copy of the
//	             bucket, which GET /futures reads).
//
// js is FM's connection, agent the agent's, relay the relay's. The floor's
// "agent" is a user of FM's account, and the relay shares FM's connection:
// the floor does not cross from the agents' account into FM's through the
// relay's service import, as an agent's result does.
func fmSequence(ctx context.Context, js jetstream.JetStream, agent, relay *nats.Conn, samples int) (Latencies, error) {
	kvs := map[string]jetstream.KeyValue{}
	for _, b := range []string{"fmbench_ops", "fmbench_lifecycle", "fmbench_machines", "fmbench_instances"} {
		kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: b, Storage: jetstream.FileStorage})
		if err != nil {
			return Latencies{}, err
		}
		defer func() { _ = js.DeleteKeyValue(context.Background(), b) }()
		kvs[b] = kv
	}
	ops, lifecycle := kvs["fmbench_ops"], kvs["fmbench_lifecycle"]
	record := make([]byte, 600) // an operation or lifecycle record's size
	for _, b := range []string{"fmbench_lifecycle", "fmbench_machines", "fmbench_instances"} {
		if _, err := kvs[b].Put(ctx, "in-bench", record); err != nil {
			return Latencies{}, err
		}
	}
	for _, sc := range []jetstream.StreamConfig{
		{Name: "FMBENCH_CMD", Subjects: []string{"fmbench.cmd.>"}, Storage: jetstream.FileStorage, MaxMsgs: 10000,
			RePublish: &jetstream.RePublish{Source: "fmbench.cmd.>", Destination: "fmbench.cmdlive.>"}},
		{Name: "FMBENCH_EVT", Subjects: []string{"fmbench.evt.>"}, Storage: jetstream.FileStorage, MaxMsgs: 10000},
		{Name: "FMBENCH_AUDIT", Subjects: []string{"fmbench.audit.>"}, Storage: jetstream.FileStorage, MaxMsgs: 10000},
	} {
		if _, err := js.CreateOrUpdateStream(ctx, sc); err != nil {
			return Latencies{}, err
		}
		defer func() { _ = js.DeleteStream(context.Background(), sc.Name) }()
	}
	live, err := agent.SubscribeSync("fmbench.cmdlive.>")
	if err != nil {
		return Latencies{}, err
	}
	defer func() { _ = live.Unsubscribe() }()
	relayJS, err := jetstream.New(relay)
	if err != nil {
		return Latencies{}, err
	}
	relaySub, err := relay.Subscribe("fmbench.in.>", func(m *nats.Msg) {
		ack, err := relayJS.Publish(ctx, strings.TrimPrefix(m.Subject, "fmbench.in."), m.Data)
		if err != nil {
			_ = m.Respond([]byte(err.Error()))
			return
		}
		_ = m.Respond([]byte(strconv.FormatUint(ack.Sequence, 10)))
	})
	if err != nil {
		return Latencies{}, err
	}
	defer func() { _ = relaySub.Unsubscribe() }()
	if err := relay.Flush(); err != nil {
		return Latencies{}, err
	}
	events, err := js.CreateOrUpdateConsumer(ctx, "FMBENCH_EVT", jetstream.ConsumerConfig{Durable: "fm-server", AckPolicy: jetstream.AckExplicitPolicy})
	if err != nil {
		return Latencies{}, err
	}
	delivered := make(chan jetstream.Msg, 1)
	cc, err := events.Consume(func(m jetstream.Msg) { delivered <- m })
	if err != nil {
		return Latencies{}, err
	}
	defer cc.Stop()
	watch, err := ops.WatchAll(ctx, jetstream.UpdatesOnly())
	if err != nil {
		return Latencies{}, err
	}
	defer func() { _ = watch.Stop() }()

	d := make([]time.Duration, samples)
	for i := range d {
		op := fmt.Sprintf("op-%d", i)
		t0 := time.Now()
		err := func() error {
			lc, err := lifecycle.Get(ctx, "in-bench")
			if err != nil {
				return err
			}
			if _, err := kvs["fmbench_machines"].Get(ctx, "in-bench"); err != nil {
				return err
			}
			recorded, err := ops.Create(ctx, op, record)
			if err != nil {
				return err
			}
			if _, err := lifecycle.Update(ctx, "in-bench", record, lc.Revision()); err != nil {
				return err
			}
			if _, err := kvs["fmbench_instances"].Get(ctx, "in-bench"); err != nil {
				return err
			}
			if _, err := ops.Update(ctx, op, record, recorded); err != nil {
				return err
			}
			if _, err := js.Publish(ctx, "fmbench.cmd.in-bench."+op, record); err != nil {
				return err
			}
			if _, err := js.Publish(ctx, "fmbench.audit.main.instances", record); err != nil {
				return err
			}
			if _, err := live.NextMsg(5 * time.Second); err != nil {
				return fmt.Errorf("the command did not reach the agent: %w", err)
			}
			answer, err := agent.Request("fmbench.in.fmbench.evt.in-bench.command", record, 5*time.Second)
			if err != nil {
				return err
			}
			if _, err := strconv.ParseUint(string(answer.Data), 10, 64); err != nil {
				return fmt.Errorf("the relay: %s", answer.Data)
			}
			m, err := within(delivered, "the event")
			if err != nil {
				return err
			}
			e, err := ops.Get(ctx, op)
			if err != nil {
				return err
			}
			end, err := ops.Update(ctx, op, record, e.Revision())
			if err != nil {
				return err
			}
			if lc, err = lifecycle.Get(ctx, "in-bench"); err != nil {
				return err
			}
			if _, err := lifecycle.Update(ctx, "in-bench", record, lc.Revision()); err != nil {
				return err
			}
			if err := m.Ack(); err != nil {
				return err
			}
			// The operation's end, as the copy sees it. A bucket keeps one
			// revision per key, so a watcher that lags behind the writes
			// skips the ones already replaced: it is the end that is waited
			// for, not a count of writes.
			timeout := time.After(5 * time.Second)
			for {
				select {
				case u := <-watch.Updates():
					if u != nil && u.Key() == op && u.Revision() >= end {
						return nil
					}
				case <-timeout:
					return fmt.Errorf("the watcher did not see the operation end within 5s")
				}
			}
		}()
		if err != nil {
			return Latencies{}, fmt.Errorf("floor, FM's sequence: %w", err)
		}
		d[i] = time.Since(t0)
	}
	return latencies(d), nil
}

// storm restarts the server under the fleet: the time from the stop until
// every agent beats again and a command to each of up to 100 of them has
// been answered.
func (f *fleet) storm(ctx context.Context, rep *Report) error {
	var mu sync.Mutex
	var stopped time.Time
	back := map[string]bool{}
	sub, err := f.nc.Subscribe(protocol.HeartbeatSubject("*"), func(m *nats.Msg) {
		inst := strings.TrimPrefix(m.Subject, protocol.HeartbeatSubject(""))
		mu.Lock()
		if !stopped.IsZero() {
			back[inst] = true
		}
		mu.Unlock()
	})
	if err != nil {
		return err
	}
	defer func() { _ = sub.Unsubscribe() }()
	t0 := time.Now()
	if err := f.srv.stop(); err != nil {
		return err
	}
	mu.Lock()
	stopped = time.Now()
	mu.Unlock()
	// The new server's first minute, from as soon as it listens.
	profiled := f.profileWhenUp("profile?seconds=60", "server-storm.cpu.pprof", 3*time.Minute)
	defer func() {
		if err := <-profiled; err != nil {
			fmt.Fprintf(f.cfg.Progress, "the reconnect storm's profile was not taken: %v\n", err)
		}
	}()
	if err := f.srv.start(ctx); err != nil {
		return err
	}
	rep.StormStop, rep.StormStart = stopped.Sub(t0), time.Since(stopped)
	n := min(100, len(f.ids))
	// Their futures read every 50 ms, not every 0.5 ms as the round trips'
	// are: 32 readers that fast would be a load of their own on the server
	// the storm measures.
	if err := f.parallel(ctx, n, func(ctx context.Context, i int) error {
		return f.commandPolled(ctx, f.ids[i*len(f.ids)/n], 10*time.Minute, 50*time.Millisecond)
	}); err != nil {
		return err
	}
	rep.StormCommands = time.Since(t0)
	deadline := time.Now().Add(10 * time.Minute)
	for {
		mu.Lock()
		k := len(back)
		mu.Unlock()
		if k >= len(f.ids) {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d of %d agents beat again within 10 minutes of the restart", k, len(f.ids))
		}
		if err := sleep(ctx, 50*time.Millisecond); err != nil {
			return err
		}
	}
	rep.Reconnect = time.Since(t0)
	return nil
}

// Write prints the report as the rows of docs/benchmarks.md.
func (r Report) Write(w io.Writer) {
	ratio := func(a, b time.Duration) string {
		if b <= 0 {
			return "–"
		}
		return fmt.Sprintf("%.2f×", float64(a)/float64(b))
	}
	fmt.Fprintf(w, "fleet: %d simulated agents, heartbeat %v, bus sync always: %v", r.Agents, r.Heartbeat, r.SyncAlways)
	if r.ServerMemoryLimit != "" {
		fmt.Fprintf(w, ", server GOMEMLIMIT %s", r.ServerMemoryLimit)
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "  create instance        %v   (making the fleet, %d at a time)\n", r.Create, r.Workers)
	fmt.Fprintf(w, "    one at a time        %v   (beside the fleet made)\n", r.CreateAlone)
	fmt.Fprintf(w, "  provision all          every agent ready in %v\n", round(r.Provision))
	fmt.Fprintf(w, "  command round trip     %v\n", r.RoundTrip)
	fmt.Fprintf(w, "    floor: bus writes    %v   (round trip p50 %s of it)\n", r.FloorJetStream, ratio(r.RoundTrip.P50, r.FloorJetStream.P50))
	fmt.Fprintf(w, "    floor: FM's calls    %v   (round trip p50 %s of it)\n", r.FloorFMSequence, ratio(r.RoundTrip.P50, r.FloorFMSequence.P50))
	fmt.Fprintf(w, "    floor: request-reply %v   (round trip p50 %s of it)\n", r.FloorRequestReply, ratio(r.RoundTrip.P50, r.FloorRequestReply.P50))
	fmt.Fprintf(w, "  list instances         %v   (%d bytes)\n", r.List, r.ListBytes)
	fmt.Fprintf(w, "    floor: JSON encoding %v   (list p50 %s of it)\n", r.ListEncode, ratio(r.List.P50, r.ListEncode.P50))
	fmt.Fprintf(w, "  get instance           %v\n", r.Get)
	fmt.Fprintf(w, "  instance status        %v\n", r.Status)
	s := r.Steady
	fmt.Fprintf(w, "  steady (%v)           fm server %.1f%% of a core, %.0f MiB RSS; per agent %.2f msgs/s, %.0f B/s; simulator %.0f MiB RSS (%.1f KiB per agent)\n",
		s.Window.Round(time.Second), s.ServerCPU*100, float64(s.ServerRSS)/(1<<20), s.MsgsPerAgent, s.BytesPerAgent,
		float64(s.SimulatorRSS)/(1<<20), float64(s.SimulatorRSS)/1024/float64(max(1, r.Agents)))
	if r.ChangeReached > 0 {
		fmt.Fprintf(w, "  fleet-wide change      every agent at the new generation in %v (replays asked in %v; every operation ended in %v)\n",
			round(r.ChangeReached), round(r.ChangeAsked), round(r.ChangeDone))
	}
	if r.Reconnect > 0 {
		fmt.Fprintf(w, "  reconnect storm        all back in %v (server stopped in %v, started in %v; commands answered at %v)\n",
			round(r.Reconnect), round(r.StormStop), round(r.StormStart), round(r.StormCommands))
	}
}

// JSON is the report for machines.
func (r Report) JSON() ([]byte, error) { return json.MarshalIndent(r, "", "  ") }
