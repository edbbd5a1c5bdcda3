package natsauth

import (
	"slices"
	"strings"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/jwt/v2"
)

// Why three accounts. NATS checks the subject a user publishes on, never
// the reply subject it names, and JetStream answers to that reply from
// inside the account: the publish acknowledgement of an event, the answer
// of a direct get or of any API request (a consumer, too, delivers inside
// the account, on the subject its maker chose). In one shared account, a
// user allowed to publish its own event with the reply
// "$KV.fm_desired.<another instance>" had JetStream write into that key. So agents and read-only operators are users of
// accounts of their own, which hold no stream: what they may reach of the
// FM account is exported to them, a request crosses to the FM account and
// its answer comes back to the asking account, where nothing stores it.
// No consumer can be made from outside the FM account (its delivery
// subject would be the FM account's): an agent receives its commands
// republished on its live subject (protocol.CommandLiveSubject) and asks
// the server for those it missed (protocol.CommandsAfterSubject), and
// objects are read by direct gets.

// account is one account FM signs.
type account struct {
	name   string
	pub    string
	claims func(revocations map[string]int64) (string, error)
}

// accounts are the accounts the authority signs, FM's first: the others
// import from it.
func (a *Authority) accounts() []account {
	return []account{{AccountFM, a.accountPub, a.fmAccountJWT}, a.agentsAccount(), {AccountReaders, a.readersPub, a.readersAccountJWT}}
}

// agentsAccount is the one account revocations change.
func (a *Authority) agentsAccount() account {
	return account{AccountAgents, a.agentsPub, a.agentsAccountJWT}
}

// AgentsAccountJWT is the agents' account's JWT with the revocations
// given (user public key -> unix time): what grows with the fleet.
func (a *Authority) AgentsAccountJWT(revocations map[string]int64) (string, error) {
	return a.agentsAccountJWT(revocations)
}

// fmAccountJWT is the FM account's JWT: JetStream enabled, FM's signing
// key, and what it exports to the other accounts. It takes no revocations
// (those FM keeps are agents').
func (a *Authority) fmAccountJWT(map[string]int64) (string, error) {
	ac := jwt.NewAccountClaims(a.accountPub)
	ac.Name = "FM"
	ac.SigningKeys.Add(a.signingPub)
	ac.Limits.JetStreamLimits = jwt.JetStreamLimits{MemoryStorage: -1, DiskStorage: -1, Streams: -1, Consumer: -1}
	for _, e := range exports {
		ac.Exports.Add(&jwt.Export{Name: e.inFM(), Subject: jwt.Subject(e.inFM()), Type: e.kind, ResponseType: e.response})
	}
	// No revocations: agents are users of the agents' account, and those of
	// this account from before it are signed by a signing key it no longer
	// names (seeds.complete).
	return ac.Encode(a.operator)
}

func (a *Authority) agentsAccountJWT(revocations map[string]int64) (string, error) {
	ac := jwt.NewAccountClaims(a.agentsPub)
	ac.Name = "AGENTS"
	a.importAll(ac, agentImports)
	revoke(ac, revocations)
	return ac.Encode(a.operator)
}

// readersAccountJWT takes no revocations: FM keeps only agents' (a
// read-only operator's credentials are not revoked; they expire, those of
// fm nats-creds after 30 days by default).
func (a *Authority) readersAccountJWT(map[string]int64) (string, error) {
	ac := jwt.NewAccountClaims(a.readersPub)
	ac.Name = "READERS"
	a.importAll(ac, readerImports)
	return ac.Encode(a.operator)
}

// importAll imports into ac each of imports from the FM account, a
// JetStream request under protocol.OutsideJSAPIPrefix: under its own name,
// the server's "JetStream not enabled for this account" would answer it
// first. A mapping takes the usual prefix there, so that clients (the
// agent, the NATS CLI) need no option; permissions see the mapped subject.
func (a *Authority) importAll(ac *jwt.AccountClaims, imports []export) {
	ac.Mappings = jwt.Mapping{jwt.Subject(jsAPI + ">"): {{Subject: jwt.Subject(outside + ">"), Weight: 100}}}
	for _, i := range imports {
		imp := &jwt.Import{Name: i.subject, Subject: jwt.Subject(i.inFM()), Account: a.accountPub, Type: i.kind}
		if rest, ok := strings.CutPrefix(i.subject, jsAPI); ok {
			imp.LocalSubject = jwt.RenamingSubject(protocol.OutsideJSAPIPrefix + "." + rest)
		} else if i.relayed {
			imp.LocalSubject = jwt.RenamingSubject(i.subject)
		}
		ac.Imports.Add(imp)
	}
}

// AllUsers, as a key of a revocation list, revokes every user of the
// account issued at or before its time.
const AllUsers = jwt.All

func revoke(ac *jwt.AccountClaims, revocations map[string]int64) {
	for pub, at := range revocations {
		ac.RevokeAt(pub, time.Unix(at, 0))
	}
}

// export is a subject the FM account exports (or another imports), with
// how many answers a request gets.
type export struct {
	subject  string
	kind     jwt.ExportType
	response jwt.ResponseType
	// relayed: the request reaches the FM account under relayPrefix, where
	// the relay (relay.go) stores it.
	relayed bool
}

// inFM is the export's subject in the FM account.
func (e export) inFM() string {
	if e.relayed {
		return RelaySubject(e.subject)
	}
	return e.subject
}

func service(subject string) export {
	return export{subject, jwt.Service, jwt.ResponseTypeSingleton, false}
}

func stream(subject string) export { return export{subject, jwt.Stream, "", false} }

// relayed is a service that the relay takes in the FM account.
func relayed(subject string) export { e := service(subject); e.relayed = true; return e }

const (
	jsAPI         = "$JS.API."
	outside       = protocol.OutsideJSAPIPrefix + "."
	kitsStream    = "OBJ_" + protocol.ObjectStoreKits
	desiredStream = "KV_" + protocol.BucketDesired
)

// Building blocks of the exports and imports below.
var (
	// agentsPublish are the subjects agents publish on, their requests:
	// what goes into a stream through the relay, the rest to the server's
	// subscriptions.
	agentsPublish = []export{
		relayed("fm.evt.>"), relayed("fm.log.>"), relayed("fm.diag.>"), relayed(protocol.KVSubject(protocol.BucketAgents, ">")),
		service("fm.hb.>"), service("fm.renew.>"), service("fm.cmdafter.>"),
	}
	// looking are the JetStream requests that change nothing and make no
	// consumer.
	looking = []export{
		service(jsAPI + "INFO"), service(jsAPI + "STREAM.INFO.>"), service(jsAPI + "STREAM.LIST"), service(jsAPI + "STREAM.NAMES"),
		service(jsAPI + "CONSUMER.INFO.>"), service(jsAPI + "CONSUMER.LIST.>"), service(jsAPI + "CONSUMER.NAMES.>"),
		service(jsAPI + "DIRECT.GET.>"), service(jsAPI + "STREAM.MSG.GET.>"),
	}
)

// exports are what the FM account offers the others, none overlapping
// another: the agents' requests, JetStream requests that only look, and
// what FM publishes that others may receive.
var exports = slices.Concat(agentsPublish, looking, []export{stream("fm.>")})

// agentImports are what the agents' account takes of the exports, the
// JetStream ones narrowed to the streams agents read; each agent's
// permissions narrow them to its own instance.
var agentImports = slices.Concat(agentsPublish, []export{
	service(jsAPI + "DIRECT.GET." + desiredStream + ".>"),
	service(jsAPI + "STREAM.INFO." + kitsStream),
	service(jsAPI + "DIRECT.GET." + kitsStream), service(jsAPI + "DIRECT.GET." + kitsStream + ".>"),
	stream("fm.desired.>"), stream("fm.cmdlive.>"),
})

// readerImports are what the read-only operators' account takes: looking,
// with no consumer.
var readerImports = append(slices.Clone(looking), stream("fm.>"))

func allow(subjects ...string) jwt.Permission { return jwt.Permission{Allow: subjects} }

// AgentPermissions allow an agent exactly what it needs of its own
// instance, within what its account imports: its subjects (the events an
// agent sends, its logs of each source, diagnosis bundles, heartbeats,
// renewals, its commands' catch-ups), its keys (its desired state by direct
// get, its status), reading the kit store by direct gets, its desired
// state's and its commands' live subjects, and its own inbox.
func AgentPermissions(instance string) jwt.Permissions {
	var events []string
	for _, k := range protocol.AgentEventKinds {
		events = append(events, protocol.EventSubject(instance, k))
	}
	for _, source := range protocol.LogSources {
		events = append(events, protocol.LogSubject(instance, source))
	}
	return jwt.Permissions{
		Pub: allow(append(events,
			protocol.DiagSubject(instance, "*"),
			protocol.HeartbeatSubject(instance),
			protocol.RenewSubject(instance),
			protocol.CommandsAfterSubject(instance),
			protocol.KVSubject(protocol.BucketAgents, instance),
			outside+"DIRECT.GET."+desiredStream+"."+protocol.KVSubject(protocol.BucketDesired, instance),
			outside+"STREAM.INFO."+kitsStream,
			outside+"DIRECT.GET."+kitsStream,
			outside+"DIRECT.GET."+kitsStream+".>",
		)...),
		Sub: allow(protocol.DesiredSubject(instance), protocol.CommandLiveSubject(instance), protocol.InboxPrefix(instance)+".>"),
	}
}

// ReaderPermissions let a read-only operator look (nats stream ls/info/get,
// kv get, sub) without changing anything: what its account imports (no
// publishing on FM's subjects or keys, no consumer, since its delivery
// subject would be FM's, no deleting or purging), less diagnosis bundles
// (env-site.sh, whole logs): neither their chunks on the way nor the filed
// bundles, which the account's import of every direct get would reach;
// and less the web console's sessions (fm_sessions: CSRF tokens, who is
// signed in).
func ReaderPermissions() jwt.Permissions {
	var pub, sub []string
	for _, i := range readerImports {
		if rest, ok := strings.CutPrefix(i.subject, jsAPI); ok {
			pub = append(pub, outside+rest)
		} else if i.kind == jwt.Stream {
			sub = append(sub, i.subject)
		}
	}
	var deny []string
	for _, stream := range []string{protocol.StreamDiagnosis, "OBJ_" + protocol.ObjectStoreDiagnosis, "KV_" + protocol.BucketSessions} {
		deny = append(deny, outside+"DIRECT.GET."+stream, outside+"DIRECT.GET."+stream+".>", outside+"STREAM.MSG.GET."+stream)
	}
	return jwt.Permissions{
		Pub: jwt.Permission{Allow: pub, Deny: deny},
		Sub: jwt.Permission{Allow: append(sub, "_INBOX.>"), Deny: []string{protocol.DiagSubject("*", "*")}},
	}
}
