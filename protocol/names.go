package protocol

import "strings"

// Key-value buckets. Each holds one JSON document per key; the key is the
// object's id unless stated otherwise.
const (
	BucketNetworks  = "fm_networks"  // virtual networks; written by the server
	BucketTemplates = "fm_templates" // instance settings templates; written by the server
	BucketInstances = "fm_instances" // instance settings; written by the server
	BucketImages    = "fm_images"    // deployable DSS images; written by the server
	BucketSnapshots = "fm_snapshots" // snapshot records; written by the server
	BucketAPIKeys   = "fm_apikeys"   // REST API keys, secrets hashed; written by the server
	BucketOps       = "fm_ops"       // operations ("futures"); written by the server
	BucketSettings  = "fm_settings"  // tenant settings, key "<tenant>.<setting>"; written by the server
	BucketLabels    = "fm_labels"    // label claims, key "<kind>.<label digest>", value the owner id
	BucketDesired   = "fm_desired"   // desired state per instance, republished on fm.desired.<instance>
	BucketMachines  = "fm_machines"  // machine state per instance; written by the provisioner
	BucketAgents    = "fm_agents"    // last status per instance (its slow-changing part); written by that agent
	BucketLifecycle = "fm_lifecycle" // FM's lifecycle state per instance; written by the server
	BucketSecrets   = "fm_secrets"   // credentials FM keeps per instance (DSS admin password, API key)
	BucketLeases    = "fm_leases"    // leases electing one active provisioner (and scheduler)
	BucketJoins     = "fm_joins"     // single-use join tokens of new machines, hashed
	BucketAlerts    = "fm_alerts"    // alerts the server raised, key "<tenant>.<fingerprint>"; written by the server
	BucketAccounts  = "fm_accounts"  // cloud accounts (identities networks name), secrets sealed; written by the server
	BucketBalancers = "fm_balancers" // load balancers as the provisioner made them; written by the provisioner
	BucketLBs       = "fm_lbs"       // load balancers' settings and FM's state of them; written by the server
	BucketSessions  = "fm_sessions"  // web console sign-ins, key the SHA-256 of the session cookie; written by the server
)

// LeaseProvisioner is the fm_leases key the active provisioner holds: a
// fleet without it carries out no machine operation.
const LeaseProvisioner = "provisioner"

// Streams.
const (
	StreamProvision = "FM_PROVISION" // work queue of machine operations, fm.prov.<instance>.<action>
	StreamCommands  = "FM_COMMANDS"  // agent commands, fm.cmd.<instance>.<command id>
	StreamEvents    = "FM_EVENTS"    // progress and results, fm.evt.<instance>.<kind>
	StreamLogs      = "FM_LOGS"      // shipped logs, fm.log.<instance>.<source>
	StreamDiagnosis = "FM_DIAG"      // diagnosis bundles' chunks on their way to fm_diagnosis, fm.diag.<instance>.<run>
	StreamAudit     = "FM_AUDIT"     // audit trail, fm.audit.<tenant>.<object>
)

// FM's durable consumers, whose lag says FM is behind its work.
const (
	ConsumerEvents      = "fm-server"      // the server's on FM_EVENTS, which folds every event
	ConsumerProvisioner = "fm-provisioner" // the active provisioner's on FM_PROVISION
)

// Object stores.
const (
	ObjectStoreKits      = "fm_kits"              // DSS install kits, by kit name
	ObjectStoreDiagnosis = "fm_diagnosis"         // diagnosis bundles uploaded by agents, "<instance>/<command id>.tar.gz"
	ObjectStoreSnapshots = "fm_snapshot_archives" // the local backend's snapshot archives, "<instance>/<snapshot id>.tar.zst.sealed" (".tar.gz" before)
)

// Subject prefixes. Each is followed by one or more tokens; see the Subject
// functions below.
const (
	prefixDesired   = "fm.desired."
	prefixHeartbeat = "fm.hb."
	prefixProvision = "fm.prov."
	prefixCommand   = "fm.cmd."
	prefixEvent     = "fm.evt."
	prefixLog       = "fm.log."
	prefixDiag      = "fm.diag."
	prefixAudit     = "fm.audit."
	prefixRenew     = "fm.renew."
	prefixCmdLive   = "fm.cmdlive."
	prefixCmdAfter  = "fm.cmdafter."
	// "fm.cmdfrom." was where agents asked FM for a command consumer,
	// before any release; it is not to be used again.
)

// Wildcard subjects that streams and consumers bind to.
const (
	SubjectAllDesired   = prefixDesired + "*"
	SubjectAllHeartbeat = prefixHeartbeat + "*"
	SubjectAllProvision = prefixProvision + "*.*"
	SubjectAllCommands  = prefixCommand + "*.*"
	SubjectAllEvents    = prefixEvent + "*.*"
	SubjectAllLogs      = prefixLog + "*.*"
	SubjectAllDiag      = prefixDiag + "*.*"
	SubjectAllAudit     = prefixAudit + "*.*"
	SubjectAllRenew     = prefixRenew + "*"
	SubjectAllCmdAfter  = prefixCmdAfter + "*"
)

// SubjectAttemptFailures is the core (not stored) subject on which the
// replicas of the FM server tell each other of every failed attempt at a
// credential they counted (AttemptFailure), so that their limits hold
// across replicas. It is outside "fm.>" on purpose: neither agents nor
// read-only operators, whose accounts import from "fm.>", can reach it.
const SubjectAttemptFailures = "fm-server.attempt-failures"

// OutsideJSAPIPrefix is the JetStream API prefix of the users outside FM's
// own NATS account: agents and read-only operators. Their accounts import,
// under it, the JetStream requests they may make of FM's account, and map
// the usual prefix to it (clients need no option).
const OutsideJSAPIPrefix = "$JS.fm.API"

// AgentsAccountTag tags the JWT of an agent user of the agents' account;
// one minted before agents had an account of their own lacks it.
const AgentsAccountTag = "fm-account:agents"

// RenewSubject is where an instance's agent asks for new credentials
// (core request and reply, not stored).
func RenewSubject(instance string) string { return prefixRenew + instance }

// DesiredSubject is where every change of an instance's desired state is
// republished by the fm_desired bucket.
func DesiredSubject(instance string) string { return prefixDesired + instance }

// HeartbeatSubject is the core (not stored) subject of an agent's heartbeat.
func HeartbeatSubject(instance string) string { return prefixHeartbeat + instance }

// ProvisionSubject is the FM_PROVISION subject of one machine operation.
func ProvisionSubject(instance string, action ProvisionAction) string {
	return prefixProvision + instance + "." + string(action)
}

// CommandSubject is the FM_COMMANDS subject of one command.
func CommandSubject(instance, commandID string) string {
	return prefixCommand + instance + "." + commandID
}

// CommandLiveSubject is where FM_COMMANDS republishes every command of
// an instance as it is stored, for its agent (core, not stored; the
// Nats-Sequence header holds its stream sequence).
func CommandLiveSubject(instance string) string { return prefixCmdLive + instance }

// CommandsAfterSubject is where an instance's agent asks FM for the
// commands stored after the last it handled (core request and reply, not
// stored).
func CommandsAfterSubject(instance string) string { return prefixCmdAfter + instance }

// InstanceOfCommandSubject is the instance of a command's FM_COMMANDS
// subject, "" if subject is not one.
func InstanceOfCommandSubject(subject string) string {
	rest, ok := strings.CutPrefix(subject, prefixCommand)
	if !ok {
		return ""
	}
	instance, id, ok := strings.Cut(rest, ".")
	if !ok || !ValidToken(instance) || !ValidToken(id) {
		return ""
	}
	return instance
}

// CommandFilter matches every command of one instance.
func CommandFilter(instance string) string { return prefixCommand + instance + ".*" }

// EventSubject is the FM_EVENTS subject of an event.
func EventSubject(instance string, kind EventKind) string {
	return prefixEvent + instance + "." + string(kind)
}

// Log sources: an agent ships its own log and DSS's, and nothing else.
const (
	LogSourceAgent = "agent"
	LogSourceDSS   = "dss"
)

// LogSources are every log source.
var LogSources = []string{LogSourceAgent, LogSourceDSS}

// DiagSubject is the FM_DIAG subject of one run of a collect-diagnosis
// command (run: the command id, a dash, a run id).
func DiagSubject(instance, run string) string { return prefixDiag + instance + "." + run }

// MaxEventBytes is the largest encoded event FM_EVENTS takes (with its
// headers); a larger one is refused. Senders shorten an event's output to
// fit.
const MaxEventBytes = 64 << 10

// LogSubject is the FM_LOGS subject of a log source on an instance.
func LogSubject(instance, source string) string { return prefixLog + instance + "." + source }

// AuditSubject is the FM_AUDIT subject of an audit record about one kind of
// object in a tenant.
func AuditSubject(tenant, object string) string { return prefixAudit + tenant + "." + object }

// KVSubject is the subject a put of key in bucket is published on.
func KVSubject(bucket, key string) string { return "$KV." + bucket + "." + key }

// InboxPrefix is the inbox prefix an agent connects with, so that its
// permissions can name its own inbox.
func InboxPrefix(instance string) string { return "_INBOX." + instance }

// InstanceFromSubject returns the instance token of a subject built by the
// functions above (fm.<kind>.<instance>[.<more>]), or "" if there is none.
func InstanceFromSubject(subject string) string {
	parts := strings.SplitN(subject, ".", 4)
	if len(parts) < 3 || parts[0] != "fm" {
		return ""
	}
	return parts[2]
}

// EventKindFromSubject returns the kind token of an event's subject
// (fm.evt.<instance>.<kind>), or "" if subject is not an event's.
func EventKindFromSubject(subject string) EventKind {
	parts := strings.Split(subject, ".")
	if len(parts) != 4 || !strings.HasPrefix(subject, prefixEvent) {
		return ""
	}
	return EventKind(parts[3])
}

// ValidToken reports whether s can be used as one subject token and as a KV
// key: 1 to 64 characters from [A-Za-z0-9_-]. Every id FM mints passes.
func ValidToken(s string) bool {
	if len(s) == 0 || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_':
		default:
			return false
		}
	}
	return true
}

// Where a sealed value belongs. A value sealed with an instance's key (or
// FM's secret key) is bound to its place and opens nowhere else, so the
// sealing and the opening side name the place the same way.

// SealedParamsPlace is where a command's sealed parameters belong.
func SealedParamsPlace(instance, commandID string) string {
	return "command/" + instance + "/" + commandID + "/params"
}

// SealedResultPlace is where a command's sealed result belongs.
func SealedResultPlace(instance, commandID string) string {
	return "command/" + instance + "/" + commandID + "/result"
}

// SealedLicensePlace is where the sealed DSS license of a desired state
// belongs.
func SealedLicensePlace(instance string) string { return "desired/" + instance + "/license" }

// SealedDiagnosisPlace is where a diagnosis bundle an agent sends sealed
// (DiagnosisResult.Sealed) belongs.
func SealedDiagnosisPlace(instance, commandID string) string {
	return "diagnosis/" + instance + "/" + commandID
}

// SealedJoinTokenPlace is where the sealed join token of a provision
// request belongs.
func SealedJoinTokenPlace(instance string) string { return "provision/" + instance + "/join-token" }

// SealedCloudSecretPlace is where the sealed secret access key of a
// provision request's cloud identity belongs: the tenant's cloud
// credentials, the same for every instance.
const SealedCloudSecretPlace = "provision/cloud/aws-secret-access-key"
