// Package natsauth holds FM's NATS identities in operator mode (JWT): an
// operator, the FM account (with JetStream) and the system account, whose
// keys FM creates on first start and keeps in a folder (mode 0600). It mints
// user credentials for the server, the provisioner, operators and each
// agent, the agent's permissions allowing its own subjects and nothing else;
// it configures an embedded nats-server to trust them, and pushes account
// updates (revocations) through the system account, as a NATS cluster with
// the full resolver takes them.
//
// cmd/fm and server import it; it imports no FM role.
package natsauth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/fleetmanager/fm/internal/atomicfile"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
)

// Authority is FM's NATS operator, account and system account.
type Authority struct {
	dir                       string
	operator, account, system nkeys.KeyPair
	signing                   nkeys.KeyPair // signs users of the FM account
	operatorPub, accountPub   string
	systemPub, signingPub     string
	operatorJWT, systemJWT    string
}

// seeds is the keys file.
type seeds struct {
	Operator string `json:"operator"`
	Account  string `json:"account"`
	System   string `json:"system"`
	Signing  string `json:"signing"`
}

// Open loads the authority kept in dir, creating it on first use.
func Open(dir string) (*Authority, error) {
	path := filepath.Join(dir, "keys.json")
	var s seeds
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if s, err = newSeeds(); err != nil {
			return nil, err
		}
		data, _ := json.MarshalIndent(s, "", "  ")
		if err := atomicfile.WriteFile(path, data, 0o600); err != nil {
			return nil, fmt.Errorf("natsauth: %w", err)
		}
	case err != nil:
		return nil, fmt.Errorf("natsauth: %w", err)
	default:
		if err := json.Unmarshal(b, &s); err != nil {
			return nil, fmt.Errorf("natsauth: %s: %w", path, err)
		}
	}
	a := &Authority{dir: dir}
	for _, k := range []struct {
		seed string
		kp   *nkeys.KeyPair
		pub  *string
	}{{s.Operator, &a.operator, &a.operatorPub}, {s.Account, &a.account, &a.accountPub},
		{s.System, &a.system, &a.systemPub}, {s.Signing, &a.signing, &a.signingPub}} {
		kp, err := nkeys.FromSeed([]byte(k.seed))
		if err != nil {
			return nil, fmt.Errorf("natsauth: %s: bad seed: %w", path, err)
		}
		*k.kp = kp
		if *k.pub, err = kp.PublicKey(); err != nil {
			return nil, err
		}
	}
	oc := jwt.NewOperatorClaims(a.operatorPub)
	oc.Name, oc.SystemAccount = "fleet-manager", a.systemPub
	if a.operatorJWT, err = oc.Encode(a.operator); err != nil {
		return nil, fmt.Errorf("natsauth: operator: %w", err)
	}
	sc := jwt.NewAccountClaims(a.systemPub)
	sc.Name = "SYS"
	if a.systemJWT, err = sc.Encode(a.operator); err != nil {
		return nil, fmt.Errorf("natsauth: system account: %w", err)
	}
	return a, nil
}

func newSeeds() (seeds, error) {
	var s seeds
	for _, k := range []struct {
		create func() (nkeys.KeyPair, error)
		seed   *string
	}{{nkeys.CreateOperator, &s.Operator}, {nkeys.CreateAccount, &s.Account},
		{nkeys.CreateAccount, &s.System}, {nkeys.CreateAccount, &s.Signing}} {
		kp, err := k.create()
		if err != nil {
			return s, err
		}
		seed, err := kp.Seed()
		if err != nil {
			return s, err
		}
		*k.seed = string(seed)
	}
	return s, nil
}

// AccountPub is the FM account's public key.
func (a *Authority) AccountPub() string { return a.accountPub }

// AccountJWT is the FM account's JWT: JetStream enabled, FM's signing key,
// and the revocations given (user public key -> unix time).
func (a *Authority) AccountJWT(revocations map[string]int64) (string, error) {
	ac := jwt.NewAccountClaims(a.accountPub)
	ac.Name = "FM"
	ac.SigningKeys.Add(a.signingPub)
	ac.Limits.JetStreamLimits = jwt.JetStreamLimits{MemoryStorage: -1, DiskStorage: -1, Streams: -1, Consumer: -1}
	for pub, at := range revocations {
		ac.RevokeAt(pub, time.Unix(at, 0))
	}
	return ac.Encode(a.operator)
}

// ConfigureEmbedded makes opts trust FM's operator, with a directory
// resolver under resolverDir (which keeps pushed account updates across
// restarts).
func (a *Authority) ConfigureEmbedded(opts *server.Options, resolverDir string) error {
	oc, err := jwt.DecodeOperatorClaims(a.operatorJWT)
	if err != nil {
		return err
	}
	res, err := server.NewDirAccResolver(resolverDir, 0, 2*time.Minute, server.NoDelete)
	if err != nil {
		return fmt.Errorf("natsauth: resolver: %w", err)
	}
	// Seed the resolver on first start; later starts keep what was pushed
	// (revocations included).
	if _, err := res.Fetch(a.accountPub); err != nil {
		acc, err := a.AccountJWT(nil)
		if err != nil {
			return err
		}
		if err := res.Store(a.accountPub, acc); err != nil {
			return fmt.Errorf("natsauth: resolver: %w", err)
		}
	}
	if _, err := res.Fetch(a.systemPub); err != nil {
		if err := res.Store(a.systemPub, a.systemJWT); err != nil {
			return fmt.Errorf("natsauth: resolver: %w", err)
		}
	}
	opts.TrustedOperators = []*jwt.OperatorClaims{oc}
	opts.SystemAccount = a.systemPub
	opts.AccountResolver = res
	return nil
}

// ServerConfig is the nats-server configuration an operator adds to a
// cluster's nodes to trust this authority (operator mode, full resolver).
func (a *Authority) ServerConfig() (string, error) {
	acc, err := a.AccountJWT(nil)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("operator: %s\nsystem_account: %s\nresolver: {\n  type: full\n  dir: \"./jwt\"\n  allow_delete: false\n}\n"+
		"resolver_preload: {\n  %s: %s\n  %s: %s\n}\n", a.operatorJWT, a.systemPub, a.accountPub, acc, a.systemPub, a.systemJWT), nil
}

// Creds mints credentials (a creds file's content) for a user of the FM
// account named name with perms (zero: everything), expiring at expires
// (zero: never). It returns the user's public key, for revocation.
func (a *Authority) Creds(name string, perms jwt.Permissions, expires time.Time) ([]byte, string, error) {
	return a.mint(a.signing, a.accountPub, name, perms, expires)
}

// SystemCreds mints credentials of the system account, which push account
// updates.
func (a *Authority) SystemCreds() ([]byte, string, error) {
	return a.mint(a.system, "", "fm-system", jwt.Permissions{}, time.Time{})
}

func (a *Authority) mint(issuer nkeys.KeyPair, issuerAccount, name string, perms jwt.Permissions, expires time.Time) ([]byte, string, error) {
	ukp, err := nkeys.CreateUser()
	if err != nil {
		return nil, "", err
	}
	pub, _ := ukp.PublicKey()
	seed, _ := ukp.Seed()
	tok, err := userJWT(issuer, issuerAccount, name, pub, perms, expires)
	if err != nil {
		return nil, "", err
	}
	creds, err := jwt.FormatUserConfig(tok, seed)
	return creds, pub, err
}

// Limits of an agent's user: what its largest message needs (a diagnosis
// bundle's 256 KiB chunk, a command's result with 64 KiB of output), and
// the subscriptions it makes, with room; a noisy or hostile machine can
// send nothing larger.
const (
	agentMaxPayload = 1 << 20
	agentMaxSubs    = 256
)

// AgentJWT signs the JWT of instance's agent user pub (the machine's own
// key): AgentPermissions, agent limits, expiring at expires.
func (a *Authority) AgentJWT(instance, pub string, expires time.Time) (string, error) {
	if !nkeys.IsValidPublicUserKey(pub) {
		return "", fmt.Errorf("natsauth: %q is not a NATS user public key", pub)
	}
	return userJWT(a.signing, a.accountPub, instance, pub, AgentPermissions(instance), expires, func(uc *jwt.UserClaims) {
		uc.Limits.Payload, uc.Limits.Subs = agentMaxPayload, agentMaxSubs
	})
}

func userJWT(issuer nkeys.KeyPair, issuerAccount, name, pub string, perms jwt.Permissions, expires time.Time, more ...func(*jwt.UserClaims)) (string, error) {
	uc := jwt.NewUserClaims(pub)
	uc.Name, uc.IssuerAccount, uc.Permissions = name, issuerAccount, perms
	for _, f := range more {
		f(uc)
	}
	if !expires.IsZero() {
		uc.Expires = expires.Unix()
	}
	tok, err := uc.Encode(issuer)
	if err != nil {
		return "", fmt.Errorf("natsauth: user %s: %w", name, err)
	}
	return tok, nil
}

// Push sends the FM account's JWT with revocations to the servers through a
// connection of the system account, and waits for the answer.
func (a *Authority) Push(ctx context.Context, sys *nats.Conn, revocations map[string]int64) error {
	acc, err := a.AccountJWT(revocations)
	if err != nil {
		return err
	}
	msg, err := sys.RequestWithContext(ctx, "$SYS.REQ.CLAIMS.UPDATE", []byte(acc))
	if err != nil {
		return fmt.Errorf("natsauth: push the account: %w", err)
	}
	var resp struct {
		Error *struct {
			Code        int    `json:"code"`
			Description string `json:"description"`
		} `json:"error"`
	}
	if json.Unmarshal(msg.Data, &resp) == nil && resp.Error != nil {
		return fmt.Errorf("natsauth: push the account: %d %s", resp.Error.Code, resp.Error.Description)
	}
	return nil
}

func allow(subjects ...string) jwt.Permission { return jwt.Permission{Allow: subjects} }

// AgentPermissions allow an agent exactly what it needs of its own
// instance: its subjects (the events an agent sends, logs, heartbeats), its keys (its desired
// state by direct get, its status), a consumer on its own commands, reading
// the kit store, and its own inbox.
func AgentPermissions(instance string) jwt.Permissions {
	kits := "OBJ_" + protocol.ObjectStoreKits
	commands := protocol.CommandConsumer(instance)
	var events []string
	for _, k := range protocol.AgentEventKinds {
		events = append(events, protocol.EventSubject(instance, k))
	}
	return jwt.Permissions{
		Pub: allow(append(events,
			protocol.LogSubject(instance, "*"),
			protocol.HeartbeatSubject(instance),
			protocol.RenewSubject(instance),
			protocol.KVSubject(protocol.BucketAgents, instance),
			"$JS.API.DIRECT.GET.KV_"+protocol.BucketDesired+"."+protocol.KVSubject(protocol.BucketDesired, instance),
			"$JS.API.CONSUMER.CREATE."+protocol.StreamCommands+"."+commands+"."+protocol.CommandFilter(instance),
			"$JS.API.CONSUMER.MSG.NEXT."+protocol.StreamCommands+"."+commands,
			"$JS.API.CONSUMER.DELETE."+protocol.StreamCommands+"."+commands,
			"$JS.API.CONSUMER.INFO."+protocol.StreamCommands+"."+commands,
			"$JS.API.STREAM.INFO."+kits,
			"$JS.API.DIRECT.GET."+kits+".>",
			"$JS.API.STREAM.MSG.GET."+kits,
			"$JS.API.CONSUMER.CREATE."+kits+".>",
			"$JS.API.CONSUMER.MSG.NEXT."+kits+".*",
			"$JS.API.CONSUMER.DELETE."+kits+".*",
			// Flow control replies of a large kit's download.
			"$JS.FC."+kits+".>",
		)...),
		Sub: allow(protocol.DesiredSubject(instance), protocol.InboxPrefix(instance)+".>"),
	}
}

// ReadOnlyPermissions let an operator look (nats stream ls/info/view, kv
// ls/get/history, sub) without changing anything: no publishing on FM's
// subjects or keys, no acknowledging (which would take work from the
// provisioner), no deleting or purging.
func ReadOnlyPermissions() jwt.Permissions {
	return jwt.Permissions{
		Pub: jwt.Permission{
			Allow: []string{"$JS.API.INFO", "$JS.API.STREAM.INFO.>", "$JS.API.STREAM.LIST", "$JS.API.STREAM.NAMES",
				"$JS.API.CONSUMER.INFO.>", "$JS.API.CONSUMER.LIST.>", "$JS.API.CONSUMER.NAMES.>",
				"$JS.API.DIRECT.GET.>", "$JS.API.STREAM.MSG.GET.>", "$JS.API.CONSUMER.CREATE.>",
				"$JS.API.CONSUMER.MSG.NEXT.>", "$JS.FC.>"},
		},
		Sub: allow("_INBOX.>", "fm.>"),
	}
}

// CredsFile writes creds to path with mode 0600.
func CredsFile(path string, creds []byte) error { return atomicfile.WriteFile(path, creds, 0o600) }

// PublicKeyOf returns the public key of a creds file's user.
func PublicKeyOf(creds []byte) (string, error) {
	tok, err := jwt.ParseDecoratedJWT(creds)
	if err != nil {
		return "", err
	}
	uc, err := jwt.DecodeUserClaims(tok)
	if err != nil {
		return "", err
	}
	return uc.Subject, nil
}
