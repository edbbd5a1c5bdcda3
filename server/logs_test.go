package server_test

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

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

	var all api.Logs
	f.ok(f.do("GET", "/instances/"+in.ID+"/logs", ""), &all)
	if len(all.Entries) != 6 || all.Entries[0].Text != "agent line 0\n" || all.Entries[5].Source != "dss" ||
		all.Next != all.Entries[5].Seq {
		t.Fatalf("the last ten minutes of logs: %+v", all)
	}
	var agent api.Logs
	f.ok(f.do("GET", "/instances/"+in.ID+"/logs?source=agent&limit=2", ""), &agent)
	if len(agent.Entries) != 2 || agent.Entries[1].Text != "agent line 1\n" {
		t.Fatalf("a page of two agent lines: %+v", agent)
	}
	var rest api.Logs
	f.ok(f.do("GET", "/instances/"+in.ID+"/logs?source=agent&after="+strconv.FormatUint(agent.Next, 10), ""), &rest)
	if len(rest.Entries) != 3 || rest.Entries[0].Text != "agent line 2\n" {
		t.Fatalf("the agent lines after the page: %+v", rest)
	}
	var none api.Logs
	f.ok(f.do("GET", "/instances/"+in.ID+"/logs?after="+strconv.FormatUint(all.Next, 10), ""), &none)
	if len(none.Entries) != 0 || none.Next != all.Next {
		t.Fatalf("nothing new: %+v", none)
	}
	// Nothing from the time asked: next is where the stream stood, so that
	// a client following reads on from there, not from the start.
	var future api.Logs
	f.ok(f.do("GET", "/instances/"+in.ID+"/logs?since="+time.Now().Add(time.Hour).UTC().Format(time.RFC3339), ""), &future)
	if len(future.Entries) != 0 || future.Next < all.Next || future.More {
		t.Fatalf("logs from an hour ahead: %+v (the last entry was %d)", future, all.Next)
	}
	ship(in.ID, "agent", "a new line\n")
	var news api.Logs
	f.ok(f.do("GET", "/instances/"+in.ID+"/logs?after="+strconv.FormatUint(future.Next, 10), ""), &news)
	if len(news.Entries) != 1 || news.Entries[0].Text != "a new line\n" {
		t.Fatalf("after an empty page: %+v", news)
	}

	// An agent's large messages: a page stops at 4 MiB of text, says
	// there is more, and the next page reads on.
	big := strings.Repeat("x", 120<<10)
	for range 40 {
		ship(in.ID, "dss", big)
	}
	var page, rest2 api.Logs
	f.ok(f.do("GET", "/instances/"+in.ID+"/logs?source=dss&limit=1000&after="+strconv.FormatUint(news.Next, 10), ""), &page)
	if len(page.Entries) == 0 || len(page.Entries) >= 40 || !page.More {
		t.Fatalf("a page of large messages: %d entries, more %v", len(page.Entries), page.More)
	}
	f.ok(f.do("GET", "/instances/"+in.ID+"/logs?source=dss&limit=1000&after="+strconv.FormatUint(page.Next, 10), ""), &rest2)
	if len(page.Entries)+len(rest2.Entries) != 40 || rest2.More {
		t.Fatalf("two pages of large messages: %d and %d entries, more %v", len(page.Entries), len(rest2.Entries), rest2.More)
	}

	op := f.newKey("operator")
	f.ok(f.doAs("GET", "/instances/"+in.ID+"/logs?since=1h", "", op.ID, op.Secret), &all)
	viewer := f.newKey("viewer")
	f.failed(f.doAs("GET", "/instances/"+in.ID+"/logs", "", viewer.ID, viewer.Secret), 403, "PermissionDenied")
	for _, q := range []string{"source=kernel", "limit=0", "limit=1001", "after=x", "after=18446744073709551615", "since=yesterday", "since=-5m", "after=1&since=1h"} {
		f.failed(f.do("GET", "/instances/"+in.ID+"/logs?"+q, ""), 400, "InvalidArgument")
	}
	f.failed(f.do("GET", "/instances/in-none/logs", ""), 404, "NotFound")
}
