package agent

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/fleetmanager/fm/internal/atomicfile"
	"github.com/fleetmanager/fm/internal/pki"
	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/protocol"
)

// ErrJoinRefused is returned by Run when FM refused the machine's join token
// (used, expired, or issued to another instance): the machine cannot get
// credentials and needs a new token, which a reprovision gives.
var ErrJoinRefused = errors.New("join refused")

func (m *machine) credsPath() string       { return filepath.Join(m.stateDir, "nats.creds") }
func (m *machine) instanceKeyPath() string { return filepath.Join(m.stateDir, "instance.key") }

// clientTLS is the TLS the agent uses towards FM (the join endpoint, the
// bus): with the CA it was given, or none.
func (c *Config) clientTLS() (*tls.Config, error) {
	switch {
	case c.Join != nil && c.Join.CACert != "":
		return pki.ClientConfigPEM([]byte(c.Join.CACert))
	case c.CAFile != "":
		return pki.ClientConfig(c.CAFile)
	}
	return nil, nil
}

// join gets the machine's credentials on its first start: it exchanges the
// join token for its NATS credentials and instance key, and keeps them in
// its state folder (the OS disk, new with every machine), so that a restart
// does not join again. Failures to reach FM are retried until ctx ends; a
// refusal is final.
func (a *Agent) join(ctx context.Context, tlsConf *tls.Config) error {
	if a.cfg.Join == nil {
		return a.loadInstanceKey()
	}
	if a.cfg.CredsFile == "" {
		a.cfg.CredsFile = a.m.credsPath()
	}
	if fileExists(a.cfg.CredsFile) && fileExists(a.m.instanceKeyPath()) {
		return a.loadInstanceKey()
	}
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: tlsConf}}
	defer client.CloseIdleConnections()
	backoff := time.Second
	for {
		resp, err := a.postJoin(ctx, client)
		if err == nil {
			if err := atomicfile.WriteFile(a.m.instanceKeyPath(), []byte(resp.InstanceKey), 0o600); err != nil {
				return fmt.Errorf("keep the instance key: %w", err)
			}
			if err := atomicfile.WriteFile(a.cfg.CredsFile, []byte(resp.Credentials), 0o600); err != nil {
				return fmt.Errorf("keep the credentials: %w", err)
			}
			a.log.Info().Str("url", a.cfg.Join.URL).Msg("joined: NATS credentials received")
			return a.loadInstanceKey()
		}
		if errors.Is(err, ErrJoinRefused) {
			return err
		}
		a.log.Warn().Err(err).Dur("retry_in", backoff).Msg("join failed; retrying")
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

func (a *Agent) postJoin(ctx context.Context, client *http.Client) (protocol.JoinResponse, error) {
	var out protocol.JoinResponse
	body, _ := json.Marshal(protocol.JoinRequest{Instance: a.cfg.Instance, Token: a.cfg.Join.Token})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, a.cfg.Join.URL, bytes.NewReader(body))
	if err != nil {
		return out, fmt.Errorf("%w: join url: %v", ErrJoinRefused, err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return out, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return out, err
	}
	switch {
	case resp.StatusCode == http.StatusOK:
		if err := json.Unmarshal(data, &out); err != nil || out.Credentials == "" {
			return out, fmt.Errorf("the join answer holds no credentials")
		}
		return out, nil
	case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
		return out, fmt.Errorf("join: FM answered %s", resp.Status)
	default:
		var e struct {
			DetailedMessage string `json:"detailedMessage"`
		}
		_ = json.Unmarshal(data, &e)
		return out, fmt.Errorf("%w: FM answered %s: %s", ErrJoinRefused, resp.Status, e.DetailedMessage)
	}
}

// loadInstanceKey reads the instance key the join brought, if any.
func (a *Agent) loadInstanceKey() error {
	b, err := os.ReadFile(a.m.instanceKeyPath())
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("instance key: %w", err)
	}
	raw, err := base64.StdEncoding.DecodeString(string(bytes.TrimSpace(b)))
	if err != nil {
		return fmt.Errorf("instance key %s: %w", a.m.instanceKeyPath(), err)
	}
	if len(raw) == 0 {
		return nil
	}
	box, err := seal.New(raw)
	if err != nil {
		return fmt.Errorf("instance key %s: %w", a.m.instanceKeyPath(), err)
	}
	a.box = box
	return nil
}

// openDesired opens the license of a desired state for this machine. A
// state for another machine (the one replacing this one) is sealed with a
// key this agent does not have; it is left as it is, and ignored anyway.
func (a *Agent) openDesired(d *protocol.DesiredState) error {
	if d.DSS.SealedLicense == "" || d.MachineRequest != "" && a.cfg.MachineRequest != "" && d.MachineRequest != a.cfg.MachineRequest {
		return nil
	}
	if a.box == nil {
		return errors.New("the license is sealed, and this agent has no instance key")
	}
	lic, err := a.box.Open(d.DSS.SealedLicense)
	if err != nil {
		return fmt.Errorf("the sealed license: %w", err)
	}
	d.DSS.License, d.DSS.SealedLicense = lic, ""
	return nil
}

// openParams opens a command's sealed params.
func (a *Agent) openParams(cmd *protocol.Command) *protocol.Error {
	if cmd.SealedParams == "" {
		return nil
	}
	if a.box == nil {
		return protocol.Errorf(protocol.CodeFailedPrecondition, "the command's params are sealed, and this agent has no instance key")
	}
	p, err := a.box.Open(cmd.SealedParams)
	if err != nil {
		return protocol.Errorf(protocol.CodeInvalidArgument, "the command's sealed params: %v", err)
	}
	cmd.Params, cmd.SealedParams = json.RawMessage(p), ""
	return nil
}
