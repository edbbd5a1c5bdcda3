package agent

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

func TestCommandsRunOnceAndAfterAnOutage(t *testing.T) {
	r := newRig(t)
	r.startAgent()
	r.waitReady(r.desire("14.0.0").Generation)

	// The same command published twice with one message id is stored once;
	// published twice with two ids it reaches the agent twice and runs once.
	id := protocol.NewID("cmd")
	r.commandWithID(id, id, protocol.CommandRestartDSS, nil, time.Time{})
	r.commandWithID(id, id, protocol.CommandRestartDSS, nil, time.Time{})
	r.commandWithID(id, id+"-again", protocol.CommandRestartDSS, nil, time.Time{})
	if res := r.result(id); res.Status != protocol.StatusOK {
		t.Fatalf("restart-dss: %+v", res)
	}
	marker := r.command(protocol.CommandGetAdminAPIKey, nil) // processed after the duplicates
	r.result(marker)
	if n := len(r.events.find(func(e protocol.Event) bool { return e.CommandID == id })); n != 1 {
		t.Fatalf("restart-dss ran %d times", n)
	}

	// Initial password and admin key work against DSS.
	res := r.result(r.command(protocol.CommandGetInitialPassword, nil))
	var pw protocol.InitialPasswordResult
	json.Unmarshal(res.Result, &pw)
	if pw.UserName != "admin" || r.login("admin", pw.Password) != 200 {
		t.Fatalf("initial password %+v", pw)
	}
	var key protocol.AdminAPIKeyResult
	json.Unmarshal(r.result(marker).Result, &key)
	if code, _ := r.get("/public/api/projects/", key.AdminAPIKey); code != 200 {
		t.Fatalf("admin API key refused: %d", code)
	}

	// A command sent while the agent is away runs once when it is back.
	r.stopAgent()
	reset := r.command(protocol.CommandResetUserPassword, protocol.ResetUserPasswordParams{UserName: "admin", Password: "n3w-Passw0rd"})
	time.Sleep(300 * time.Millisecond)
	if len(r.events.find(func(e protocol.Event) bool { return e.CommandID == reset })) != 0 {
		t.Fatal("a command ran with no agent")
	}
	r.startAgent()
	if res := r.result(reset); res.Status != protocol.StatusOK {
		t.Fatalf("reset-user-password: %+v", res)
	}
	if r.login("admin", "n3w-Passw0rd") != 200 {
		t.Fatal("the new password does not log in")
	}
	// A restart does not run finished commands again.
	r.stopAgent()
	r.startAgent()
	probe := r.command(protocol.CommandGetAdminAPIKey, nil)
	r.result(probe)
	for _, c := range []string{id, reset} {
		if n := len(r.events.find(func(e protocol.Event) bool { return e.CommandID == c })); n != 1 {
			t.Fatalf("command %s answered %d times across restarts", c, n)
		}
	}
}

func TestBadCommandsGetErrorsAndNothingElse(t *testing.T) {
	r := newRig(t)
	r.startAgent()
	r.waitReady(r.desire("14.0.0").Generation)
	cases := []struct {
		kind   protocol.CommandKind
		params any
		code   protocol.Code
	}{
		{"format-disk", nil, protocol.CodeUnimplemented},
		{protocol.CommandResetUserPassword, map[string]string{"userName": "admin"}, protocol.CodeInvalidArgument},
		{protocol.CommandResetUserPassword, map[string]string{"userName": "x; rm -rf /", "password": "p"}, protocol.CodeInvalidArgument},
		{protocol.CommandResetUserPassword, map[string]string{"userName": "nobody", "password": "Sekr3t-of-nobody"}, protocol.CodeFailedPrecondition},
	}
	for _, c := range cases {
		res := r.result(r.command(c.kind, c.params))
		if res.Status != protocol.StatusFailed || res.Error == nil || res.Error.Code != c.code {
			t.Errorf("%s %v: %+v %+v", c.kind, c.params, res, res.Error)
		}
		// A failed reset says why, never with the password.
		if shown, _ := json.Marshal(res); strings.Contains(string(shown), "Sekr3t") {
			t.Errorf("the result of a failed reset shows the password: %s", shown)
		}
	}
	expired := protocol.NewID("cmd")
	r.commandWithID(expired, expired, protocol.CommandRestartDSS, nil, time.Now().Add(-time.Minute))
	if res := r.result(expired); res.Error == nil || res.Error.Code != protocol.CodeDeadlineExceeded {
		t.Fatalf("expired: %+v", res)
	}
	// Not a command at all: rejected, and the agent goes on.
	if _, err := r.js.Publish(context.Background(), protocol.CommandSubject(r.instance, "junk"), []byte("{not json")); err != nil {
		t.Fatal(err)
	}
	r.events.wait(t, "rejection of junk", 10*time.Second, func(e protocol.Event) bool { return e.Kind == protocol.EventRejected })
	if res := r.result(r.command(protocol.CommandGetAdminAPIKey, nil)); res.Status != protocol.StatusOK {
		t.Fatalf("after junk: %+v", res)
	}
	if r.login("admin", "admin") == 0 {
		t.Fatal("DSS stopped answering")
	}
}

// TestAnInterruptedCommandIsRunAgain: a command the agent was running when
// it died is run again by the next agent (every command is safe to run
// again), unless agents kept dying in it: after three starts it is
// answered Aborted.
func TestAnInterruptedCommandIsRunAgain(t *testing.T) {
	r := newRig(t)
	r.startAgent()
	r.waitReady(r.desire("14.0.0").Generation)
	r.stopAgent()
	interrupted := func(id string, attempts int, params any) {
		r.commandWithID(id, id, protocol.CommandResetUserPassword, params, time.Now().Add(time.Hour))
		st, err := r.js.Stream(context.Background(), protocol.StreamCommands)
		if err != nil {
			t.Fatal(err)
		}
		m, err := st.GetLastMsgForSubject(context.Background(), protocol.CommandSubject(r.instance, id))
		if err != nil {
			t.Fatal(err)
		}
		// As the dead agent left it: running the command, finished with
		// what came before.
		saveJSON(filepath.Join(r.data, "fm-agent", "commands.json"), commandCursor{LastSeq: m.Sequence - 1,
			Running: &runningCommand{ID: id, Seq: m.Sequence, Kind: protocol.CommandResetUserPassword, Started: time.Now(), Attempts: attempts}}, 0o600)
	}
	interrupted("cmd-interrupted", 1, protocol.ResetUserPasswordParams{UserName: "admin", Password: "run-again"})
	r.startAgent()
	if res := r.result("cmd-interrupted"); res.Status != protocol.StatusOK || r.login("admin", "run-again") != 200 {
		t.Fatalf("the interrupted command was not run again: %+v", res)
	}
	r.stopAgent()
	interrupted("cmd-poison", maxCommandAttempts, protocol.ResetUserPasswordParams{UserName: "admin", Password: "never"})
	r.startAgent()
	res := r.result("cmd-poison")
	if res.Error == nil || res.Error.Code != protocol.CodeAborted || !strings.Contains(res.Error.Message, "not run again") || r.login("admin", "never") == 200 {
		t.Fatalf("a command the agent kept dying in: %+v", res)
	}
}

func TestACommandIsDoneOnlyOnceItsResultIsSent(t *testing.T) {
	r := newRig(t)
	r.startAgent()
	r.waitReady(r.desire("14.0.0").Generation)
	r.stopAgent()
	ran := make(chan struct{})
	var once sync.Once
	r.cfg.Crash = func(point string) {
		if point == "agent/command "+string(protocol.CommandResetUserPassword)+":done" {
			// The bus goes away with the result still to send.
			once.Do(func() { r.bus.Shutdown(); close(ran) })
		}
	}
	r.startAgent()
	r.commandWithID("cmd-unsent", "cmd-unsent", protocol.CommandResetUserPassword,
		protocol.ResetUserPasswordParams{UserName: "admin", Password: "sent-at-last"}, time.Now().Add(time.Hour))
	<-ran
	r.stopAgent()
	var cur commandCursor
	if _, err := loadJSON(filepath.Join(r.data, "fm-agent", "commands.json"), &cur); err != nil {
		t.Fatal(err)
	}
	if cur.seen("cmd-unsent") || cur.Running == nil || cur.Running.ID != "cmd-unsent" {
		t.Fatalf("a command whose result never reached the bus was recorded done: %+v", cur)
	}
	r.bus.Restart(t)
	r.cfg.Crash = nil
	r.startAgent()
	if res := r.result("cmd-unsent"); res.Status != protocol.StatusOK || r.login("admin", "sent-at-last") != 200 {
		t.Fatalf("the command was not answered after the restart: %+v", res)
	}
}

func TestStopAndStartDSSAndTheWatchdog(t *testing.T) {
	r := newRig(t)
	r.startAgent()
	r.waitReady(r.desire("14.0.0").Generation)

	// Killed, DSS is restarted by the agent.
	pid, _ := os.ReadFile(filepath.Join(r.dssDir(), "run", "dss.pid"))
	n, _ := strconv.Atoi(strings.TrimSpace(string(pid)))
	if err := syscall.Kill(n, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	r.events.wait(t, "unresponsive alert", 30*time.Second, func(e protocol.Event) bool {
		return e.Kind == protocol.EventAlert && e.Step == "dss-unresponsive"
	})
	r.events.wait(t, "restarted", 60*time.Second, func(e protocol.Event) bool {
		return e.Kind == protocol.EventAlert && e.Step == "dss-restarted" && e.Status == protocol.StatusOK
	})
	if r.login("admin", "admin") == 0 {
		t.Fatal("DSS does not answer after the watchdog's restart")
	}

	// Stopped on purpose, it stays stopped.
	if res := r.result(r.command(protocol.CommandStopDSS, nil)); res.Status != protocol.StatusOK {
		t.Fatalf("stop-dss: %+v", res)
	}
	r.waitStatus("DSS stopped", 10*time.Second, func(s protocol.AgentStatus) bool { return s.DSS.State == protocol.DSSStopped })
	alerts := len(r.events.find(func(e protocol.Event) bool { return e.Kind == protocol.EventAlert }))
	time.Sleep(5 * r.cfg.HealthInterval * unansweredChecks)
	if len(r.events.find(func(e protocol.Event) bool { return e.Kind == protocol.EventAlert })) != alerts || r.login("admin", "admin") != 0 {
		t.Fatal("the watchdog restarted a DSS stopped on purpose")
	}
	// An agent restart keeps it stopped too.
	r.stopAgent()
	r.startAgent()
	time.Sleep(2 * time.Second)
	if r.login("admin", "admin") != 0 {
		t.Fatal("an agent restart started a DSS stopped on purpose")
	}
	if res := r.result(r.command(protocol.CommandStartDSS, nil)); res.Status != protocol.StatusOK {
		t.Fatalf("start-dss: %+v", res)
	}
	r.waitStatus("DSS running", 10*time.Second, func(s protocol.AgentStatus) bool { return s.DSS.State == protocol.DSSRunning })
}

func TestBusRestartIsRiddenOut(t *testing.T) {
	r := newRig(t)
	r.startAgent()
	r.waitReady(r.desire("14.0.0").Generation)
	r.bus.Restart(t)
	// A change made after the outage reaches the agent, and its status and
	// events flow again.
	d := r.desire("14.0.0", action(protocol.ActionAddEnvVariables, `{"variables":[{"key":"AFTER","value":"outage"}]}`))
	r.waitReady(d.Generation)
	env, _ := os.ReadFile(filepath.Join(r.dssDir(), "bin", "env-site.sh"))
	if !strings.Contains(string(env), "AFTER='outage'") {
		t.Fatal("the change made after the outage was not applied")
	}
	if res := r.result(r.command(protocol.CommandGetAdminAPIKey, nil)); res.Status != protocol.StatusOK {
		t.Fatalf("command after the outage: %+v", res)
	}
}

func TestChangesWhileDisconnectedAreCaughtUp(t *testing.T) {
	r := newRig(t)
	r.startAgent()
	r.waitReady(r.desire("14.0.0").Generation)
	r.stopAgent()
	// Written while no agent listens: no republished message is seen.
	d := r.desire("14.0.0", action(protocol.ActionAddProperties, `{"properties":[{"key":"caught.up","value":"yes"}]}`))
	r.startAgent()
	r.waitReady(d.Generation)
}

func TestHeartbeatsLogsAndVolumeAlert(t *testing.T) {
	r := newRig(t)
	r.cfg.DataVolumeBytes = 1 << 20 // the stand-in alone takes more
	// The agent's own log is kept and shipped when LogOutput is set.
	r.cfg.Logger, r.cfg.LogOutput = zerolog.New(io.Discard), io.Discard
	hbs := make(chan *nats.Msg, 64)
	sub, err := r.nc.ChanSubscribe(protocol.HeartbeatSubject(r.instance), hbs)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	r.startAgent()
	d := r.desire("14.0.0")
	r.waitReady(d.Generation)

	// Heartbeats at the desired interval (1s), with the state.
	deadline := time.After(15 * time.Second)
	for got := 0; got < 2; {
		select {
		case m := <-hbs:
			var hb protocol.Heartbeat
			if err := protocol.Decode(m.Data, &hb); err != nil {
				t.Fatal(err)
			}
			if hb.Generation == d.Generation && hb.DSS == protocol.DSSRunning && hb.AgentVersion == "test" {
				got++
			}
		case <-deadline:
			t.Fatal("no heartbeats at the desired interval")
		}
	}
	st := r.waitStatus("machine facts", 10*time.Second, func(s protocol.AgentStatus) bool { return s.Machine.DataVolumeUsedBytes > 0 })
	if st.Machine.DataVolumeBytes != 1<<20 || st.Machine.MemTotalBytes == 0 {
		t.Fatalf("facts %+v", st.Machine)
	}
	e := r.events.wait(t, "volume alert", 10*time.Second, func(e protocol.Event) bool {
		return e.Kind == protocol.EventAlert && e.Step == "data-volume-high"
	})
	if e.Error == nil || e.Error.Code != protocol.CodeResourceExhausted {
		t.Fatalf("%+v", e)
	}
	if n := len(r.events.find(func(e protocol.Event) bool { return e.Step == "data-volume-high" })); n != 1 {
		t.Fatalf("the volume alert was sent %d times while the volume stayed full", n)
	}
	// The provisioner grew the volume: the agent takes the new size.
	if res := r.result(r.command(protocol.CommandGrowFilesystem, protocol.GrowFilesystemParams{SizeBytes: 1 << 30})); res.Status != protocol.StatusOK {
		t.Fatalf("grow-filesystem: %+v", res)
	}
	r.waitStatus("the grown volume", 10*time.Second, func(s protocol.AgentStatus) bool { return s.Machine.DataVolumeBytes == 1<<30 })
	if res := r.result(r.command(protocol.CommandGrowFilesystem, map[string]any{})); res.Status != protocol.StatusFailed {
		t.Fatalf("grow-filesystem without a size: %+v", res)
	}

	// DSS's and the agent's logs are on FM_LOGS.
	for source, want := range map[string]string{"dss": "listening on port", "agent": "desired state reached"} {
		deadline := time.Now().Add(15 * time.Second)
		for !strings.Contains(allLogs(t, r, source), want) {
			if time.Now().After(deadline) {
				t.Fatalf("FM_LOGS has no %q from %s", want, source)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	if _, err := os.Stat(filepath.Join(r.root, "var", "lib", "fm-agent", "agent.log")); err != nil {
		t.Fatalf("the agent keeps no log file on the machine: %v", err)
	}
}

// allLogs concatenates every FM_LOGS message of a source.
func allLogs(t *testing.T, r *rig, source string) string {
	t.Helper()
	st, err := r.js.Stream(context.Background(), protocol.StreamLogs)
	if err != nil {
		t.Fatal(err)
	}
	info, _ := st.Info(context.Background())
	var b strings.Builder
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq; seq++ {
		m, err := st.GetMsg(context.Background(), seq)
		if err == nil && m.Subject == protocol.LogSubject(r.instance, source) {
			b.Write(m.Data)
		}
	}
	return b.String()
}

// TestCollectDiagnosis: the bundle holds the agent's and DSS's files, and
// nothing of root's that the DSS user linked in their place. An agent with
// an instance key sends it sealed with that key.
func TestCollectDiagnosis(t *testing.T) {
	t.Run("sealed", func(t *testing.T) { testCollectDiagnosis(t, seal.NewKey()) })
	t.Run("without an instance key", func(t *testing.T) { testCollectDiagnosis(t, nil) })
}

func testCollectDiagnosis(t *testing.T, key []byte) {
	r := newRig(t)
	if key != nil {
		m := newMachine(r.cfg, r.cfg.Logger)
		if err := os.MkdirAll(m.stateDir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(m.instanceKeyPath(), []byte(base64.StdEncoding.EncodeToString(key)), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	r.startAgent()
	r.waitReady(r.desire("14.0.0").Generation)
	secret := filepath.Join(t.TempDir(), "root-only")
	if err := os.WriteFile(secret, []byte("SECRET OF ROOT"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, rel := range []string{"run/leak.log", "config/migrations.json"} {
		p := filepath.Join(r.dssDir(), rel)
		os.Remove(p)
		if err := os.Symlink(secret, p); err != nil {
			t.Fatal(err)
		}
	}
	// A proxy with a password in env-site.sh is masked.
	envSite := filepath.Join(r.dssDir(), "bin", "env-site.sh")
	if err := os.WriteFile(envSite, []byte("export https_proxy=http://svc:SECRET-PROXY-PW@proxy:3128\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	res := r.result(r.command(protocol.CommandCollectDiagnosis, nil))
	var d protocol.DiagnosisResult
	if err := json.Unmarshal(res.Result, &d); err != nil || !strings.HasPrefix(d.Subject, protocol.DiagSubject(r.instance, res.CommandID+"-")) || d.Chunks < 1 {
		t.Fatalf("%+v %v", res, err)
	}
	// The bundle is in chunks on the agent's own diagnosis subject.
	cons, err := r.js.OrderedConsumer(context.Background(), protocol.StreamDiagnosis, jetstream.OrderedConsumerConfig{FilterSubjects: []string{d.Subject}})
	if err != nil {
		t.Fatal(err)
	}
	var obj []byte
	for i := 0; i < d.Chunks; i++ {
		m, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second))
		if err != nil {
			t.Fatalf("chunk %d: %v", i, err)
		}
		obj = append(obj, m.Data()...)
	}
	if int64(len(obj)) != d.SizeBytes || sha256hex(obj) != d.SHA256 {
		t.Fatalf("bundle %d bytes, want %d", len(obj), d.SizeBytes)
	}
	var bundle io.Reader = bytes.NewReader(obj)
	if d.Sealed != (key != nil) {
		t.Fatalf("sealed %v, with an instance key %v", d.Sealed, key != nil)
	}
	if key != nil {
		if bytes.HasPrefix(obj, []byte{0x1f, 0x8b}) {
			t.Fatal("the bundle travels as a plain .tar.gz")
		}
		if bundle, err = seal.NewStreamReader(bundle, key, protocol.SealedDiagnosisPlace(r.instance, res.CommandID)); err != nil {
			t.Fatal(err)
		}
	}
	gz, err := gzip.NewReader(bundle)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(gz)
	names := map[string]bool{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names[h.Name] = true
		if b, _ := io.ReadAll(tr); bytes.Contains(b, []byte("SECRET")) {
			t.Errorf("%s holds a secret: root's file linked by the DSS user, or a password of env-site.sh", h.Name)
		}
	}
	for _, want := range []string{"agent/status.json", "agent/marker.json", "dss/install.ini", "dss/dss-version.json", "dss/run/backend.log", "dss/bin/env-site.sh"} {
		if !names[want] {
			t.Errorf("bundle lacks %s (has %v)", want, names)
		}
	}
}

// TestACommandLineErrorShowsNoSecret: the error of a program run with a
// secret option shows the option, never its value.
func TestACommandLineErrorShowsNoSecret(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"user-edit", "admin", "--password", "hunter2"}, "user-edit admin --password ***"},
		{[]string{"--admin-password=hunter2", "x"}, "--admin-password=*** x"},
		{[]string{"api-key-create", "--label", "fm", "--secret", "hunter2", "--output", "json"}, "api-key-create --label fm --secret *** --output json"},
		{[]string{"install", "-d", "/data/dss", "-p", "11000"}, "install -d /data/dss -p 11000"},
	} {
		t.Run(c.want, func(t *testing.T) {
			if got := shownArgs(c.args); got != c.want {
				t.Fatalf("shownArgs(%q) = %q, want %q", c.args, got, c.want)
			}
		})
	}
}

// TestADiagnosisBundleShowsNoShellSecret: env-site.sh goes into diagnosis
// bundles (which operators download) with its secrets masked.
func TestADiagnosisBundleShowsNoShellSecret(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"export https_proxy=http://svc:Hunter2@proxy.example.com:3128", "export https_proxy=http://svc:***@proxy.example.com:3128"},
		{"export DKU_DB_PASSWORD='Hunter2'", "export DKU_DB_PASSWORD=***"},
		{"  AWS_SECRET_ACCESS_KEY=Hunter2", "  AWS_SECRET_ACCESS_KEY=***"},
		{"export DKU_JAVA_OPTS=-Xmx4g", "export DKU_JAVA_OPTS=-Xmx4g"},
		{"export no_proxy=localhost,169.254.169.254", "export no_proxy=localhost,169.254.169.254"},
	} {
		t.Run(c.in, func(t *testing.T) {
			if got := string(redactShell([]byte(c.in))); got != c.want {
				t.Fatalf("redactShell(%q) = %q, want %q", c.in, got, c.want)
			}
		})
	}
}
