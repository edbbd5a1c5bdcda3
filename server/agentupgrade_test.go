package server_test

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
	"github.com/fleetmanager/fm/server"
	"github.com/fleetmanager/fm/server/servertest"
)

// TestUpgradeAgentAction: upgrade-agent sends the instance's agent the
// binary FM serves (its URL and digest), ends with the agent's answer, and
// the status says whether the agent runs that binary.
func TestUpgradeAgentAction(t *testing.T) {
	bin, served := agentBinaryFile(t, "#!/bin/sh\necho fm 2.0.0\n")
	f := start(t, servertest.WithConfig(func(c *server.Config) { c.AgentBinary = bin }))
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("upgraded", vn.ID, tpl.ID, im.ID))
	runningWithVolume(t, f.env.Bus, in.ID)
	js := f.env.Bus.JetStream(t)
	report := func(version, digest string) { t.Helper(); reportAgentBinary(t, js, in.ID, version, digest) }
	agentOf := func() (version string, current *bool) {
		var st struct {
			Agent *struct {
				Version string `json:"version"`
				Current *bool  `json:"current"`
			} `json:"agent"`
		}
		f.ok(f.do("GET", "/instances/"+in.ID+"/status", ""), &st)
		if st.Agent == nil {
			return "", nil
		}
		return st.Agent.Version, st.Agent.Current
	}
	waitAgent := func(version string, current bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			v, c := agentOf()
			if v == version && c != nil && *c == current {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("status agent = %q current %v, want %q %v", v, c, version, current)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	report("1.0.0", "") // an agent from before upgrades reports no digest
	waitAgent("1.0.0", false)

	// A viewer cannot; an operator can.
	viewer := f.newKey(server.RoleViewer)
	if r := f.doAs("GET", "/instances/"+in.ID+"/actions/upgrade-agent", "", viewer.ID, viewer.Secret); r.status != http.StatusForbidden {
		t.Fatalf("a viewer's upgrade-agent: %d %s", r.status, r.body)
	}
	var op api.Future
	f.ok(f.do("GET", "/instances/"+in.ID+"/actions/upgrade-agent", ""), &op)
	if op.Kind != "upgrade-agent" {
		t.Fatalf("operation %+v", op)
	}
	st, err := js.Stream(context.Background(), protocol.StreamCommands)
	if err != nil {
		t.Fatal(err)
	}
	m, err := st.GetLastMsgForSubject(context.Background(), protocol.CommandSubject(in.ID, op.JobID+"-cmd"))
	if err != nil {
		t.Fatal(err)
	}
	var cmd protocol.Command
	if err := protocol.Decode(m.Data, &cmd); err != nil {
		t.Fatal(err)
	}
	var p protocol.UpgradeAgentParams
	if err := json.Unmarshal(cmd.Params, &p); err != nil {
		t.Fatal(err)
	}
	if cmd.Kind != protocol.CommandUpgradeAgent || p.SHA256 != served || p.URL != f.env.URL+server.DownloadPath || p.ReportWithinSeconds != 300 {
		t.Fatalf("command %+v params %+v (server %s)", cmd, p, f.env.URL)
	}
	// Busy with it: another action waits.
	f.failed(f.do("GET", "/instances/"+in.ID+"/actions/upgrade-agent", ""), http.StatusConflict, "FailedPrecondition")

	// The new agent reports, and answers.
	report("2.0.0", served)
	publishEvent(t, js, protocol.Event{Instance: in.ID, Kind: protocol.EventCommand, Source: "agent", CommandID: cmd.ID,
		OpID: op.JobID, Step: string(protocol.CommandUpgradeAgent), Status: protocol.StatusOK, Message: "agent upgraded from 1.0.0 to 2.0.0"})
	f.waitFuture(op.JobID, api.OpSucceeded, 20*time.Second)
	waitAgent("2.0.0", true)
}

// Without a binary to serve, there is nothing to upgrade to: refused,
// nothing started.
func TestUpgradeAgentWithoutABinary(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("stays", vn.ID, tpl.ID, im.ID))
	runningWithVolume(t, f.env.Bus, in.ID)
	r := f.do("GET", "/instances/"+in.ID+"/actions/upgrade-agent", "")
	f.failed(r, http.StatusConflict, "FailedPrecondition")
	if !strings.Contains(string(r.body), "serves no agent binary") {
		t.Fatalf("refusal: %s", r.body)
	}
	var list []api.Future
	f.ok(f.do("GET", "/futures?targetId="+in.ID, ""), &list)
	if len(list) != 0 {
		t.Fatalf("operations started: %+v", list)
	}
}
