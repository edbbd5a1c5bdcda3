// Package api defines the JSON objects of FM's REST API: the shapes that
// Dataiku's Fleet Manager clients (dataikuapi, the Ansible inventory plugin)
// send and read, exactly as docs/api.md and the Dataiku contract spell them,
// plus FM's own additions. It holds types and constants only: the server
// validates and normalises them, the client and the CLI send and print them.
//
// It imports only the standard library and protocol; server, client and cli
// import it.
package api

import (
	"encoding/json"
	"strings"
	"time"
)

// BasePath is the prefix of every tenant-scoped endpoint.
const BasePath = "/api/public/tenants/"

// DefaultTenant is the only tenant FM has.
const DefaultTenant = "main"

// Error is the body of every error response. Dataiku's client raises
// DataikuException("<errorType>: <detailedMessage>").
type Error struct {
	ErrorType       string `json:"errorType"`
	Message         string `json:"message"`
	DetailedMessage string `json:"detailedMessage"`
}

func (e *Error) Error() string {
	if e.DetailedMessage != "" {
		return e.ErrorType + ": " + e.DetailedMessage
	}
	return e.ErrorType + ": " + e.Message
}

// Meta are the server-owned fields every stored object carries. Clients echo
// them back on PUT; the server ignores them there, except Revision: a PUT
// that carries a revision is applied only if the object is still at that
// revision, so that a save based on a stale read is refused instead of
// silently undoing someone else's change.
type Meta struct {
	Revision  uint64    `json:"revision,omitempty"`
	CreatedAt time.Time `json:"createdAt"`
	UpdatedAt time.Time `json:"updatedAt"`
	// Deleting is set while a deletion checks that nothing uses the object;
	// nothing new may start using it meanwhile.
	Deleting bool `json:"deleting,omitempty"`
}

// Enumerations of the Dataiku contract. The values are exact on the wire.
const (
	ModeExistingMonotenant = "EXISTING_MONOTENANT"

	InternetAccessYes        = "YES"
	InternetAccessNo         = "NO"
	InternetAccessEgressOnly = "EGRESS_ONLY"

	DNSNone                      = "NONE"
	DNSVNSpecificCloudDNS        = "VN_SPECIFIC_CLOUD_DNS_SERVICE"
	HTTPSNone                    = "NONE"
	HTTPSSelfSigned              = "SELF_SIGNED"
	HTTPSCustomCertificate       = "CUSTOM_CERTIFICATE"
	HTTPSLetsEncrypt             = "LETSENCRYPT"
	HTTPDisable                  = "DISABLE"
	HTTPRedirect                 = "REDIRECT"
	DeployerNoManaged            = "NO_MANAGED_DEPLOYER"
	DeployerCentral              = "CENTRAL_DEPLOYER"
	DeployerEachDesignNode       = "EACH_DESIGN_NODE"
	NodeDesign                   = "design"
	NodeAutomation               = "automation"
	NodeDeployer                 = "deployer"
	NodeGovern                   = "govern"
	EncryptionNone               = "NONE"
	EncryptionDefaultKey         = "DEFAULT_KEY"
	EncryptionTenant             = "TENANT"
	EncryptionCustom             = "CUSTOM"
	AWSAPIAccessNone             = "NONE"
	AWSAPIAccessKeypair          = "KEYPAIR"
	KeypairStorageNone           = "NONE"
	KeypairStorageInline         = "INLINE_ENCRYPTED"
	KeypairStorageSecretsManager = "AWS_SECRETS_MANAGER"
	AWSAuthSameAsFM              = "SAME_AS_FM"
	AWSAuthDefaultInstance       = "DEFAULT_INSTANCE_CREDENTIALS" // a cloud account's "the provisioner's own"
	AWSAuthIAMRole               = "IAM_ROLE"
	AWSAuthKeypair               = "KEYPAIR"
	LicenseStatic                = "STATIC"
	LicenseAutoUpdate            = "AUTO_UPDATE"
)

// VirtualNetwork is the network context of instances.
type VirtualNetwork struct {
	ID                 string `json:"id"`
	Label              string `json:"label"`
	Mode               string `json:"mode"`
	InternetAccessMode string `json:"internetAccessMode"`
	AccountID          string `json:"accountId"`
	AutoCreatePeerings bool   `json:"autoCreatePeerings"`

	AWSVpcID                    string   `json:"awsVpcId"`
	AWSSubnetID                 string   `json:"awsSubnetId"`
	AWSSecondSubnetID           string   `json:"awsSecondSubnetId"`
	AWSRegion                   string   `json:"awsRegion"`
	AWSAutoCreateSecurityGroups *bool    `json:"awsAutoCreateSecurityGroups"`
	AWSSecurityGroups           []string `json:"awsSecurityGroups"`
	AWSAssignPublicIP           *bool    `json:"awsAssignPublicIP"`

	DNSStrategy                string `json:"dnsStrategy"`
	AWSRoute53PrivateIPZone    string `json:"awsRoute53PrivateIPZoneId"`
	AWSRoute53PublicIPZone     string `json:"awsRoute53PublicIPZoneId"`
	HTTPSStrategy              string `json:"httpsStrategy"`
	HTTPStrategy               string `json:"httpStrategy"`
	ContactMail                string `json:"contactMail"`
	ManagedNodesDirectory      bool   `json:"managedNodesDirectory"`
	EventServerNodeLabel       string `json:"eventServerNodeLabel"`
	NodesDirectoryDeployerMode string `json:"nodesDirectoryDeployerMode"`
	GovernServerNodeLabel      string `json:"governServerNodeLabel"`

	// CloudTags are added to the cloud resources of the network's instances,
	// after the tenant's and before the instance's own (FM addition).
	CloudTags map[string]string `json:"cloudTags"`

	Meta
}

// SetupAction is one action of a template. Params is stored unchanged.
type SetupAction struct {
	Type    string          `json:"type"`
	Params  json.RawMessage `json:"params"`
	Enabled *bool           `json:"enabled"`
}

// InstanceSettingsTemplate is a reusable set of instance settings.
type InstanceSettingsTemplate struct {
	ID           string        `json:"id"`
	Label        string        `json:"label"`
	SetupActions []SetupAction `json:"setupActions"`
	// License is a DSS license: a JSON document in a string.
	License string `json:"license"`

	AWSKeyPairName                  string `json:"awsKeyPairName"`
	StartupInstanceProfileArn       string `json:"startupInstanceProfileArn"`
	RuntimeInstanceProfileArn       string `json:"runtimeInstanceProfileArn"`
	RestrictAWSMetadataServerAccess *bool  `json:"restrictAwsMetadataServerAccess"`
	DataikuAWSAPIAccessMode         string `json:"dataikuAwsAPIAccessMode"`
	DataikuAWSKeypairStorageMode    string `json:"dataikuAwsKeypairStorageMode"`
	DataikuAWSAccessKeyID           string `json:"dataikuAwsAccessKeyId"`
	// DataikuAWSSecretAccessKey is write-only: never returned; a PUT without
	// it keeps the stored one.
	DataikuAWSSecretAccessKey           string `json:"dataikuAwsSecretAccessKey,omitempty"`
	DataikuAWSSecretAccessKeySecretName string `json:"dataikuAwsSecretAccessKeyAwsSecretName"`
	AWSSecretsManagerRegion             string `json:"awsSecretsManagerRegion"`

	Meta
}

// Instance is one DSS node.
type Instance struct {
	ID          string `json:"id"`
	Label       string `json:"label"`
	Description string `json:"description"`

	InstanceSettingsTemplateID    string `json:"instanceSettingsTemplateId"`
	InstanceSettingsTemplateLabel string `json:"instanceSettingsTemplateLabel"`
	VirtualNetworkID              string `json:"virtualNetworkId"`
	VirtualNetworkLabel           string `json:"virtualNetworkLabel"`
	ImageID                       string `json:"imageId"`
	DSSNodeType                   string `json:"dssNodeType"`
	CloudInstanceType             string `json:"cloudInstanceType"`

	DataVolumeType      string `json:"dataVolumeType"`
	DataVolumeSizeGB    *int   `json:"dataVolumeSizeGB"`
	DataVolumeSizeMaxGB *int   `json:"dataVolumeSizeMaxGB"`
	DataVolumeIOPS      *int   `json:"dataVolumeIOPS"`
	// DataVolumeThroughput is FM's: a gp3 data volume's throughput in
	// MiB/s (125 to 1000, at most a quarter of its IOPS).
	DataVolumeThroughput *int   `json:"dataVolumeThroughput,omitempty"`
	VolumesEncryption    string `json:"volumesEncryption"`
	VolumesEncryptionKey string `json:"volumesEncryptionKey"`
	AWSRootVolumeSizeGB  *int   `json:"awsRootVolumeSizeGB"`
	AWSRootVolumeType    string `json:"awsRootVolumeType"`
	AWSRootVolumeIOPS    *int   `json:"awsRootVolumeIOPS"`

	CloudTags map[string]string `json:"cloudTags"`
	FMTags    []string          `json:"fmTags"`

	EnableAutomatedSnapshot    bool   `json:"enableAutomatedSnapshot"`
	AutomatedSnapshotPeriod    *int   `json:"automatedSnapshotPeriod"`
	AutomatedSnapshotRetention *int   `json:"automatedSnapshotRetention"`
	SSLCertificatePEM          string `json:"sslCertificatePEM"`
	AWSAssignElasticIP         bool   `json:"awsAssignElasticIP"`
	AWSElasticIPAllocationID   string `json:"awsElasticIPAllocationId"`

	Meta
}

// Kit says where the local backend gets an image's DSS install kit: exactly
// one of a path on the provisioner's machine, a URL with its SHA-256, or an
// object in the fm_kits store.
type Kit struct {
	Path   string `json:"path,omitempty"`
	URL    string `json:"url,omitempty"`
	SHA256 string `json:"sha256,omitempty"`
	Object string `json:"object,omitempty"`
}

// Image is a DSS version this FM can deploy.
type Image struct {
	ID         string `json:"id"`
	Label      string `json:"label"`
	DSSVersion string `json:"dssVersion"`
	Kit        *Kit   `json:"kit,omitempty"`
	// AMIs maps an AWS region to the AMI the EC2 backend boots.
	AMIs map[string]string `json:"amis,omitempty"`
	// Tools are programs setup actions install on the image's machines,
	// by name (kubectl, eksctl, aws, python3.6, …): docs/setup-actions.md.
	Tools map[string]Tool `json:"tools,omitempty"`
	Meta
}

// Tool is a program an image offers its machines: a file at URL with its
// SHA-256, or a .tar.gz holding it (Binary: its path inside).
type Tool struct {
	URL    string `json:"url"`
	SHA256 string `json:"sha256"`
	Binary string `json:"binary,omitempty"`
}

// Snapshot is a snapshot of an instance's data volume.
type Snapshot struct {
	ID         string `json:"id"`
	InstanceID string `json:"instanceId"`
	Reason     string `json:"reasonForSnapshot"`
	Automated  bool   `json:"automated"`
	// State is one of the Snapshot* states.
	State      string `json:"state"`
	DSSVersion string `json:"dssVersion"`
	ImageID    string `json:"imageId"`
	// VolumeSizeGB is the size of the data volume it was taken of.
	VolumeSizeGB int   `json:"volumeSizeGB,omitempty"`
	SizeBytes    int64 `json:"sizeBytes"`
	// SHA256 is the digest of an archive (local backend); a restore checks
	// it.
	SHA256 string `json:"sha256,omitempty"`
	// Store says where the snapshot is kept ("object-store", "s3", "ebs")
	// and StoreRef under what name (an object name, an S3 key, an EBS
	// snapshot id); Region is a cloud snapshot's region.
	Store    string `json:"store,omitempty"`
	StoreRef string `json:"storeRef,omitempty"`
	Region   string `json:"region,omitempty"`
	// VirtualNetworkID is the instance's network when the snapshot was
	// taken (FM's own): whose cloud identity keeps it, after the instance
	// is gone.
	VirtualNetworkID string `json:"virtualNetworkId,omitempty"`
	// FutureID is the operation that takes (or deletes) it.
	FutureID  string    `json:"futureId,omitempty"`
	Error     *Error    `json:"error,omitempty"`
	CreatedAt time.Time `json:"createdAt"`
}

// Snapshot states.
const (
	SnapshotCreating  = "CREATING"
	SnapshotAvailable = "AVAILABLE"
	SnapshotFailed    = "FAILED"
	SnapshotDeleting  = "DELETING"
)

// CloudCredentials is how FM authenticates to the cloud, plus the tenant's
// license and secrets encryption key.
type CloudCredentials struct {
	AWSAuthenticationMode string `json:"awsAuthenticationMode"`
	AWSIAMRoleARN         string `json:"awsIAMRoleARN"`
	AWSAccessKeyID        string `json:"awsAccessKeyId"`
	// AWSSecretAccessKey is write-only: never returned; a PUT without it
	// keeps the stored one.
	AWSSecretAccessKey string `json:"awsSecretAccessKey,omitempty"`
	AWSCMKID           string `json:"awsCMKId"`
	LicenseMode        string `json:"licenseMode"`
	License            string `json:"license"`
	// LicenseToken is write-only, like AWSSecretAccessKey.
	LicenseToken string    `json:"licenseToken,omitempty"`
	UpdatedAt    time.Time `json:"updatedAt"`
}

// CloudTagsResponse is the body of GET /cloud-tags: the tag map serialised as
// a JSON string in "msg", as Dataiku's client expects.
type CloudTagsResponse struct {
	Msg string `json:"msg"`
}

// Future is a long-running operation as the Dataiku client polls it: it reads
// jobId, hasResult and result. The other fields are FM's own.
type Future struct {
	JobID     string          `json:"jobId"`
	HasResult bool            `json:"hasResult"`
	Alive     bool            `json:"alive"`
	Aborted   bool            `json:"aborted"`
	Progress  Progress        `json:"progress"`
	Result    json.RawMessage `json:"result"`

	Kind       string     `json:"kind"`
	TargetKind string     `json:"targetKind"`
	TargetID   string     `json:"targetId"`
	State      string     `json:"state"`
	Error      *Error     `json:"error,omitempty"`
	StartedBy  string     `json:"startedBy,omitempty"`
	StartedAt  time.Time  `json:"startedAt"`
	EndedAt    *time.Time `json:"endedAt,omitempty"`
}

// Progress lists the steps an operation went through.
type Progress struct {
	Steps []ProgressStep `json:"steps"`
}

// ProgressStep is one step of an operation.
type ProgressStep struct {
	Name    string    `json:"name"`
	Status  string    `json:"status"`
	Message string    `json:"message,omitempty"`
	Time    time.Time `json:"time"`
}

// The states of an operation.
const (
	OpRunning   = "running"
	OpSucceeded = "succeeded"
	OpFailed    = "failed"
	OpAborted   = "aborted"
)

// Bool returns a pointer to b, for the optional booleans above.
func Bool(b bool) *bool { return &b }

// Int returns a pointer to n, for the optional numbers above.
func Int(n int) *int { return &n }

// Fleet is GET /fleet (FM's own): the fleet at a glance, as `fm status`
// sums it up and `fm instance list` shows each instance. Instances is
// null when the rows were not asked for (rows=false).
type Fleet struct {
	Summary   FleetSummary `json:"summary"`
	Instances []FleetRow   `json:"instances"`
}

// FleetSummary counts every instance /instances' filters keep.
type FleetSummary struct {
	Instances    int            `json:"instances"`
	ByState      map[string]int `json:"byState"`
	ByNodeType   map[string]int `json:"byNodeType"`
	ByDSSVersion map[string]int `json:"byDSSVersion"`
	// AgentsNotResponding counts running instances, no operation under
	// way, whose agent missed three heartbeats; DSSDown those whose agent
	// answers and DSS does not (the alerts' conditions).
	AgentsNotResponding int `json:"agentsNotResponding"`
	DSSDown             int `json:"dssDown"`
	// VolumesAbove80Percent counts data volumes more than 80% full.
	VolumesAbove80Percent int `json:"volumesAbove80Percent"`
	OperationsRunning     int `json:"operationsRunning"`
	// FailedInstances are in state failed (their last operation failed).
	FailedInstances int `json:"failedInstances"`
	// Snapshot health of the instances with automated snapshots (the
	// alerts' conditions): the last success older than 1.5 periods, none
	// ever taken; and of every instance, the last snapshot failed.
	SnapshotsOverdue    int `json:"snapshotsOverdue"`
	SnapshotsNeverTaken int `json:"snapshotsNeverTaken"`
	SnapshotsFailed     int `json:"snapshotsFailed"`
}

// FleetRow is one instance's state, as its status says it. DSSState and
// DSSVersion are what its agent reported, "(invalid)" unless plain.
type FleetRow struct {
	ID              string        `json:"id"`
	Label           string        `json:"label"`
	State           string        `json:"state"`
	DSSState        string        `json:"dssState,omitempty"`
	DSSVersion      string        `json:"dssVersion,omitempty"`
	PublicURL       string        `json:"publicURL,omitempty"`
	AgentResponding bool          `json:"agentResponding"`
	LastSeen        *time.Time    `json:"lastSeen,omitempty"`
	VolumeUsedRatio *float64      `json:"volumeUsedRatio,omitempty"`
	Operation       *OperationRef `json:"operation,omitempty"`
}

// OperationRef names the operation an instance is busy with (or last was).
type OperationRef struct {
	JobID string `json:"jobId"`
	Kind  string `json:"kind"`
	State string `json:"state"`
}

// Logs is GET /instances/{id}/logs (FM's own): what the instance's agent
// shipped to FM_LOGS, oldest first. Next is the sequence to ask after to
// read on: the last entry's, or, when there is none, where the stream
// stood when the call began (nothing after it is missed). More says the
// page stopped before the end (its size, or the call's time).
type Logs struct {
	Entries []LogEntry `json:"entries"`
	Next    uint64     `json:"next"`
	More    bool       `json:"more"`
}

// LogEntry is one message of an instance's logs: lines of one source.
type LogEntry struct {
	Seq    uint64    `json:"seq"`
	Time   time.Time `json:"time"`
	Source string    `json:"source"`
	Text   string    `json:"text"`
}

// AlertSettings is GET and PUT /alerting (FM's own): where FM sends the
// alerts it raises. WebhookURL "" sends none (they are still listed by
// GET /alerts). WebhookSecret is write-only: when set, each request
// carries X-FM-Signature: sha256=<HMAC-SHA256 of the body with it>; a save
// without it keeps the one stored, and ClearWebhookSecret drops it.
type AlertSettings struct {
	WebhookURL         string    `json:"webhookURL"`
	WebhookSecret      string    `json:"webhookSecret,omitempty"`
	HasWebhookSecret   bool      `json:"hasWebhookSecret"`
	ClearWebhookSecret bool      `json:"clearWebhookSecret,omitempty"`
	UpdatedAt          time.Time `json:"updatedAt,omitzero"`
}

// Alert is one alert FM raised, as GET /alerts lists it: its name and
// labels are those of the Prometheus rule of the same name
// (deploy/prometheus/rules/fm.rules.yml). Status is AlertFiring or
// AlertResolved; Notified says the webhook (if any) was told of it.
type Alert struct {
	Fingerprint string            `json:"fingerprint"`
	Name        string            `json:"name"`
	Status      string            `json:"status"`
	Labels      map[string]string `json:"labels"`
	Annotations map[string]string `json:"annotations"`
	StartsAt    time.Time         `json:"startsAt"`
	EndsAt      time.Time         `json:"endsAt,omitzero"`
	Notified    bool              `json:"notified"`
	// Attempts and LastError are the webhook's, while it is not told;
	// GaveUp says FM stopped trying (Config.AlertGiveUpAfter).
	Attempts  int    `json:"attempts,omitempty"`
	LastError string `json:"lastError,omitempty"`
	GaveUp    bool   `json:"gaveUp,omitempty"`
}

// Alert statuses, as Alertmanager's webhook payload spells them.
const (
	AlertFiring   = "firing"
	AlertResolved = "resolved"
)

// Diagnosis is one diagnosis bundle of an instance, as GET
// /instances/{id}/diagnoses lists them (FM's own): Name is
// "<command id>.tar.gz", downloaded from GET /instances/{id}/diagnoses/{name}.
type Diagnosis struct {
	Name      string    `json:"name"`
	SizeBytes int64     `json:"sizeBytes"`
	CreatedAt time.Time `json:"createdAt"`
}

// TemplateReplay answers POST /instance-settings-templates/{id}/actions/
// replay-setup-actions (FM's own): an operation for each instance of the
// template the replay was started on, and the instances it was not, with
// why (not running, busy with another operation).
type TemplateReplay struct {
	TemplateID string          `json:"templateId"`
	Futures    []Future        `json:"futures"`
	Skipped    []ReplaySkipped `json:"skipped"`
}

// ReplaySkipped is an instance a template-wide replay did not start on.
type ReplaySkipped struct {
	InstanceID string `json:"instanceId"`
	Error      Error  `json:"error"`
}

// CloudAccount is an identity on a cloud that virtual networks name
// (accountId): the provisioner acts as it for every call on the network's
// instances. Only AWS accounts are made; an object's other keys (what a
// client echoes back) are kept in Extra, but for secrets. NbNetworks is
// the number of networks naming it, computed on each read (Dataiku's
// client refuses to delete an account whose count is above 0, and so does
// FM).
type CloudAccount struct {
	ID          string `json:"id"`
	Label       string `json:"label"`
	Description string `json:"description"`
	// AWSAuthenticationMode is DEFAULT_INSTANCE_CREDENTIALS (the
	// provisioner's own identity), IAM_ROLE (+ AWSIAMRoleARN, assumed with
	// AWSExternalID, which FM makes and shows: put it in the role's trust
	// policy) or KEYPAIR (+ AWSAccessKeyID and AWSSecretAccessKey, sealed at
	// rest and write-only: never returned; a save without it keeps it).
	AWSAuthenticationMode string `json:"awsAuthenticationMode"`
	AWSIAMRoleARN         string `json:"awsIAMRoleARN,omitempty"`
	AWSExternalID         string `json:"awsExternalId,omitempty"`
	AWSAccessKeyID        string `json:"awsAccessKeyId,omitempty"`
	AWSSecretAccessKey    string `json:"awsSecretAccessKey,omitempty"`
	NbNetworks            int    `json:"nbNetworks"`
	// Extra holds the object's keys FM does not know, kept as they came.
	Extra map[string]json.RawMessage `json:"-"`
	Meta
}

// cloudAccountSecretKeys are keys of other clouds' accounts that hold
// secrets, in lower case: never kept in Extra (FM makes no such account, so no read gave
// them; one sent is dropped, not stored in clear).
var cloudAccountSecretKeys = map[string]bool{"azuresecret": true, "azurecertificatepassword": true, "gcpserviceaccountkey": true}

// cloudAccountKeys are the JSON keys of CloudAccount's fields, in lower
// case (TestCloudAccountKeys keeps the list true).
var cloudAccountKeys = map[string]bool{"id": true, "label": true, "description": true, "awsauthenticationmode": true,
	"awsiamrolearn": true, "awsexternalid": true, "awsaccesskeyid": true, "awssecretaccesskey": true, "nbnetworks": true,
	"revision": true, "createdat": true, "updatedat": true, "deleting": true}

type cloudAccountFields CloudAccount

// MarshalJSON writes the account's fields and its Extra keys.
func (a CloudAccount) MarshalJSON() ([]byte, error) {
	return marshalWithExtra(cloudAccountFields(a), a.Extra, knownOrSecretKey)
}

// UnmarshalJSON reads the account's fields, and keeps the keys it does
// not know in Extra (but secrets of other clouds).
func (a *CloudAccount) UnmarshalJSON(b []byte) error {
	var f cloudAccountFields
	if err := json.Unmarshal(b, &f); err != nil {
		return err
	}
	extra, err := extraKeys(b, knownOrSecretKey)
	if err != nil {
		return err
	}
	f.Extra = extra
	*a = CloudAccount(f)
	return nil
}

// marshalWithExtra writes fields (a type without a MarshalJSON of its
// own), then each key of extra that neither it wrote nor skip names.
func marshalWithExtra(fields any, extra map[string]json.RawMessage, skip func(string) bool) ([]byte, error) {
	b, err := json.Marshal(fields)
	if err != nil || len(extra) == 0 {
		return b, err
	}
	var all map[string]json.RawMessage
	if err := json.Unmarshal(b, &all); err != nil {
		return nil, err
	}
	for k, v := range extra {
		if _, known := all[k]; !known && !skip(k) {
			all[k] = v
		}
	}
	return json.Marshal(all)
}

// extraKeys returns the keys of the JSON object b that skip does not name
// (nil if none).
func extraKeys(b []byte, skip func(string) bool) (map[string]json.RawMessage, error) {
	var all map[string]json.RawMessage
	if err := json.Unmarshal(b, &all); err != nil {
		return nil, err
	}
	var extra map[string]json.RawMessage
	for k, v := range all {
		if !skip(k) {
			if extra == nil {
				extra = map[string]json.RawMessage{}
			}
			extra[k] = v
		}
	}
	return extra, nil
}

// knownOrSecretKey says whether k is a field's key or another cloud's
// secret, in any case: Go's decoder fills a field from its key in any
// case, and such a key must not be kept beside the field too (a secret in
// clear, a field chosen by a copy that wins when read back).
func knownOrSecretKey(k string) bool {
	lower := strings.ToLower(k)
	return cloudAccountKeys[lower] || cloudAccountSecretKeys[lower]
}

// AgentUpgrade is GET /agent-upgrade (FM's own): the tenant's last
// rollout of the agent binary FM serves to its instances' machines, one
// batch at a time. POST /agent-upgrade starts one (AgentUpgradeRequest);
// DELETE /agent-upgrade stops it before its next batch.
//
// State is running, succeeded (every instance was upgraded, already ran
// the binary, or was skipped), failed (more instances failed than
// MaxFailures: no batch was started after) or aborted.
type AgentUpgrade struct {
	ID        string     `json:"id"`
	State     string     `json:"state"`
	StartedBy string     `json:"startedBy,omitempty"`
	StartedAt time.Time  `json:"startedAt"`
	EndedAt   *time.Time `json:"endedAt,omitempty"`
	// Version and SHA256 are the binary's, as FM served it when the
	// rollout started: a binary changed since is refused by the agents.
	Version     string `json:"version"`
	SHA256      string `json:"sha256"`
	BatchSize   int    `json:"batchSize"`
	MaxFailures int    `json:"maxFailures"`
	// AbortRequested stops the rollout once its batch under way ends.
	AbortRequested bool `json:"abortRequested,omitempty"`
	// Pending are the instances no batch has reached yet, in order.
	Pending []string `json:"pending"`
	// Batch is the batch under way; Batches counts those started.
	Batch   []AgentUpgradeEntry `json:"batch"`
	Batches int                 `json:"batches"`
	// Upgraded and AlreadyCurrent count the instances whose agent now runs
	// the binary; FailedCount and SkippedCount those that do not, the
	// first of them listed in Failed and Skipped with why.
	Upgraded       int                 `json:"upgraded"`
	AlreadyCurrent int                 `json:"alreadyCurrent"`
	FailedCount    int                 `json:"failedCount"`
	SkippedCount   int                 `json:"skippedCount"`
	Failed         []AgentUpgradeEntry `json:"failed"`
	Skipped        []AgentUpgradeEntry `json:"skipped"`
}

// AgentUpgradeEntry is one instance of a rollout: its upgrade-agent
// operation (JobID) and what came of it.
type AgentUpgradeEntry struct {
	InstanceID string    `json:"instanceId"`
	JobID      string    `json:"jobId,omitempty"`
	Since      time.Time `json:"since"`
	Message    string    `json:"message,omitempty"`
	// Starting says its operation is being started (no JobID yet).
	Starting bool `json:"starting,omitempty"`
}

// AgentUpgradeRequest is the body of POST /agent-upgrade: BatchSize
// instances at a time (default 1), the rollout stopping once more than
// MaxFailures failed (default 0: at the first), over InstanceIDs (default
// every instance of the tenant).
type AgentUpgradeRequest struct {
	BatchSize   int      `json:"batchSize"`
	MaxFailures int      `json:"maxFailures"`
	InstanceIDs []string `json:"instanceIds,omitempty"`
}
