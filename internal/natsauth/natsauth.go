// Package natsauth holds FM's NATS identities in operator mode (JWT): an
// operator, the FM account (with JetStream; FM's roles and admin
// operators), the agents' and the read-only operators' accounts (no
// JetStream; what they may reach of the FM account is exported to them:
// accounts.go) and the system account, whose keys FM creates on first
// start and keeps in a folder (mode 0600). It mints user credentials for
// the server, the provisioner, operators and each agent, the agent's
// permissions allowing its own subjects and nothing else; it configures an
// embedded nats-server to trust them, and pushes account updates
// (revocations) through the system account, as a NATS cluster with the
// full resolver takes them.
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
	"strings"
	"time"

	"github.com/fleetmanager/fm/internal/atomicfile"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
)

// Authority is FM's NATS operator and its accounts: FM's own (JetStream,
// every stream, bucket and object store; FM's roles), the agents' and the
// read-only operators' (no JetStream; what they may reach of FM's account
// is imported: accounts.go), and the system account.
type Authority struct {
	dir                       string
	operator, account, system nkeys.KeyPair
	signing                   nkeys.KeyPair // signs users of the FM account
	agents, readers           nkeys.KeyPair // the agents' and read-only operators' accounts; sign their users
	operatorPub, accountPub   string
	systemPub, signingPub     string
	agentsPub, readersPub     string
	operatorJWT, systemJWT    string
}

// seeds is the keys file. Agents and Readers were added with the accounts
// of their own: a file without them gets them on the next Open.
type seeds struct {
	Operator string `json:"operator"`
	Account  string `json:"account"`
	System   string `json:"system"`
	Signing  string `json:"signing"`
	Agents   string `json:"agents,omitempty"`
	Readers  string `json:"readers,omitempty"`
}

// Open loads the authority kept in dir, creating it (or the keys it lacks)
// on first use.
func Open(dir string) (*Authority, error) {
	path := filepath.Join(dir, "keys.json")
	var s seeds
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("natsauth: %w", err)
	default:
		if err := json.Unmarshal(b, &s); err != nil {
			return nil, fmt.Errorf("natsauth: %s: %w", path, err)
		}
	}
	if added, err := s.complete(); err != nil {
		return nil, err
	} else if added {
		data, _ := json.MarshalIndent(s, "", "  ")
		if err := atomicfile.WriteFile(path, data, 0o600); err != nil {
			return nil, fmt.Errorf("natsauth: %w", err)
		}
	}
	a := &Authority{dir: dir}
	for _, k := range []struct {
		seed string
		kp   *nkeys.KeyPair
		pub  *string
	}{{s.Operator, &a.operator, &a.operatorPub}, {s.Account, &a.account, &a.accountPub},
		{s.System, &a.system, &a.systemPub}, {s.Signing, &a.signing, &a.signingPub},
		{s.Agents, &a.agents, &a.agentsPub}, {s.Readers, &a.readers, &a.readersPub}} {
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

// complete creates the keys s lacks, saying whether it did. A file from
// before the agents' and readers' accounts also gets a new signing key for
// the FM account: every user of that account minted before (agents' and
// read-only operators' credentials of then, which reach JetStream's
// answers inside it) is signed by a key the account no longer names, so
// none is valid, whatever the clocks say. FM's own roles are minted at each
// start.
func (s *seeds) complete() (bool, error) {
	added := false
	if s.Operator != "" && s.Agents == "" {
		s.Signing = ""
	}
	for _, k := range []struct {
		create func() (nkeys.KeyPair, error)
		seed   *string
	}{{nkeys.CreateOperator, &s.Operator}, {nkeys.CreateAccount, &s.Account},
		{nkeys.CreateAccount, &s.System}, {nkeys.CreateAccount, &s.Signing},
		{nkeys.CreateAccount, &s.Agents}, {nkeys.CreateAccount, &s.Readers}} {
		if *k.seed != "" {
			continue
		}
		kp, err := k.create()
		if err != nil {
			return false, err
		}
		seed, err := kp.Seed()
		if err != nil {
			return false, err
		}
		*k.seed, added = string(seed), true
	}
	return added, nil
}

// AccountPub is the FM account's public key.
func (a *Authority) AccountPub() string { return a.accountPub }

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
	// Seed the resolver on first start. Later starts keep the revocations
	// pushed since, in accounts brought up to this version's exports and
	// imports (the agents' and readers' accounts are new to data folders
	// made before them).
	for _, acc := range a.accounts() {
		var revocations map[string]int64
		if stored, err := res.Fetch(acc.pub); err == nil {
			if ac, err := jwt.DecodeAccountClaims(stored); err == nil {
				revocations = ac.Revocations
			}
		}
		claims, err := acc.claims(revocations)
		if err != nil {
			return err
		}
		if err := res.Store(acc.pub, claims); err != nil {
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
	var b strings.Builder
	fmt.Fprintf(&b, "operator: %s\nsystem_account: %s\nresolver: {\n  type: full\n  dir: \"./jwt\"\n  allow_delete: false\n}\n"+
		"resolver_preload: {\n", a.operatorJWT, a.systemPub)
	for _, acc := range a.accounts() {
		claims, err := acc.claims(nil)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(&b, "  %s: %s\n", acc.pub, claims)
	}
	fmt.Fprintf(&b, "  %s: %s\n}\n", a.systemPub, a.systemJWT)
	return b.String(), nil
}

// Creds mints credentials (a creds file's content) for a user of the FM
// account named name with perms (zero: everything), expiring at expires
// (zero: never): FM's own roles and admin operators. It returns the user's
// public key, for revocation.
func (a *Authority) Creds(name string, perms jwt.Permissions, expires time.Time) ([]byte, string, error) {
	return a.mint(a.signing, a.accountPub, name, perms, expires)
}

// ReaderCreds mints credentials for a read-only operator, a user of the
// readers' account (ReaderPermissions), expiring at expires (zero: never).
func (a *Authority) ReaderCreds(name string, expires time.Time) ([]byte, string, error) {
	return a.mint(a.readers, "", name, ReaderPermissions(), expires)
}

// SystemCreds mints credentials of the system account, which push account
// updates.
func (a *Authority) SystemCreds() ([]byte, string, error) {
	return a.mint(a.system, "", "fm-system", jwt.Permissions{}, time.Time{})
}

// MonitorCreds mints credentials of a user of the system account who may
// only ask every server for its general state, its JetStream state and
// its health ($SYS.REQ.SERVER.PING, .STATSZ, .VARZ, .JSZ, .HEALTHZ, .IDZ:
// nats server report jetstream, nats server list): a cluster's operator
// checks its health with them and can change nothing. Not the servers'
// connections and subscriptions (CONNZ, SUBSZ: every agent's address and
// user), nor profiles (PROFILEZ). A system account's user cannot be
// revoked as agents are: they are minted with an expiry (the server caps
// it).
func (a *Authority) MonitorCreds(name string, expires time.Time) ([]byte, string, error) {
	return a.mint(a.system, "", name, MonitorPermissions(), expires)
}

// MonitorPermissions are a monitoring user's (MonitorCreds).
func MonitorPermissions() jwt.Permissions {
	return jwt.Permissions{
		Pub: jwt.Permission{Allow: []string{"$SYS.REQ.SERVER.PING", "$SYS.REQ.SERVER.PING.STATSZ", "$SYS.REQ.SERVER.PING.VARZ",
			"$SYS.REQ.SERVER.PING.JSZ", "$SYS.REQ.SERVER.PING.HEALTHZ", "$SYS.REQ.SERVER.PING.IDZ"}},
		Sub: jwt.Permission{Allow: []string{"_INBOX.>"}},
	}
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
// key), a user of the agents' account: AgentPermissions, agent limits,
// expiring at expires.
func (a *Authority) AgentJWT(instance, pub string, expires time.Time) (string, error) {
	if !nkeys.IsValidPublicUserKey(pub) {
		return "", fmt.Errorf("natsauth: %q is not a NATS user public key", pub)
	}
	return userJWT(a.agents, "", instance, pub, AgentPermissions(instance), expires, func(uc *jwt.UserClaims) {
		uc.Limits.Payload, uc.Limits.Subs = agentMaxPayload, agentMaxSubs
		uc.Tags.Add(protocol.AgentsAccountTag)
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

// Push sends every account's JWT, the agents' with revocations (of
// agents' keys), to the servers through a connection of the system
// account, and waits for each answer: at a server's start.
func (a *Authority) Push(ctx context.Context, sys *nats.Conn, revocations map[string]int64) error {
	return a.push(ctx, sys, a.accounts(), revocations)
}

// PushRevocations sends the agents' account's JWT with revocations: the
// only one they change.
func (a *Authority) PushRevocations(ctx context.Context, sys *nats.Conn, revocations map[string]int64) error {
	return a.push(ctx, sys, []account{a.agentsAccount()}, revocations)
}

func (a *Authority) push(ctx context.Context, sys *nats.Conn, accounts []account, revocations map[string]int64) error {
	for _, acc := range accounts {
		claims, err := acc.claims(revocations)
		if err != nil {
			return err
		}
		msg, err := sys.RequestWithContext(ctx, "$SYS.REQ.CLAIMS.UPDATE", []byte(claims))
		if err != nil {
			return fmt.Errorf("natsauth: push the %s account: %w", acc.name, err)
		}
		var resp struct {
			Error *struct {
				Code        int    `json:"code"`
				Description string `json:"description"`
			} `json:"error"`
		}
		if json.Unmarshal(msg.Data, &resp) == nil && resp.Error != nil {
			return fmt.Errorf("natsauth: push the %s account: %d %s", acc.name, resp.Error.Code, resp.Error.Description)
		}
	}
	return nil
}

// Account names, as CredsAccount tells them.
const (
	AccountFM      = "FM"
	AccountAgents  = "AGENTS"
	AccountReaders = "READERS"
)

// CredsAccount is the account whose user creds are, if they are valid with
// this authority; "" otherwise. Users of the FM account signed before the
// agents' and readers' accounts existed are not (seeds.complete).
func (a *Authority) CredsAccount(creds []byte) string {
	tok, err := jwt.ParseDecoratedJWT(creds)
	if err != nil {
		return ""
	}
	uc, err := jwt.DecodeUserClaims(tok)
	if err != nil {
		return ""
	}
	switch {
	case uc.Issuer == a.agentsPub:
		return AccountAgents
	case uc.Issuer == a.readersPub:
		return AccountReaders
	case uc.Issuer == a.signingPub && uc.IssuerAccount == a.accountPub:
		return AccountFM
	}
	return ""
}

// CredsFile writes creds to path with mode 0600.
func CredsFile(path string, creds []byte) error { return atomicfile.WriteFile(path, creds, 0o600) }
