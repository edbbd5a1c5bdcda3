package protocol

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"path"
	"regexp"
	"strings"
	"time"
)

// DesiredState is what the server wants an instance's machine to be. It is the
// value of the instance's key in fm_desired; every change is republished on
// DesiredSubject(instance). The agent converges the machine to it and reports
// the Generation it reached in its AgentStatus.
type DesiredState struct {
	Header
	Instance string `json:"instance"`
	// Generation grows with every change; an operation that changed the desired
	// state completes when the agent reports this generation.
	Generation uint64 `json:"generation"`
	// NodeType is the DSS node type: design, automation, deployer or govern.
	NodeType string    `json:"nodeType"`
	DSS      DSSTarget `json:"dss"`
	// SetupActions are the template's actions, in order, as of the last
	// (re)provision or replay.
	SetupActions []SetupAction `json:"setupActions"`
	// HeartbeatSeconds is how often the agent sends a heartbeat.
	HeartbeatSeconds int `json:"heartbeatSeconds"`
	// MachineRequest, if set, names the machine this desired state is for:
	// the provision request that makes it. The agent of another machine (the
	// one a reprovision is replacing) leaves it alone.
	MachineRequest string `json:"machineRequest,omitempty"`
	// RetryUntil is the deadline of the operation that wrote this state: a
	// step failing in a way that passes (the bus or a download away) is
	// retried until then rather than failing the operation. Zero: an hour
	// after the agent began.
	RetryUntil time.Time `json:"retryUntil,omitzero"`
}

// DSSTarget is the DSS installation the agent converges to.
type DSSTarget struct {
	ImageID string    `json:"imageId"`
	Version string    `json:"version"`
	Kit     KitSource `json:"kit"`
	// Port is the DSS base port.
	Port int `json:"port"`
	// License is the DSS license (a JSON document as a string), if any.
	License string `json:"license,omitempty"`
	// SealedLicense, set instead of License when the agent has an instance
	// key, is the license sealed with it.
	SealedLicense string `json:"sealedLicense,omitempty"`
	// AllowDowngrade lets the agent install a version older than the one in
	// the data directory.
	AllowDowngrade bool `json:"allowDowngrade,omitempty"`
	// HTTPS, when set, has the agent serve DSS over HTTPS in front of Port.
	HTTPS *HTTPSTarget `json:"https,omitempty"`
	// AWSCredentials, when set, is the AWS key pair DSS uses (a template's
	// dataikuAwsAPIAccessMode KEYPAIR): the DSS account's default profile.
	AWSCredentials *AWSCredentials `json:"awsCredentials,omitempty"`
	// Tools are the programs the image's machines may be given by setup
	// actions (kubectl, eksctl and aws for SETUP_K8S_AND_SPARK, python3.6
	// to python3.8 for INSTALL_DEPRECATED_PYTHON), by name.
	Tools map[string]ToolSource `json:"tools,omitempty"`
}

// ToolSource is a program an image offers its machines: a file at URL
// (http, https or file) with the SHA-256 it must have. A .tar.gz or .tgz
// is unpacked, and Binary names the program in it (default: the tool's
// name at its top); another file is the program itself.
type ToolSource struct {
	URL    string `json:"url"`
	SHA256 string `json:"sha256"`
	Binary string `json:"binary,omitempty"`
}

// ValidateTools checks an image's tools: names are program names, each
// source a URL with its digest and a relative Binary inside the archive.
func ValidateTools(tools map[string]ToolSource) error {
	for name, t := range tools {
		if !reToolName.MatchString(name) {
			return fmt.Errorf("tools: %q is not a program name (a-z, 0-9, '.', '+', '-')", name)
		}
		u, err := url.Parse(t.URL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https" && u.Scheme != "file") || (u.Scheme != "file" && u.Host == "") {
			return fmt.Errorf("tools.%s.url: %q is not an http(s):// or file:// URL", name, t.URL)
		}
		if !isHexDigest(t.SHA256) {
			return fmt.Errorf("tools.%s.sha256: 64 hex characters are required", name)
		}
		if b := t.Binary; b != "" && (path.IsAbs(b) || strings.HasPrefix(path.Clean(b), "..") || path.Clean(b) == ".") {
			return fmt.Errorf("tools.%s.binary: %q must be a path inside the archive", name, b)
		}
	}
	return nil
}

// IsArchive reports whether the tool's file is an archive to unpack.
func (t ToolSource) IsArchive() bool {
	u, err := url.Parse(t.URL)
	return err == nil && (strings.HasSuffix(u.Path, ".tar.gz") || strings.HasSuffix(u.Path, ".tgz"))
}

var reToolName = regexp.MustCompile(`^[a-z][a-z0-9.+-]{0,31}$`)

// ValidAWSAccessKeyID reports whether id looks like an AWS access key id:
// 16 to 128 capital letters and digits.
func ValidAWSAccessKeyID(id string) bool {
	if len(id) < 16 || len(id) > 128 {
		return false
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; !(c >= 'A' && c <= 'Z' || c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

// ValidAWSSecret reports whether s looks like an AWS secret access key: 16
// to 128 characters of base64's alphabet. It keeps anything that would
// change the credentials file it is written into (a line break, a section)
// out of it.
func ValidAWSSecret(s string) bool {
	if len(s) < 16 || len(s) > 128 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '/' || c == '+' || c == '=') {
			return false
		}
	}
	return true
}

// validRegion reports whether s looks like an AWS region (eu-west-1).
func validRegion(s string) bool {
	if len(s) < 4 || len(s) > 32 || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-') {
			return false
		}
	}
	return true
}

// AWSCredentials is an AWS access key. SealedSecretAccessKey is set instead
// of SecretAccessKey when the agent has an instance key
// (SealedAWSSecretPlace).
type AWSCredentials struct {
	AccessKeyID           string `json:"accessKeyId"`
	SecretAccessKey       string `json:"secretAccessKey,omitempty"`
	SealedSecretAccessKey string `json:"sealedSecretAccessKey,omitempty"`
	// SecretName and SecretRegion, when set, say the secret access key is
	// kept in AWS Secrets Manager (the template's
	// dataikuAwsKeypairStorageMode AWS_SECRETS_MANAGER): the agent reads it
	// there as the machine's instance profile. AccessKeyID may then be
	// empty, the secret naming it.
	SecretName   string `json:"secretName,omitempty"`
	SecretRegion string `json:"secretRegion,omitempty"`
}

// KitSource says where a DSS install kit comes from: exactly one of a local
// path, a URL (with the SHA-256 it must have) or an fm_kits object.
type KitSource struct {
	Path   string `json:"path,omitempty"`
	URL    string `json:"url,omitempty"`
	SHA256 string `json:"sha256,omitempty"`
	Object string `json:"object,omitempty"`
}

// Validate checks that exactly one source is named and a URL has a digest.
func (k KitSource) Validate() error {
	n := 0
	for _, s := range []string{k.Path, k.URL, k.Object} {
		if s != "" {
			n++
		}
	}
	switch {
	case n != 1:
		return errors.New("kit: exactly one of path, url and object must be set")
	case k.URL != "" && !isHexDigest(k.SHA256):
		return errors.New("kit: a url needs its sha256 (64 hex characters)")
	case k.SHA256 != "" && !isHexDigest(k.SHA256):
		return errors.New("kit: sha256 must be 64 hex characters")
	}
	return nil
}

func isHexDigest(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
			return false
		}
	}
	return true
}

// SetupAction is one action of a template, as the agent receives it. Params
// is the action's parameter object, unchanged from the template.
type SetupAction struct {
	Type    SetupActionType `json:"type"`
	Params  json.RawMessage `json:"params"`
	Enabled bool            `json:"enabled"`
}

// Validate implements Message.
func (d *DesiredState) Validate() error {
	if !ValidToken(d.Instance) {
		return fmt.Errorf("instance %q is not a valid id", d.Instance)
	}
	if d.Generation == 0 {
		return errors.New("generation must be at least 1")
	}
	if d.DSS.Version == "" {
		return errors.New("dss.version is required")
	}
	if d.DSS.Port < 1 || d.DSS.Port > 65535 {
		return fmt.Errorf("dss.port %d is out of range", d.DSS.Port)
	}
	if err := d.DSS.Kit.Validate(); err != nil {
		return fmt.Errorf("dss.%w", err)
	}
	if h := d.DSS.HTTPS; h != nil {
		if err := h.Validate(); err != nil {
			return fmt.Errorf("dss.%w", err)
		}
		if h.Port == d.DSS.Port || h.HTTPPort == d.DSS.Port {
			return fmt.Errorf("dss.https: port %d is DSS's own", d.DSS.Port)
		}
	}
	if c := d.DSS.AWSCredentials; c != nil && c.SecretName != "" {
		switch {
		case c.AccessKeyID != "" && !ValidAWSAccessKeyID(c.AccessKeyID):
			return fmt.Errorf("dss.awsCredentials.accessKeyId %q is not an access key id", c.AccessKeyID)
		case c.SecretAccessKey != "" || c.SealedSecretAccessKey != "":
			return errors.New("dss.awsCredentials: a key kept in AWS Secrets Manager (secretName) travels without its secret")
		case !validRegion(c.SecretRegion):
			return fmt.Errorf("dss.awsCredentials.secretRegion %q is not an AWS region", c.SecretRegion)
		case len(c.SecretName) > 2048 || strings.ContainsAny(c.SecretName, "\x00\n"):
			return errors.New("dss.awsCredentials.secretName is not a secret's name or ARN")
		}
	} else if c != nil {
		if !ValidAWSAccessKeyID(c.AccessKeyID) {
			return fmt.Errorf("dss.awsCredentials.accessKeyId %q is not an access key id", c.AccessKeyID)
		}
		if (c.SecretAccessKey == "") == (c.SealedSecretAccessKey == "") {
			return errors.New("dss.awsCredentials: exactly one of secretAccessKey and sealedSecretAccessKey must be set")
		}
		if c.SecretAccessKey != "" && !ValidAWSSecret(c.SecretAccessKey) {
			return errors.New("dss.awsCredentials.secretAccessKey is not a secret access key")
		}
	}
	for i, a := range d.SetupActions {
		if a.Type == "" {
			return fmt.Errorf("setupActions[%d]: type is required", i)
		}
	}
	if d.HeartbeatSeconds < 0 {
		return errors.New("heartbeatSeconds must not be negative")
	}
	return nil
}

// CommandKind names what a Command asks an agent to do.
type CommandKind string

// The commands an agent carries out.
const (
	CommandRestartDSS         CommandKind = "restart-dss"
	CommandStopDSS            CommandKind = "stop-dss"
	CommandStartDSS           CommandKind = "start-dss"
	CommandReplaySetupActions CommandKind = "replay-setup-actions"
	CommandResetUserPassword  CommandKind = "reset-user-password"
	CommandGetInitialPassword CommandKind = "get-initial-password"
	CommandCollectDiagnosis   CommandKind = "collect-diagnosis"
	CommandGetAdminAPIKey     CommandKind = "get-admin-api-key"
	// CommandGrowFilesystem grows the data volume's file system to the
	// volume's new size (GrowFilesystemParams).
	CommandGrowFilesystem CommandKind = "grow-filesystem"
	// CommandUpgradeAgent replaces the agent's binary with the one FM
	// serves (UpgradeAgentParams) and restarts the agent on it; the new
	// agent answers. One that does not report in time is rolled back.
	CommandUpgradeAgent CommandKind = "upgrade-agent"
)

// CommandKinds lists every command kind.
var CommandKinds = []CommandKind{
	CommandRestartDSS, CommandStopDSS, CommandStartDSS, CommandReplaySetupActions,
	CommandResetUserPassword, CommandGetInitialPassword, CommandCollectDiagnosis, CommandGetAdminAPIKey,
	CommandGrowFilesystem, CommandUpgradeAgent,
}

// Known reports whether k is one of CommandKinds.
func (k CommandKind) Known() bool {
	for _, c := range CommandKinds {
		if c == k {
			return true
		}
	}
	return false
}

// Command is an imperative for one agent, published on
// CommandSubject(Instance, ID) in FM_COMMANDS with ID as Nats-Msg-Id. The agent
// answers with an Event of kind EventCommand carrying the same CommandID.
type Command struct {
	Header
	ID       string      `json:"id"`
	Instance string      `json:"instance"`
	Kind     CommandKind `json:"kind"`
	// OpID is the operation (future) the command belongs to, if any.
	OpID   string    `json:"opId,omitempty"`
	Issued time.Time `json:"issued"`
	// CallID is the id of the REST call that caused the command (its
	// X-Request-Id), for the logs.
	CallID string `json:"callId,omitempty"`
	// Expires, if set, is when the command stops being worth running: an
	// agent that gets it later answers with an error instead.
	Expires time.Time       `json:"expires,omitzero"`
	Params  json.RawMessage `json:"params,omitempty"`
	// SealedParams, set instead of Params when they hold a secret (a
	// password), are the params sealed with the instance key.
	SealedParams string `json:"sealedParams,omitempty"`
}

// GrowFilesystemParams are the Params of CommandGrowFilesystem.
type GrowFilesystemParams struct {
	// SizeBytes is the data volume's new size.
	SizeBytes uint64 `json:"sizeBytes"`
}

// UpgradeAgentParams are the Params of CommandUpgradeAgent: the binary
// FM serves (server.DownloadPath), its digest, and how long the new agent
// has to report before the machine goes back to the old one.
type UpgradeAgentParams struct {
	URL    string `json:"url"`
	SHA256 string `json:"sha256"`
	// ReportWithinSeconds bounds the new agent's first run: if it has not
	// answered the command by then, the previous binary is put back.
	ReportWithinSeconds int `json:"reportWithinSeconds"`
}

// ResetUserPasswordParams are the Params of CommandResetUserPassword.
type ResetUserPasswordParams struct {
	UserName string `json:"userName"`
	Password string `json:"password"`
}

// Validate implements Message. It does not check the kind: an agent answers
// an unknown kind with an error result rather than dropping it.
func (c *Command) Validate() error {
	switch {
	case !ValidToken(c.ID):
		return fmt.Errorf("id %q is not a valid id", c.ID)
	case !ValidToken(c.Instance):
		return fmt.Errorf("instance %q is not a valid id", c.Instance)
	case c.Kind == "":
		return errors.New("kind is required")
	}
	return nil
}

// EventKind is the last token of an event's subject.
type EventKind string

// The kinds of event.
const (
	// EventStep is progress of the agent's startup sequence or of a machine
	// operation: one step started, succeeded, failed or was skipped.
	EventStep EventKind = "step"
	// EventCommand is the result of a Command.
	EventCommand EventKind = "command"
	// EventMachine is the result of a provision request.
	EventMachine EventKind = "machine"
	// EventAlert is a condition an operator should know about: DSS stopped
	// answering, the data volume is filling up.
	EventAlert EventKind = "alert"
	// EventRejected says a message was refused as malformed.
	EventRejected EventKind = "rejected"
	// EventSnapshot is the outcome of a snapshot taken or deleted by the
	// provisioner (Step "snapshot" or "delete-snapshot"); Snapshot says
	// which, and where it is kept.
	EventSnapshot EventKind = "snapshot"
)

// AgentEventKinds are the kinds an agent publishes; NATS refuses it any
// other (EventMachine and EventSnapshot are the provisioner's alone).
var AgentEventKinds = []EventKind{EventStep, EventCommand, EventAlert, EventRejected}

// The sources of an event.
const (
	SourceAgent       = "agent"
	SourceProvisioner = "provisioner"
)

// TrustedSource is who may have published an event of kind k: an event's
// own Source field is only believed where both may publish the kind.
// It returns "" for such a kind.
func (k EventKind) TrustedSource() string {
	switch k {
	case EventMachine, EventSnapshot:
		return SourceProvisioner
	case EventStep, EventCommand:
		return SourceAgent
	}
	return ""
}

// Status is the outcome carried by an event.
type Status string

// The statuses.
const (
	StatusStarted     Status = "started"
	StatusOK          Status = "ok"
	StatusFailed      Status = "failed"
	StatusSkipped     Status = "skipped"
	StatusUnsupported Status = "unsupported"
	// StatusRetrying says a step failed in a way that may pass (the bus, a
	// download server or the cloud away) and will be tried again; Message
	// says why and when.
	StatusRetrying Status = "retrying"
	// StatusProgress says how far a long step under way got (a kit's
	// download: Message); the operation keeps the last one of a step in
	// place of the one before.
	StatusProgress Status = "progress"
)

// Event reports progress or a result, published on EventSubject(Instance,
// Kind) in FM_EVENTS with ID as Nats-Msg-Id.
type Event struct {
	Header
	ID       string    `json:"id"`
	Instance string    `json:"instance"`
	Kind     EventKind `json:"kind"`
	Time     time.Time `json:"time"`
	// Source is the role that sent it: "agent" or "provisioner".
	Source     string `json:"source"`
	Generation uint64 `json:"generation,omitempty"`
	// OpID is the operation the event belongs to: a command's result, the
	// steps of the work a command asked for (replay-setup-actions), a
	// snapshot's steps.
	OpID      string `json:"opId,omitempty"`
	CommandID string `json:"commandId,omitempty"`
	// Step names what the event is about, e.g. "install", "setup-action[2]",
	// "dss-unresponsive".
	Step    string `json:"step,omitempty"`
	Status  Status `json:"status"`
	Message string `json:"message,omitempty"`
	// Output is the tail of a failed step's output.
	Output string `json:"output,omitempty"`
	Error  *Error `json:"error,omitempty"`
	// Result is a command's result object, if it has one.
	Result json.RawMessage `json:"result,omitempty"`
	// SealedResult, set instead of Result when it holds a secret (a
	// password, an API key), is the result sealed with the instance key.
	SealedResult string `json:"sealedResult,omitempty"`
	// Snapshot is the snapshot an EventSnapshot is about.
	Snapshot *SnapshotRef `json:"snapshot,omitempty"`
}

// Validate implements Message.
func (e *Event) Validate() error {
	switch {
	case !ValidToken(e.ID):
		return fmt.Errorf("id %q is not a valid id", e.ID)
	case !ValidToken(e.Instance):
		return fmt.Errorf("instance %q is not a valid id", e.Instance)
	case !ValidToken(string(e.Kind)):
		return fmt.Errorf("kind %q is not a valid token", e.Kind)
	case e.Status == "":
		return errors.New("status is required")
	case e.Status == StatusFailed && e.Error == nil:
		return errors.New("a failed event needs an error")
	case e.Snapshot != nil && !ValidToken(e.Snapshot.ID):
		return fmt.Errorf("snapshot id %q is not a valid id", e.Snapshot.ID)
	case e.OpID != "" && !ValidToken(e.OpID):
		return fmt.Errorf("operation id %q is not a valid id", e.OpID)
	case e.CommandID != "" && !ValidToken(e.CommandID):
		return fmt.Errorf("command id %q is not a valid id", e.CommandID)
	}
	return nil
}

// DSSState is what an agent sees of DSS.
type DSSState string

// The DSS states.
const (
	DSSAbsent       DSSState = "absent"       // not installed in the data directory
	DSSInstalling   DSSState = "installing"   // being installed or upgraded
	DSSStopped      DSSState = "stopped"      // installed, not running
	DSSStarting     DSSState = "starting"     // started, not answering yet
	DSSRunning      DSSState = "running"      // answering on its base port
	DSSUnresponsive DSSState = "unresponsive" // running but not answering
)

// Heartbeat is an agent's light liveness signal, published on the core subject
// HeartbeatSubject(Instance) every DesiredState.HeartbeatSeconds.
type Heartbeat struct {
	Header
	Instance     string    `json:"instance"`
	Seq          uint64    `json:"seq"`
	Time         time.Time `json:"time"`
	Generation   uint64    `json:"generation"`
	DSS          DSSState  `json:"dss"`
	AgentVersion string    `json:"agentVersion"`
	// Machine is the agent's last measurement of its machine, whole: the
	// status (AgentStatus.Machine) keeps only what changes seldom, so that
	// it is rewritten on a change, not on every measurement.
	Machine *MachineFacts `json:"machine,omitempty"`
	// EverySeconds is the interval the agent beats at (its desired state's
	// HeartbeatSeconds, which FM may have changed since): FM judges its
	// silence by it.
	EverySeconds int `json:"everySeconds,omitempty"`
}

// Validate implements Message.
func (h *Heartbeat) Validate() error {
	if !ValidToken(h.Instance) {
		return fmt.Errorf("instance %q is not a valid id", h.Instance)
	}
	return nil
}

// AgentPhase is where an agent stands with its desired state.
type AgentPhase string

// The phases.
const (
	PhaseConverging AgentPhase = "converging" // working towards the desired generation
	PhaseReady      AgentPhase = "ready"      // the desired generation is reached
	PhaseFailed     AgentPhase = "failed"     // a step failed; Error says which and why
)

// AgentStatus is an agent's full report, the value of its key in fm_agents,
// written when something in it changes.
type AgentStatus struct {
	Header
	Instance string `json:"instance"`
	// MachineRequest names the agent's machine: the provision request that
	// made it.
	MachineRequest string    `json:"machineRequest,omitempty"`
	Time           time.Time `json:"time"`
	AgentVersion   string    `json:"agentVersion"`
	// AgentSHA256 is the digest of the agent's binary: FM tells by it
	// whether the agent runs the binary it serves.
	AgentSHA256 string `json:"agentSha256,omitempty"`
	// Generation is the last desired generation the agent fully reached;
	// Target is the one it is working on (equal when Phase is ready).
	Generation uint64       `json:"generation"`
	Target     uint64       `json:"target"`
	Phase      AgentPhase   `json:"phase"`
	Step       string       `json:"step,omitempty"`
	Error      *Error       `json:"error,omitempty"`
	DSS        DSSStatus    `json:"dss"`
	Machine    MachineFacts `json:"machine"`
}

// DSSStatus is what the agent knows of DSS.
type DSSStatus struct {
	State    DSSState `json:"state"`
	Version  string   `json:"version,omitempty"`
	NodeType string   `json:"nodeType,omitempty"`
	Port     int      `json:"port,omitempty"`
	// HTTPS is the agent's HTTPS front, when the desired state asks for one.
	HTTPS *HTTPSStatus `json:"https,omitempty"`
}

// MachineFacts are the agent's measurements of its machine.
type MachineFacts struct {
	DataVolumeBytes     uint64  `json:"dataVolumeBytes"`
	DataVolumeUsedBytes uint64  `json:"dataVolumeUsedBytes"`
	Load1               float64 `json:"load1"`
	MemTotalBytes       uint64  `json:"memTotalBytes"`
	MemAvailableBytes   uint64  `json:"memAvailableBytes"`
	UptimeSeconds       int64   `json:"uptimeSeconds"`
}

// Validate implements Message.
func (s *AgentStatus) Validate() error {
	if !ValidToken(s.Instance) {
		return fmt.Errorf("instance %q is not a valid id", s.Instance)
	}
	switch s.Phase {
	case PhaseConverging, PhaseReady, PhaseFailed:
	default:
		return fmt.Errorf("phase %q is unknown", s.Phase)
	}
	if s.Phase == PhaseFailed && s.Error == nil {
		return errors.New("a failed phase needs an error")
	}
	return nil
}

// Results of commands, carried in Event.Result.

// InitialPasswordResult is the result of CommandGetInitialPassword.
type InitialPasswordResult struct {
	UserName string `json:"userName"`
	Password string `json:"password"`
}

// AdminAPIKeyResult is the result of CommandGetAdminAPIKey.
type AdminAPIKeyResult struct {
	AdminAPIKey string `json:"adminAPIKey"`
}

// DiagnosisResult is the result of CommandCollectDiagnosis. The agent sends
// the bundle (a .tar.gz) in Chunks messages on Subject, a subject of its
// own in FM_DIAG; the server joins them into the fm_diagnosis object
// Object. When Sealed, what the chunks carry is the bundle sealed as a
// stream with the instance key at SealedDiagnosisPlace (an agent with an
// instance key seals it: logs and DSS's settings may hold secrets), and
// SizeBytes and SHA256 are those of the sealed bytes.
type DiagnosisResult struct {
	Subject   string `json:"subject,omitempty"`
	Chunks    int    `json:"chunks,omitempty"`
	Object    string `json:"object,omitempty"`
	SizeBytes int64  `json:"sizeBytes"`
	SHA256    string `json:"sha256"`
	Sealed    bool   `json:"sealed,omitempty"`
}

// AuditRecord is one entry of the audit trail, published on
// AuditSubject(Tenant, Object) in FM_AUDIT (which denies deleting and
// purging): who did what, when, from where, and how it ended. It never holds
// a secret.
type AuditRecord struct {
	Header
	ID     string    `json:"id"`
	Time   time.Time `json:"time"`
	Tenant string    `json:"tenant"`
	// Who is the caller: "key:<api key id>", "instance:<id>" for an agent
	// joining, or "fm" for the server itself.
	Who  string `json:"who"`
	Role string `json:"role,omitempty"`
	// From is the caller's network address, if any.
	From string `json:"from,omitempty"`
	// Action is what was asked: "<METHOD> <path>" for a REST call, or a
	// credential event ("credentials.minted", "join.refused", …).
	Action   string `json:"action"`
	Object   string `json:"object"`
	ObjectID string `json:"objectId,omitempty"`
	// Outcome is ok, failed (the request was valid but did not succeed) or
	// refused (unauthenticated, forbidden or rejected).
	Outcome string `json:"outcome"`
	Status  int    `json:"status,omitempty"`
	Error   *Error `json:"error,omitempty"`
	// CallID is the id of the REST call (its X-Request-Id), if any.
	CallID string `json:"callId,omitempty"`
}

// Validate implements Message.
func (a *AuditRecord) Validate() error {
	switch {
	case !ValidToken(a.ID):
		return fmt.Errorf("id %q is not a valid id", a.ID)
	case !ValidToken(a.Tenant), !ValidToken(a.Object):
		return fmt.Errorf("tenant %q and object %q must be valid tokens", a.Tenant, a.Object)
	case a.Who == "" || a.Action == "":
		return errors.New("who and action are required")
	}
	switch a.Outcome {
	case "ok", "failed", "refused":
	default:
		return fmt.Errorf("outcome %q is not ok, failed or refused", a.Outcome)
	}
	return nil
}

// AttemptFailure is a failed attempt at a credential that one replica of the
// FM server counted, sent to the others on SubjectAttemptFailures so that
// they count it too.
type AttemptFailure struct {
	Header
	// Replica is the sender's id: a replica ignores its own.
	Replica string `json:"replica"`
	// Limiter names the count: "api-by-addr", "api-by-key", "join-by-addr".
	Limiter string `json:"limiter"`
	// Key is what the limiter counts under: a client address, or a digest
	// of a key id (never a secret).
	Key []byte    `json:"key"`
	At  time.Time `json:"at"`
}

// Validate implements Message.
func (f *AttemptFailure) Validate() error {
	switch {
	case !ValidToken(f.Replica) || !ValidToken(f.Limiter):
		return fmt.Errorf("replica %q and limiter %q must be valid tokens", f.Replica, f.Limiter)
	case len(f.Key) == 0 || len(f.Key) > 256:
		return fmt.Errorf("key: %d bytes, want 1 to 256", len(f.Key))
	case f.At.IsZero():
		return errors.New("at is required")
	}
	return nil
}
