package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
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
	port, err := m.port()
	if err != nil {
		return err
	}
	user := fmt.Sprintf("http://127.0.0.1:%d/public/api/admin/users/%s", port, url.PathEscape(login))
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

// errDSSNotFound is DSS's 404: what was asked for does not exist.
var errDSSNotFound = errors.New("not found")

// errDSSNotAnswering is a call to DSS's admin API that may pass later.
var errDSSNotAnswering = errors.New("DSS does not answer")

// dssAdmin makes one call to DSS's admin API, tried again while DSS does
// not answer, for dssAdminWait at most. Its errors hold DSS's answer, never
// what was sent.
func (m *machine) dssAdmin(ctx context.Context, apiKey, method, target string, body []byte, out any) error {
	ctx, cancel := context.WithTimeout(ctx, dssAdminWait)
	defer cancel()
	client := &http.Client{Timeout: 30 * time.Second}
	for {
		err := m.dssAdminOnce(ctx, client, apiKey, method, target, body, out)
		if !errors.Is(err, errDSSNotAnswering) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(2 * time.Second):
		}
	}
}

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
		return fmt.Errorf("%w: %v", errDSSNotAnswering, err)
	}
	defer resp.Body.Close()
	answer, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	switch {
	case resp.StatusCode >= 500:
		return fmt.Errorf("%w: %s %s", errDSSNotAnswering, resp.Status, strings.TrimSpace(string(answer)))
	case resp.StatusCode == http.StatusNotFound:
		return fmt.Errorf("%w: DSS answered %s: %s", errDSSNotFound, resp.Status, strings.TrimSpace(string(answer)))
	case resp.StatusCode != http.StatusOK:
		return fmt.Errorf("DSS answered %s: %s", resp.Status, strings.TrimSpace(string(answer)))
	case out != nil:
		if err := json.Unmarshal(answer, out); err != nil {
			return fmt.Errorf("DSS's answer is not JSON: %w", err)
		}
	}
	return nil
}
