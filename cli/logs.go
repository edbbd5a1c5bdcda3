package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/client"
)

// logsPageSize is how many messages a call asks for.
const logsPageSize = 500

// logsRequest is what fm instance logs asks for and how it prints it.
type logsRequest struct {
	id, source, since string // since: a duration or an RFC 3339 time
	follow            bool
	jsonLines         bool          // one JSON object per message ({"seq","time","source","text"})
	interval          time.Duration // between two asks when following
}

// followLogs prints the instance's shipped logs from since, page after
// page, and with follow keeps asking every interval until ctx ends.
// Without a source, each line says its own.
func followLogs(ctx context.Context, w io.Writer, c *client.Client, lr logsRequest) error {
	id, source, follow, interval := lr.id, lr.source, lr.follow, lr.interval
	q := url.Values{"limit": {strconv.Itoa(logsPageSize)}, "since": {lr.since}}
	if source != "" {
		q.Set("source", source)
	}
	lines := logLines{w: w, prefixed: source == ""}
	retry := interval
	for {
		var page api.Logs
		if err := c.Do(ctx, http.MethodGet, "/instances/"+url.PathEscape(id)+"/logs", q, nil, &page); err != nil {
			if ctx.Err() != nil {
				return nil // interrupted while following
			}
			if !follow || !transient(err) {
				return err
			}
			// A stream electing a leader, a server restarting: asked
			// again from where it was, a little later each time.
			retry = min(2*retry, 30*time.Second)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(retry):
			}
			continue
		}
		retry = interval
		for _, e := range page.Entries {
			if lr.jsonLines {
				b, _ := json.Marshal(e)
				fmt.Fprintf(w, "%s\n", b)
				continue
			}
			lines.print(e)
		}
		q.Del("since")
		q.Set("after", strconv.FormatUint(page.Next, 10))
		if page.More {
			continue // more to read at once
		}
		if !follow {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(interval):
		}
	}
}

// transient says whether a failed call may succeed if made again: no
// answer, or one that says so (503, 429, 504).
func transient(err error) bool {
	var e *client.Error
	if !errors.As(err, &e) {
		return true // not answered
	}
	return e.Status == http.StatusServiceUnavailable || e.Status == http.StatusTooManyRequests || e.Status == http.StatusGatewayTimeout
}

// logLines prints messages as text: what an agent shipped, without its
// control characters, each line after its source when asked. A message may
// end in the middle of a line, which the next message of the same source
// goes on with; another source's message starts on a line of its own.
type logLines struct {
	w        io.Writer
	prefixed bool
	open     string // the source whose line the last message left open
}

func (l *logLines) print(e api.LogEntry) {
	text := printableText(e.Text)
	if text == "" {
		return
	}
	var b strings.Builder
	if l.open != "" && l.open != e.Source {
		b.WriteString("\n")
		l.open = ""
	}
	for _, line := range strings.SplitAfter(text, "\n") {
		if line == "" {
			continue
		}
		if l.prefixed && l.open == "" {
			b.WriteString(printable(e.Source) + ": ")
		}
		b.WriteString(line)
		l.open = ""
		if !strings.HasSuffix(line, "\n") {
			l.open = e.Source
		}
	}
	fmt.Fprint(l.w, b.String())
}
