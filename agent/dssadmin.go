package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// dssAdminWait is how long a call to DSS's admin API waits for a DSS that
// does not answer yet (just started).
const dssAdminWait = time.Minute

// setUserPassword sets the password of a DSS user through DSS's public
// admin API, as the DSSUser settings of Dataiku's Python client do: the
// user's definition is read, and saved back with the password. It goes
// with FM's admin API key, so that the password is on no command line
// (/proc/*/cmdline is world-readable) and in no error.
func (m *machine) setUserPassword(ctx context.Context, apiKey, login, password string) error {
	user, err := m.adminURL(ctx, "/admin/users/"+url.PathEscape(login))
	if err != nil {
		return err
	}
	var def map[string]any
	if err := m.dssAdmin(ctx, apiKey, http.MethodGet, user, nil, &def); err != nil {
		return fmt.Errorf("read DSS user %s: %w", login, err)
	}
	def["password"] = password
	body, err := json.Marshal(def)
	if err != nil {
		return err
	}
	if err := m.dssAdmin(ctx, apiKey, http.MethodPut, user, body, nil); err != nil {
		return fmt.Errorf("save DSS user %s: %w", login, err)
	}
	return nil
}

// adminURL is the address of path (under /public/api) of DSS's API, on
// this machine, at the port DSS listens on (a replay that changed the
// port talks to DSS there until it restarts).
func (m *machine) adminURL(ctx context.Context, path string) (string, error) {
	port, err := m.listeningPort(ctx)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("http://127.0.0.1:%d/public/api%s", port, path), nil
}

// errDSSNotFound is DSS's 404: what was asked for does not exist.
var errDSSNotFound = errors.New("not found")

// errDSSNotAnswering is a call to DSS's admin API that may pass later.
var errDSSNotAnswering = errors.New("DSS does not answer")

// dssAdmin makes one call to DSS's admin API, tried again while DSS does
// not answer, for dssAdminWait at most, each try bounded by
// dssAdminAttempt. Its errors hold DSS's answer, never what was sent.
func (m *machine) dssAdmin(ctx context.Context, apiKey, method, target string, body []byte, out any) error {
	return m.dssAdminFor(ctx, dssAdminAttempt, apiKey, method, target, body, out)
}

// dssAdminAttempt bounds one try of a call to DSS's admin API.
const dssAdminAttempt = 30 * time.Second

// dssAdminFor is dssAdmin with each try bounded by attempt (a call DSS
// answers when its work is done, such as a code environment's making). A
// POST is tried again only when it never reached DSS: one DSS received
// may have done its work.
func (m *machine) dssAdminFor(ctx context.Context, attempt time.Duration, apiKey, method, target string, body []byte, out any) error {
	ctx, cancel := context.WithTimeout(ctx, dssAdminWait+attempt)
	defer cancel()
	// Tries start within dssAdminWait, whatever each may take.
	deadline := time.Now().Add(dssAdminWait)
	// DSS answers where it was asked: a redirect would send the body, the
	// key with it, elsewhere.
	client := &http.Client{Timeout: attempt, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	for {
		err := m.dssAdminOnce(ctx, client, apiKey, method, target, body, out)
		if !errors.Is(err, errDSSNotAnswering) || method == http.MethodPost && !errors.Is(err, errNotSent) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(2 * time.Second):
		}
	}
}

// errNotSent is a call that never reached DSS (no connection).
var errNotSent = errors.New("not sent")

// maxShownAnswer bounds what of DSS's answer an error shows: errors become
// statuses and events, which have a size limit.
const maxShownAnswer = 2 << 10

func (m *machine) dssAdminOnce(ctx context.Context, client *http.Client, apiKey, method, target string, body []byte, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, target, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.SetBasicAuth(apiKey, "")
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		var uerr *url.Error
		if errors.As(err, &uerr) {
			err = uerr.Err // the URL holds no secret, but the error says enough without it
		}
		var oerr *net.OpError
		if errors.As(err, &oerr) && oerr.Op == "dial" {
			return fmt.Errorf("%w: %w: %v", errDSSNotAnswering, errNotSent, err)
		}
		return fmt.Errorf("%w: %v", errDSSNotAnswering, err)
	}
	defer resp.Body.Close()
	answer, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	shown := strings.TrimSpace(string(answer))
	if len(shown) > maxShownAnswer {
		shown = shown[:maxShownAnswer] + "…"
	}
	switch {
	case resp.StatusCode >= 500:
		return fmt.Errorf("%w: %s %s", errDSSNotAnswering, resp.Status, shown)
	case resp.StatusCode == http.StatusNotFound:
		return fmt.Errorf("%w: DSS answered %s: %s", errDSSNotFound, resp.Status, shown)
	case resp.StatusCode != http.StatusOK:
		return fmt.Errorf("DSS answered %s: %s", resp.Status, shown)
	case out != nil:
		// Numbers as DSS wrote them: settings read and written back keep
		// integers float64 would round.
		dec := json.NewDecoder(bytes.NewReader(answer))
		dec.UseNumber()
		if err := dec.Decode(out); err != nil {
			return fmt.Errorf("DSS's answer is not JSON: %w", err)
		}
	}
	return nil
}
