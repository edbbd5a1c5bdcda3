package server_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/fleetmanager/fm/protocol"
)

type logsAnswer struct {
	Entries []struct {
		Seq          uint64
		Source, Text string
		Time         time.Time
	}
	Next uint64
}

// TestInstanceLogs: GET /instances/{id}/logs reads what the instance's agent
// shipped to FM_LOGS (its own subjects only), by source, from a time or
// after a sequence, a page at a time; an operator may, a viewer may not;
// bad input is refused.
func TestInstanceLogs(t *testing.T) {
	f := start(t)
	vn, tpl, im := f.fleet()
	in := f.createInstance(instanceBody("logged", vn.ID, tpl.ID, im.ID))
	other := f.createInstance(instanceBody("other", vn.ID, tpl.ID, im.ID))
	js := f.env.Bus.JetStream(t)
	ship := func(instance, source, text string) {
		t.Helper()
		if _, err := js.Publish(context.Background(), protocol.LogSubject(instance, source), []byte(text)); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 5 {
		ship(in.ID, "agent", "agent line "+strconv.Itoa(i)+"\n")
		ship(other.ID, "agent", "another instance's line\n")
	}
	ship(in.ID, "dss", "dss line\n")

	var all logsAnswer
	f.ok(f.do("GET", "/instances/"+in.ID+"/logs", ""), &all)
	if len(all.Entries) != 6 || all.Entries[0].Text != "agent line 0\n" || all.Entries[5].Source != "dss" ||
		all.Next != all.Entries[5].Seq {
		t.Fatalf("the last ten minutes of logs: %+v", all)
	}
	var agent logsAnswer
	f.ok(f.do("GET", "/instances/"+in.ID+"/logs?source=agent&limit=2", ""), &agent)
	if len(agent.Entries) != 2 || agent.Entries[1].Text != "agent line 1\n" {
		t.Fatalf("a page of two agent lines: %+v", agent)
	}
	var rest logsAnswer
	f.ok(f.do("GET", "/instances/"+in.ID+"/logs?source=agent&after="+strconv.FormatUint(agent.Next, 10), ""), &rest)
	if len(rest.Entries) != 3 || rest.Entries[0].Text != "agent line 2\n" {
		t.Fatalf("the agent lines after the page: %+v", rest)
	}
	var none logsAnswer
	f.ok(f.do("GET", "/instances/"+in.ID+"/logs?after="+strconv.FormatUint(all.Next, 10), ""), &none)
	if len(none.Entries) != 0 || none.Next != all.Next {
		t.Fatalf("nothing new: %+v", none)
	}
	var future logsAnswer
	f.ok(f.do("GET", "/instances/"+in.ID+"/logs?since="+time.Now().Add(time.Hour).UTC().Format(time.RFC3339), ""), &future)
	if len(future.Entries) != 0 {
		t.Fatalf("logs from an hour ahead: %+v", future)
	}

	op := f.newKey("operator")
	f.ok(f.doAs("GET", "/instances/"+in.ID+"/logs?since=1h", "", op.ID, op.Secret), &all)
	viewer := f.newKey("viewer")
	f.failed(f.doAs("GET", "/instances/"+in.ID+"/logs", "", viewer.ID, viewer.Secret), 403, "PermissionDenied")
	for _, q := range []string{"source=kernel", "limit=0", "limit=1001", "after=x", "since=yesterday", "after=1&since=1h"} {
		f.failed(f.do("GET", "/instances/"+in.ID+"/logs?"+q, ""), 400, "InvalidArgument")
	}
	f.failed(f.do("GET", "/instances/in-none/logs", ""), 404, "NotFound")
}
