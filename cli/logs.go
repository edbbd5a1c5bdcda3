package cli

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/fleetmanager/fm/client"
)

// logsPage is what GET /instances/{id}/logs answers.
type logsPage struct {
	Entries []struct {
		Seq    uint64 `json:"seq"`
		Source string `json:"source"`
		Text   string `json:"text"`
	} `json:"entries"`
	Next uint64 `json:"next"`
}

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
	for {
		var page logsPage
		if err := c.Do(ctx, http.MethodGet, "/instances/"+url.PathEscape(id)+"/logs", q, nil, &page); err != nil {
			if ctx.Err() != nil {
				return nil // interrupted while following
			}
			return err
		}
		for _, e := range page.Entries {
			text := e.Text
			if source == "" {
				text = prefixLines(e.Source+": ", text)
			}
			fmt.Fprint(w, text)
		}
		q.Del("since")
		q.Set("after", strconv.FormatUint(page.Next, 10))
		if len(page.Entries) == logsPageSize {
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
