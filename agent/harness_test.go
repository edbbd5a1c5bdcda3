package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/deploy/standin/kit"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

var (
	kitsOnce sync.Once
	kitPaths = map[string]string{}
	kitsErr  error
	kitsDir  string
)

func TestMain(m *testing.M) {
	var err error
	if kitsDir, err = os.MkdirTemp("", "agent-kits-"); err != nil {
		panic(err)
	}
	code := m.Run()
	os.RemoveAll(kitsDir)
	os.Exit(code)
}

// standinKit returns the path and SHA-256 of the stand-in kit of version,
// built once per test binary.
func standinKit(t *testing.T, version string) protocol.KitSource {
	t.Helper()
	kitsOnce.Do(func() {
		for _, v := range kit.Versions {
			p, err := kit.Build("..", v, kitsDir)
			if err != nil {
				kitsErr = err
				return
			}
			kitPaths[v] = p
		}
	})
	if kitsErr != nil {
		t.Fatal(kitsErr)
	}
	sum, err := fileSHA256(kitPaths[version])
	if err != nil {
		t.Fatal(err)
	}
	return protocol.KitSource{Path: kitPaths[version], SHA256: hex.EncodeToString(sum)}
}

// rig is one machine: a bus, folders for the OS disk and the data volume,
// and an agent that can be started and stopped.
type rig struct {
	t        *testing.T
	bus      *bustest.Server
	nc       *nats.Conn
	js       jetstream.JetStream
	instance string
	root     string
	data     string
	port     int
	cfg      Config

	agent  *Agent
	cancel context.CancelFunc
	done   chan error
	events *eventLog
	gen    uint64
	// lastCommand is the id of the command a crash scenario sent, and
	// lastDesired the desired state written last.
	lastCommand string
	lastDesired *protocol.DesiredState
	// since, if set, makes waitReady wait for a status written after it.
	since time.Time
	// tune, if set, changes each agent made before it runs.
	tune func(*Agent)
}

func newRig(t *testing.T) *rig {
	t.Helper()
	srv := bustest.Run(t)
	srv.ServeCommandCatchUps(t)
	r := &rig{t: t, bus: srv, instance: "in-" + strings.ToLower(protocol.NewID("t")[2:12]),
		root: t.TempDir(), data: t.TempDir(), port: freePort(t)}
	r.nc = srv.Connect(t)
	r.js, _ = jetstream.New(r.nc)
	r.cfg = Config{
		Instance: r.instance, NATSURL: srv.URL(), RootDir: r.root, DataDir: r.data,
		PackageManager: "none", DSSUser: currentUser(t), HTTPSAddress: "127.0.0.1", HealthInterval: 200 * time.Millisecond, FactsInterval: 200 * time.Millisecond,
		StatusRefresh: time.Second, DSSStartTimeout: 30 * time.Second, DSSStopTimeout: 5 * time.Second,
		Logger: zerolog.Nop(), Version: "test",
	}
	r.events = watchEvents(t, r.js, r.instance)
	t.Cleanup(func() {
		r.stopAgent()
		// DSS runs in its own session; stop whatever of it is left.
		newMachine(r.cfg, zerolog.Nop()).killDSS()
	})
	return r
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func (r *rig) startAgent() {
	r.t.Helper()
	a, err := New(r.cfg)
	if err != nil {
		r.t.Fatal(err)
	}
	if r.tune != nil {
		r.tune(a)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r.agent, r.cancel, r.done = a, cancel, make(chan error, 1)
	go func() { r.done <- a.Run(ctx) }()
}

func (r *rig) stopAgent() {
	if r.cancel == nil {
		return
	}
	r.cancel()
	select {
	case err := <-r.done:
		if err != nil {
			r.t.Errorf("agent.Run: %v", err)
		}
	case <-time.After(30 * time.Second):
		r.t.Error("the agent did not stop within 30s")
	}
	r.agent.Close()
	r.cancel = nil
}

// newMachineRoot replaces the OS disk, as a reprovision does.
func (r *rig) newMachineRoot() {
	r.root = r.t.TempDir()
	r.cfg.RootDir = r.root
}

// desire writes a desired state with the next generation and returns it.
func (r *rig) desire(version string, actions ...protocol.SetupAction) *protocol.DesiredState {
	r.t.Helper()
	return r.desireWith(version, func(d *protocol.DesiredState) { d.SetupActions = actions })
}

// desireWith writes a desired state with the next generation, as change
// makes it, and returns it.
func (r *rig) desireWith(version string, change func(*protocol.DesiredState)) *protocol.DesiredState {
	r.t.Helper()
	r.gen++
	d := &protocol.DesiredState{
		Instance: r.instance, Generation: r.gen, NodeType: "design", HeartbeatSeconds: 1,
		DSS: protocol.DSSTarget{ImageID: "dss-" + version + "-standin", Version: version, Port: r.port, Kit: standinKit(r.t, version)},
	}
	change(d)
	r.put(d)
	r.lastDesired = d
	return d
}

func (r *rig) put(d *protocol.DesiredState) {
	r.t.Helper()
	data, err := protocol.Encode(d)
	if err != nil {
		r.t.Fatal(err)
	}
	r.putRaw(data)
}

func (r *rig) putRaw(data []byte) {
	r.t.Helper()
	kv, err := r.js.KeyValue(context.Background(), protocol.BucketDesired)
	if err != nil {
		r.t.Fatal(err)
	}
	if _, err := kv.Put(context.Background(), r.instance, data); err != nil {
		r.t.Fatal(err)
	}
}

// status reads the agent's status from fm_agents.
func (r *rig) status() (protocol.AgentStatus, bool) {
	var st protocol.AgentStatus
	kv, err := r.js.KeyValue(context.Background(), protocol.BucketAgents)
	if err != nil {
		return st, false
	}
	e, err := kv.Get(context.Background(), r.instance)
	if err != nil {
		return st, false
	}
	if err := protocol.Decode(e.Value(), &st); err != nil {
		r.t.Fatalf("fm_agents holds a bad status: %v", err)
	}
	return st, true
}

// waitStatus polls fm_agents until cond holds.
func (r *rig) waitStatus(what string, timeout time.Duration, cond func(protocol.AgentStatus) bool) protocol.AgentStatus {
	r.t.Helper()
	deadline := time.Now().Add(timeout)
	var last protocol.AgentStatus
	for time.Now().Before(deadline) {
		if st, ok := r.status(); ok {
			last = st
			if cond(st) {
				return st
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	b, _ := json.MarshalIndent(last, "", "  ")
	r.t.Fatalf("status never %s within %s; last:\n%s\nevents:\n%s", what, timeout, b, r.events.dump())
	return last
}

func (r *rig) waitReady(gen uint64) protocol.AgentStatus {
	r.t.Helper()
	return r.waitStatus(fmt.Sprintf("ready at generation %d", gen), 90*time.Second, func(s protocol.AgentStatus) bool {
		return s.Phase == protocol.PhaseReady && s.Generation == gen && s.Time.After(r.since)
	})
}

func (r *rig) waitFailed(gen uint64) protocol.AgentStatus {
	r.t.Helper()
	return r.waitStatus(fmt.Sprintf("failed at generation %d", gen), 90*time.Second, func(s protocol.AgentStatus) bool {
		return s.Phase == protocol.PhaseFailed && s.Target == gen
	})
}

// command publishes a command and returns its id.
func (r *rig) command(kind protocol.CommandKind, params any) string {
	r.t.Helper()
	id := protocol.NewID("cmd")
	r.commandWithID(id, id, kind, params, time.Time{})
	return id
}

func (r *rig) commandWithID(id, msgID string, kind protocol.CommandKind, params any, expires time.Time) {
	r.t.Helper()
	c := protocol.Command{ID: id, Instance: r.instance, Kind: kind, Issued: time.Now().UTC(), Expires: expires}
	if params != nil {
		c.Params, _ = json.Marshal(params)
	}
	data, err := protocol.Encode(&c)
	if err != nil {
		r.t.Fatal(err)
	}
	if _, err := r.js.Publish(context.Background(), protocol.CommandSubject(r.instance, id), data, jetstream.WithMsgID(msgID)); err != nil {
		r.t.Fatal(err)
	}
}

// result waits for the result event of a command.
func (r *rig) result(id string) protocol.Event {
	r.t.Helper()
	return r.events.wait(r.t, "result of "+id, 60*time.Second, func(e protocol.Event) bool {
		return e.Kind == protocol.EventCommand && e.CommandID == id
	})
}

// adminKey is the admin API key the agent made and keeps.
func (r *rig) adminKey() string {
	r.t.Helper()
	var s dssSecrets
	if _, err := loadJSON(filepath.Join(r.data, "fm-agent", "dss-credentials.json"), &s); err != nil {
		r.t.Fatal(err)
	}
	return s.AdminAPIKey
}

func (r *rig) dssDir() string { return filepath.Join(r.data, "dataiku", "dss_data") }

// dssPort is the port DSS uses now.
func (r *rig) dssPort() int {
	st, _ := r.status()
	if st.DSS.Port != 0 {
		return st.DSS.Port
	}
	return r.port
}

func (r *rig) get(path string, key string) (int, []byte) {
	r.t.Helper()
	req, _ := http.NewRequest("GET", fmt.Sprintf("http://127.0.0.1:%d%s", r.dssPort(), path), nil)
	if key != "" {
		req.SetBasicAuth(key, "")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil
	}
	defer resp.Body.Close()
	var b strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := resp.Body.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			break
		}
	}
	return resp.StatusCode, []byte(b.String())
}

func (r *rig) login(user, pw string) int {
	r.t.Helper()
	resp, err := http.Post(fmt.Sprintf("http://127.0.0.1:%d/api/login", r.dssPort()), "application/json",
		strings.NewReader(fmt.Sprintf(`{"login":%q,"password":%q}`, user, pw)))
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// eventLog collects the instance's events from FM_EVENTS.
type eventLog struct {
	mu     sync.Mutex
	events []protocol.Event
}

func watchEvents(t *testing.T, js jetstream.JetStream, instance string) *eventLog {
	t.Helper()
	l := &eventLog{}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	cons, err := js.OrderedConsumer(ctx, protocol.StreamEvents, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{"fm.evt." + instance + ".*"}})
	if err != nil {
		t.Fatal(err)
	}
	cc, err := cons.Consume(func(m jetstream.Msg) {
		var e protocol.Event
		if err := protocol.Decode(m.Data(), &e); err != nil {
			t.Errorf("an agent event does not decode: %v", err)
			return
		}
		l.mu.Lock()
		l.events = append(l.events, e)
		l.mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cc.Stop)
	return l
}

func (l *eventLog) all() []protocol.Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]protocol.Event(nil), l.events...)
}

func (l *eventLog) find(match func(protocol.Event) bool) []protocol.Event {
	var out []protocol.Event
	for _, e := range l.all() {
		if match(e) {
			out = append(out, e)
		}
	}
	return out
}

func (l *eventLog) wait(t *testing.T, what string, timeout time.Duration, match func(protocol.Event) bool) protocol.Event {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if found := l.find(match); len(found) > 0 {
			return found[0]
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("no event: %s within %s\nevents:\n%s", what, timeout, l.dump())
	return protocol.Event{}
}

func (l *eventLog) dump() string {
	var b strings.Builder
	for _, e := range l.all() {
		fmt.Fprintf(&b, "  gen=%d %s %s %s: %s", e.Generation, e.Kind, e.Step, e.Status, e.Message)
		if e.Error != nil {
			fmt.Fprintf(&b, " [%s]", e.Error.Message)
		}
		b.WriteString("\n")
	}
	return b.String()
}

func action(t protocol.SetupActionType, params string) protocol.SetupAction {
	return protocol.SetupAction{Type: t, Params: json.RawMessage(params), Enabled: true}
}

func sha256hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// currentUser is the user the test runs as: the rig's DSS runs as it.
func currentUser(t *testing.T) string {
	u, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	return u.Username
}
