package bus

import (
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	neturl "net/url"
	"strings"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
)

// ConnectConfig says how to reach NATS.
type ConnectConfig struct {
	// URL is one or more comma-separated NATS URLs. Ignored with InProcess.
	URL string
	// InProcess connects to an embedded server (bus/embedded) without a
	// socket. Such a connection cannot fail over, so a role meant for a
	// cluster connects by URL.
	InProcess nats.InProcessConnProvider
	// CredsFile is a NATS credentials file (JWT and seed), if the server
	// requires one; Creds is the same content held in memory.
	CredsFile string
	Creds     []byte
	// CurrentCreds, if set, gives the credentials at every connect and
	// reconnect (they are renewed while the connection lives).
	CurrentCreds func() []byte
	// TLS, if set, is the client side of TLS (the CA to trust).
	TLS *tls.Config
	// Name is the connection name shown by the server (nats server report
	// connections).
	Name string
	// InboxPrefix replaces "_INBOX" so that an agent's permissions can name its
	// own inbox.
	InboxPrefix string
	// RetryOnFailedConnect keeps trying in the background when the first
	// connect fails, instead of returning an error: agents start before the
	// bus is reachable.
	RetryOnFailedConnect bool
	// OnConnect, if set, is called after the first connect and after every
	// reconnect (in its own goroutine).
	OnConnect func()
	// OnRefused, if set, is called when NATS refuses the credentials
	// (revoked, expired, or not authorized): when it cuts the connection,
	// at each reconnect it refuses, and at the first connect's refusal
	// (once). Called from the connection's callback goroutine: it must not
	// block.
	OnRefused func(error)
	// ReconnectDelay, if set, replaces the package's ReconnectDelay (a
	// measuring client that must be back before those it measures).
	ReconnectDelay func(attempts int) time.Duration
	Logger         zerolog.Logger
}

// Connect dials NATS. The connection reconnects forever, with jittered waits,
// and logs each disconnect and reconnect.
func Connect(cfg ConnectConfig) (*nats.Conn, error) {
	log := cfg.Logger
	delay := cfg.ReconnectDelay
	if delay == nil {
		delay = ReconnectDelay
	}
	opts := []nats.Option{
		nats.Name(cfg.Name),
		nats.MaxReconnects(-1),
		nats.CustomReconnectDelay(delay),
		nats.Timeout(5 * time.Second),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn().Err(err).Msg("disconnected from nats")
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.Info().Str("url", nc.ConnectedUrlRedacted()).Msg("reconnected to nats")
			if cfg.OnConnect != nil {
				go cfg.OnConnect()
			}
		}),
		nats.ConnectHandler(func(nc *nats.Conn) {
			// Only called when RetryOnFailedConnect delayed the first connect.
			if cfg.OnConnect != nil {
				go cfg.OnConnect()
			}
		}),
		// A refusal of the first connect (retried in the background) is told
		// here, once: nats.go tells the refusals of the retries that follow
		// to no callback until a connect succeeds.
		nats.ReconnectErrHandler(func(_ *nats.Conn, err error) {
			if cfg.OnRefused != nil && CredentialsRefused(err) {
				cfg.OnRefused(err)
			}
		}),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			if sub == nil && cfg.OnRefused != nil && CredentialsRefused(err) {
				cfg.OnRefused(err)
			}
			ev := log.Warn().Err(err)
			if sub != nil {
				ev = ev.Str("subject", sub.Subject)
			}
			ev.Msg("nats async error")
		}),
	}
	if cfg.CredsFile != "" {
		opts = append(opts, nats.UserCredentials(cfg.CredsFile))
	}
	if cfg.Creds != nil {
		tok, seed, err := splitCreds(cfg.Creds)
		if err != nil {
			return nil, fmt.Errorf("connect to nats: credentials: %w", err)
		}
		opts = append(opts, nats.UserJWTAndSeed(tok, seed))
	}
	if cfg.CurrentCreds != nil {
		if _, _, err := splitCreds(cfg.CurrentCreds()); err != nil {
			return nil, fmt.Errorf("connect to nats: credentials: %w", err)
		}
		// nats.go gives up reconnecting after the same refusal twice; these
		// credentials are renewed meanwhile, and the next try uses them.
		opts = append(opts, nats.IgnoreAuthErrorAbort())
		opts = append(opts, nats.UserJWT(func() (string, error) {
			tok, _, err := splitCreds(cfg.CurrentCreds())
			return tok, err
		}, func(nonce []byte) ([]byte, error) {
			kp, err := jwt.ParseDecoratedUserNKey(cfg.CurrentCreds())
			if err != nil {
				return nil, err
			}
			defer kp.Wipe()
			return kp.Sign(nonce)
		}))
	}
	if cfg.TLS != nil && cfg.InProcess == nil {
		opts = append(opts, nats.Secure(cfg.TLS))
	}
	if cfg.InboxPrefix != "" {
		opts = append(opts, nats.CustomInboxPrefix(cfg.InboxPrefix))
	}
	if cfg.RetryOnFailedConnect {
		opts = append(opts, nats.RetryOnFailedConnect(true))
	}
	url := cfg.URL
	if cfg.InProcess != nil {
		opts = append(opts, nats.InProcessServer(cfg.InProcess))
		url = ""
	} else if url == "" {
		return nil, errors.New("connect to nats: no url")
	}
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		return nil, fmt.Errorf("connect to nats at %s: %w", redact(url), err)
	}
	if nc.IsConnected() && cfg.OnConnect != nil {
		go cfg.OnConnect()
	}
	return nc, nil
}

// CredentialsRefused says whether err (a connection's last error, or one
// told to a callback) is NATS refusing the connection's credentials.
func CredentialsRefused(err error) bool {
	return errors.Is(err, nats.ErrAuthRevoked) || errors.Is(err, nats.ErrAuthExpired) || errors.Is(err, nats.ErrAuthorization)
}

// splitCreds returns the JWT and seed of a creds file's content.
func splitCreds(creds []byte) (string, string, error) {
	tok, err := jwt.ParseDecoratedJWT(creds)
	if err != nil {
		return "", "", err
	}
	kp, err := jwt.ParseDecoratedUserNKey(creds)
	if err != nil {
		return "", "", err
	}
	seed, err := kp.Seed()
	return tok, string(seed), err
}

// ReconnectDelay is the wait before reconnect attempt n (after every server
// of the list failed once): exponential from 250ms, capped at 15s, with up to
// half of it added at random, so that a fleet of agents does not reconnect
// in step after a bus outage.
func ReconnectDelay(attempts int) time.Duration {
	d := 250 * time.Millisecond << min(attempts, 6)
	d = min(d, 15*time.Second)
	return d + time.Duration(rand.Int64N(int64(d/2)+1))
}

// redact hides any password in a URL list for error messages.
func redact(urls string) string {
	parts := strings.Split(urls, ",")
	for i, p := range parts {
		if u, err := neturl.Parse(strings.TrimSpace(p)); err == nil {
			parts[i] = u.Redacted()
		}
	}
	return strings.Join(parts, ",")
}
