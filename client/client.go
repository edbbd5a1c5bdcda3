// Package client is a Go client of FM's REST API, used by the fm command's
// client subcommands and by end-to-end tests. It speaks the same wire format
// as Dataiku's Python client, plus FM's own endpoints.
//
// It imports api and the standard library only.
package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/internal/pki"
)

// KeyFile is an API key as FM and Dataiku's tooling write it.
type KeyFile struct {
	ID     string `json:"id"`
	Secret string `json:"secret"`
}

// ReadKeyFile reads a key file.
func ReadKeyFile(path string) (KeyFile, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return KeyFile{}, fmt.Errorf("read key file: %w", err)
	}
	var k KeyFile
	if err := json.Unmarshal(b, &k); err != nil {
		return KeyFile{}, fmt.Errorf("key file %s: %w", path, err)
	}
	if k.ID == "" || k.Secret == "" {
		return KeyFile{}, fmt.Errorf("key file %s: id and secret are required", path)
	}
	return k, nil
}

// Client talks to one FM server.
type Client struct {
	base   string
	key    KeyFile
	tenant string
	http   *http.Client
}

// New returns a client of the server at baseURL (http://host:port).
func New(baseURL string, key KeyFile) *Client {
	return &Client{
		base:   strings.TrimRight(baseURL, "/"),
		key:    key,
		tenant: api.DefaultTenant,
		http: &http.Client{
			Timeout: 2 * time.Minute,
			// Never follow a redirect: a POST would turn into a GET.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
	}
}

// TrustCA makes the client verify an HTTPS server with the CA in the PEM
// file caFile (FM's self-signed CA), besides the system's.
func (c *Client) TrustCA(caFile string) error {
	conf, err := pki.ClientConfig(caFile)
	if err != nil {
		return err
	}
	c.http.Transport = &http.Transport{TLSClientConfig: conf, Proxy: http.ProxyFromEnvironment}
	return nil
}

// SetTransport replaces how the client's requests travel (a transport that
// keeps more connections open for a client used by many goroutines).
func (c *Client) SetTransport(rt http.RoundTripper) { c.http.Transport = rt }

// Error is an error response of the server.
type Error struct {
	// Status is the HTTP status, or 0 for the error of a failed operation
	// read while peeking.
	Status int
	Body   api.Error
}

func (e *Error) Error() string {
	msg := e.Body.DetailedMessage
	if msg == "" {
		msg = e.Body.Message
	}
	if e.Status == 0 {
		return fmt.Sprintf("%s: %s", e.Body.ErrorType, msg)
	}
	return fmt.Sprintf("%s (HTTP %d): %s", e.Body.ErrorType, e.Status, msg)
}

// errorOf is the error of an answer with an error status.
func errorOf(status int, body []byte) *Error {
	e := &Error{Status: status}
	if json.Unmarshal(body, &e.Body) != nil || e.Body.ErrorType == "" {
		e.Body = api.Error{ErrorType: "Unknown error", Message: strings.TrimSpace(string(body))}
	}
	return e
}

// IsNotFound reports whether err is a 404 from the server.
func IsNotFound(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Status == http.StatusNotFound
}

// Do sends a request to path under the tenant prefix (e.g. "/instances")
// with in as the JSON body (if not nil) and decodes the response into out
// (if not nil).
func (c *Client) Do(ctx context.Context, method, path string, query url.Values, in, out any) error {
	u := c.base + api.BasePath + c.tenant + path
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("encode request: %w", err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return err
	}
	req.SetBasicAuth(c.key.ID, c.key.Secret)
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("%s %s: read response: %w", method, path, err)
	}
	if resp.StatusCode >= 400 {
		return errorOf(resp.StatusCode, data)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("%s %s: decode response: %w", method, path, err)
	}
	return nil
}

// Download GETs path under the tenant prefix and copies the answer's body
// (a file: a diagnosis bundle) to w, returning how many bytes it wrote. An
// answer cut short is an error.
func (c *Client) Download(ctx context.Context, path string, w io.Writer) (int64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+api.BasePath+c.tenant+path, nil)
	if err != nil {
		return 0, err
	}
	req.SetBasicAuth(c.key.ID, c.key.Secret)
	resp, err := c.http.Do(req)
	if err != nil {
		return 0, fmt.Errorf("GET %s: %w", path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 400 {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		return 0, errorOf(resp.StatusCode, data)
	}
	n, err := io.Copy(w, resp.Body)
	if err != nil {
		return n, fmt.Errorf("GET %s: %w", path, err)
	}
	if resp.ContentLength >= 0 && n != resp.ContentLength {
		return n, fmt.Errorf("GET %s: %d bytes of %d", path, n, resp.ContentLength)
	}
	return n, nil
}

// GetFuture reads an operation. A failed operation is returned as an *Error,
// as Dataiku's client sees it, unless peek is true.
func (c *Client) GetFuture(ctx context.Context, id string, peek bool) (api.Future, error) {
	var f api.Future
	q := url.Values{"peek": {pyBool(peek)}}
	err := c.Do(ctx, http.MethodGet, "/futures/"+url.PathEscape(id), q, nil, &f)
	return f, err
}

// Wait polls an operation until it ends, calling progress (if not nil) each
// time it changes, and returns it. A failed or aborted operation is returned
// with an error.
func (c *Client) Wait(ctx context.Context, f api.Future, every time.Duration, progress func(api.Future)) (api.Future, error) {
	last := ""
	for {
		if progress != nil {
			if b, _ := json.Marshal(f.Progress); string(b)+f.State != last {
				last = string(b) + f.State
				progress(f)
			}
		}
		if f.HasResult || (f.State != "" && f.State != api.OpRunning) {
			break
		}
		select {
		case <-ctx.Done():
			return f, ctx.Err()
		case <-time.After(every):
		}
		next, err := c.GetFuture(ctx, f.JobID, true)
		if err != nil {
			return f, err
		}
		f = next
	}
	switch f.State {
	case api.OpFailed, api.OpAborted:
		if f.Error != nil {
			return f, &Error{Body: *f.Error}
		}
		return f, fmt.Errorf("operation %s %s", f.JobID, f.State)
	}
	return f, nil
}

func pyBool(b bool) string {
	if b {
		return "True"
	}
	return "False"
}
