package cli

import (
	"context"
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

// followLogs prints the instance's shipped logs from since (a duration or
// an RFC 3339 time), page after page, and with follow keeps asking every
// interval until ctx ends. Without a source, each line says its own.
func followLogs(ctx context.Context, w io.Writer, c *client.Client, id, source, since string, follow bool, interval time.Duration) error {
	q := url.Values{"limit": {strconv.Itoa(logsPageSize)}, "since": {since}}
	if source != "" {
		q.Set("source", source)
	}
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
			text := printableText(e.Text)
			if source == "" {
				text = prefixLines(printable(e.Source)+": ", text)
			}
			fmt.Fprint(w, text)
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

// prefixLines puts prefix before every line of text (a message may hold
// several, and end in the middle of one).
func prefixLines(prefix, text string) string {
	lines := strings.SplitAfter(text, "\n")
	var b strings.Builder
	for _, l := range lines {
		if l != "" {
			b.WriteString(prefix + l)
		}
	}
	return b.String()
}
