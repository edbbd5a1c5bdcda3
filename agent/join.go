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
	"strings"
	"time"

	"github.com/fleetmanager/fm/internal/atomicfile"
	"github.com/fleetmanager/fm/internal/awsapi"
	"github.com/fleetmanager/fm/internal/pki"
	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nkeys"
)

// ErrJoinRefused is returned by Run when FM refused the machine's join token
// (used, expired, or issued to another instance): the machine cannot get
// credentials and needs a new token, which a reprovision gives.
var ErrJoinRefused = errors.New("join refused")

func (m *machine) credsPath() string       { return filepath.Join(m.stateDir, "nats.creds") }
func (m *machine) instanceKeyPath() string { return filepath.Join(m.stateDir, "instance.key") }
func (m *machine) seedPath() string        { return filepath.Join(m.stateDir, "agent.nk") }
func (m *machine) identityPath() string    { return filepath.Join(m.stateDir, "identity.json") }

// identity is what a join gives a machine, kept in one file written at
// once, so that a crash never leaves the credentials without the key.
type identity struct {
	Credentials string `json:"credentials"` // a creds file: the JWT and the machine's seed
	InstanceKey string `json:"instanceKey"`
}

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

// join gets the machine's credentials on its first start: it makes its own
// NATS user key (kept before anything is asked, so that asking again is
// asking for the same key), exchanges the join token for a JWT of that key
// and the instance key, and keeps both at once in its state folder (the OS
// disk, new with every machine), so that a restart does not join again.
// FM answers the same machine's key again (its answer lost, or the agent
// killed before it kept it). Failures to reach FM are retried until ctx
// ends; a refusal is final.
func (a *Agent) join(ctx context.Context, tlsConf *tls.Config) error {
	if a.cfg.Join == nil {
		return a.loadInstanceKey()
	}
	if a.cfg.CredsFile == "" {
		a.cfg.CredsFile = a.m.credsPath()
	}
	if fileExists(a.m.identityPath()) {
		return a.loadIdentity()
	}
	if fileExists(a.cfg.CredsFile) && fileExists(a.m.instanceKeyPath()) {
		return a.loadInstanceKey() // joined by an agent from before identity.json
	}
	kp, err := a.machineKey()
	if err != nil {
		return err
	}
	seed, _ := kp.Seed()
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: tlsConf}}
	defer client.CloseIdleConnections()
	backoff := time.Second
	for {
		a.crash.At("agent/join:before")
		resp, err := a.postJoin(ctx, client, kp)
		if err == nil {
			a.crash.At("agent/join:after")
			creds, err := jwt.FormatUserConfig(resp.JWT, seed)
			if err != nil {
				return fmt.Errorf("%w: the join answer holds no usable JWT: %v", ErrJoinRefused, err)
			}
			if err := a.crash.Around("agent/join/keep-identity", func() error {
				b, _ := json.Marshal(identity{Credentials: string(creds), InstanceKey: resp.InstanceKey})
				return atomicfile.WriteFile(a.m.identityPath(), b, 0o600)
			}); err != nil {
				return fmt.Errorf("keep the credentials: %w", err)
			}
			a.log.Info().Str("url", a.cfg.Join.URL).Msg("joined: NATS credentials received")
			return a.loadIdentity()
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

// machineKey is the machine's NATS user key, made and kept (agent.nk, mode
// 0600) the first time.
func (a *Agent) machineKey() (nkeys.KeyPair, error) {
	if b, err := os.ReadFile(a.m.seedPath()); err == nil {
		kp, err := nkeys.FromSeed(bytes.TrimSpace(b))
		if err != nil {
			return nil, fmt.Errorf("machine key %s: %w", a.m.seedPath(), err)
		}
		return kp, nil
	}
	kp, err := nkeys.CreateUser()
	if err != nil {
		return nil, fmt.Errorf("machine key: %w", err)
	}
	seed, _ := kp.Seed()
	if err := a.crash.Around("agent/join/keep-machine-key", func() error {
		return atomicfile.WriteFile(a.m.seedPath(), seed, 0o600)
	}); err != nil {
		return nil, fmt.Errorf("keep the machine key: %w", err)
	}
	return kp, nil
}

// loadIdentity reads what the join gave: the credentials (used from
// memory) and the instance key.
func (a *Agent) loadIdentity() error {
	b, err := os.ReadFile(a.m.identityPath())
	if err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	var id identity
	if err := json.Unmarshal(b, &id); err != nil || id.Credentials == "" {
		return fmt.Errorf("identity %s: unreadable (%v)", a.m.identityPath(), err)
	}
	a.credsMu.Lock()
	a.cfg.CredsFile, a.creds = "", []byte(id.Credentials)
	a.credsMu.Unlock()
	return a.setInstanceKey(id.InstanceKey)
}

// postJoin asks FM for the machine's credentials, signing the request with
// the machine's key (FM gives a token exchanged already only to the key
// that exchanged it).
func (a *Agent) postJoin(ctx context.Context, client *http.Client, kp nkeys.KeyPair) (protocol.JoinResponse, error) {
	var out protocol.JoinResponse
	pub, err := kp.PublicKey()
	if err != nil {
		return out, fmt.Errorf("%w: the machine's key: %v", ErrJoinRefused, err)
	}
	sig, err := kp.Sign(protocol.JoinProof(a.cfg.Instance, a.cfg.Join.Token))
	if err != nil {
		return out, fmt.Errorf("%w: sign the join request: %v", ErrJoinRefused, err)
	}
	jr := protocol.JoinRequest{Instance: a.cfg.Instance, Token: a.cfg.Join.Token, PublicKey: pub,
		Signature: base64.RawURLEncoding.EncodeToString(sig)}
	if a.cfg.IMDSURL != "" {
		// Sent when it can be read: an FM that requires it answers 503 to
		// a join without it, and the agent asks again; one that does not
		// require it joins the machine anyway.
		if jr.EC2Identity, err = ec2Identity(ctx, a.cfg.IMDSURL); err != nil {
			a.log.Warn().Err(err).Msg("joining without the EC2 instance identity document")
		}
	}
	body, _ := json.Marshal(jr)
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
	if resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(data, &out); err != nil || out.JWT == "" {
			return out, fmt.Errorf("the join answer holds no credentials")
		}
		return out, nil
	}
	var e struct {
		ErrorType       string `json:"errorType"`
		DetailedMessage string `json:"detailedMessage"`
	}
	_ = json.Unmarshal(data, &e)
	// Busy (a race on the token, too many attempts) or away: asked again.
	// Any other answer, a refusal or an agent FM cannot serve, is final.
	if resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500 ||
		resp.StatusCode == http.StatusConflict && e.ErrorType == string(protocol.CodeConflict) {
		return out, fmt.Errorf("join: FM answered %s: %s", resp.Status, e.DetailedMessage)
	}
	return out, fmt.Errorf("%w: FM answered %s: %s", ErrJoinRefused, resp.Status, e.DetailedMessage)
}

// loadInstanceKey reads the instance key a join brought (from an agent
// from before identity.json) or one given some other way, if any.
func (a *Agent) loadInstanceKey() error {
	b, err := os.ReadFile(a.m.instanceKeyPath())
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("instance key: %w", err)
	}
	if err := a.setInstanceKey(string(bytes.TrimSpace(b))); err != nil {
		return fmt.Errorf("instance key %s: %w", a.m.instanceKeyPath(), err)
	}
	return nil
}

// setInstanceKey makes key (base64) the agent's instance key ("": none).
func (a *Agent) setInstanceKey(key string) error {
	raw, err := base64.StdEncoding.DecodeString(key)
	if err != nil {
		return err
	}
	if len(raw) == 0 {
		return nil
	}
	box, err := seal.New(raw)
	if err != nil {
		return err
	}
	a.box, a.instanceKey = box, raw
	return nil
}

// openDesired opens the sealed parts of a desired state for this machine:
// the license, DSS's AWS secret and the HTTPS certificate. A state for another machine (the
// one replacing this one) is sealed with a key this agent does not have; it
// is left as it is, and ignored anyway.
func (a *Agent) openDesired(d *protocol.DesiredState) error {
	if d.MachineRequest != "" && a.cfg.MachineRequest != "" && d.MachineRequest != a.cfg.MachineRequest {
		return nil
	}
	if d.DSS.SealedLicense != "" {
		if a.box == nil {
			return errors.New("the license is sealed, and this agent has no instance key")
		}
		lic, err := a.box.Open(d.DSS.SealedLicense, protocol.SealedLicensePlace(a.cfg.Instance))
		if err != nil {
			return fmt.Errorf("the sealed license: %w", err)
		}
		d.DSS.License, d.DSS.SealedLicense = lic, ""
	}
	if c := d.DSS.AWSCredentials; c != nil && c.SealedSecretAccessKey != "" {
		if a.box == nil {
			return errors.New("the AWS secret access key is sealed, and this agent has no instance key")
		}
		secret, err := a.box.Open(c.SealedSecretAccessKey, protocol.SealedAWSSecretPlace(a.cfg.Instance))
		if err != nil {
			return fmt.Errorf("the sealed AWS secret access key: %w", err)
		}
		if !protocol.ValidAWSSecret(secret) {
			return errors.New("the sealed AWS secret access key is not one")
		}
		opened := *c
		opened.SecretAccessKey, opened.SealedSecretAccessKey = secret, ""
		d.DSS.AWSCredentials = &opened
	}
	if h := d.DSS.HTTPS; h != nil && h.SealedCertificate != "" {
		if a.box == nil {
			return errors.New("the HTTPS certificate is sealed, and this agent has no instance key")
		}
		pem, err := a.box.Open(h.SealedCertificate, protocol.SealedCertificatePlace(a.cfg.Instance))
		if err != nil {
			return fmt.Errorf("the sealed HTTPS certificate: %w", err)
		}
		// A copy: the target is the decoded message's own, but nothing
		// else should see the clear certificate appear in it.
		opened := *h
		opened.Certificate, opened.SealedCertificate = pem, ""
		d.DSS.HTTPS = &opened
	}
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
	p, err := a.box.Open(cmd.SealedParams, protocol.SealedParamsPlace(cmd.Instance, cmd.ID))
	if err != nil {
		return protocol.Errorf(protocol.CodeInvalidArgument, "the command's sealed params: %v", err)
	}
	cmd.Params, cmd.SealedParams = json.RawMessage(p), ""
	return nil
}

// ec2Identity reads the machine's instance identity document and its
// signature from the instance metadata service at base, with a session
// token (IMDSv2, which machines launched with restricted metadata access
// require).
func ec2Identity(ctx context.Context, base string) (*protocol.EC2Identity, error) {
	got, err := awsapi.IMDS{Base: base}.Get(ctx, "/latest/dynamic/instance-identity/document", "/latest/dynamic/instance-identity/signature")
	if err != nil {
		return nil, err
	}
	return &protocol.EC2Identity{Document: got[0], Signature: strings.TrimSpace(got[1])}, nil
}
