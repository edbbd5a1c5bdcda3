package protocol

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// ProvisionAction is the last token of a provision request's subject: what
// the provisioner is asked to do to an instance's machine.
type ProvisionAction string

// The machine operations of the lifecycle (docs/architecture.md).
const (
	ProvisionReprovision ProvisionAction = "reprovision" // new machine; the first one provisions
	ProvisionDeprovision ProvisionAction = "deprovision" // machine gone, data volume kept
	ProvisionStart       ProvisionAction = "start"       // start a stopped machine
	ProvisionStop        ProvisionAction = "stop"        // stop the machine, keep its disks
	ProvisionDelete      ProvisionAction = "delete"      // release what is left of the instance
	// Snapshots of the data volume; they leave the machine as it is.
	ProvisionSnapshot       ProvisionAction = "snapshot"        // snapshot the data volume
	ProvisionDeleteSnapshot ProvisionAction = "delete-snapshot" // delete a snapshot
	// ProvisionGrowVolume grows the data volume to VolumeSizeGB (the agent
	// then grows its file system); it leaves the machine as it is.
	ProvisionGrowVolume ProvisionAction = "grow-volume"
)

// ProvisionRequest asks the provisioner to do a machine operation. It is
// published on ProvisionSubject(Instance, Action) in FM_PROVISION with ID as
// Nats-Msg-Id, and carries everything the operation needs, so that the
// provisioner reads nothing else. Handling a request twice does the work
// once: the machine state records the last request handled.
type ProvisionRequest struct {
	Header
	ID       string          `json:"id"`
	Instance string          `json:"instance"`
	Action   ProvisionAction `json:"action"`
	OpID     string          `json:"opId,omitempty"`
	// CallID is the id of the REST call that caused the request (its
	// X-Request-Id), for the logs.
	CallID string `json:"callId,omitempty"`
	// Generation is the desired generation the machine is for (reprovision,
	// start).
	Generation uint64    `json:"generation,omitempty"`
	Issued     time.Time `json:"issued"`
	// Order orders the requests of an instance's lifecycle operations (not
	// snapshots or growth, which run beside them): higher than every
	// earlier operation's of the instance and than the order its machine
	// record last saw, counted by the server in the instance's lifecycle
	// record, which each operation claims by compare-and-set. It comes from
	// the bus, not a clock. Zero: unordered (an older server).
	Order uint64 `json:"order,omitempty"`
	// Deadline is the operation's: a failure that may go away by itself
	// (the cloud or the bus unavailable, throttling) is retried until then
	// rather than failing the operation. Zero: the provisioner's default.
	Deadline time.Time `json:"deadline,omitzero"`
	// Spec describes the machine (reprovision, start).
	Spec *MachineSpec `json:"spec,omitempty"`
	// KeepVolume keeps the data volume when an instance is deleted.
	KeepVolume bool `json:"keepVolume,omitempty"`
	// Cloud is the identity a cloud backend acts as for every action (the
	// tenant's cloud credentials); nil means the provisioner's own.
	Cloud *CloudAuth `json:"cloud,omitempty"`
	// Snapshot is the snapshot a snapshot or delete-snapshot request is
	// about. On a reprovision it is one to take before the machine is
	// replaced (an upgrade): if it cannot be taken, the reprovision fails
	// and leaves the machine as it was.
	Snapshot *SnapshotRef `json:"snapshot,omitempty"`
	// FromSnapshot, on a reprovision, builds the data volume from this
	// snapshot; the current volume is kept aside. The snapshot is verified
	// before anything is replaced.
	FromSnapshot *SnapshotRef `json:"fromSnapshot,omitempty"`
	// VolumeSizeGB is the size a grow-volume request grows the data volume
	// to.
	VolumeSizeGB int `json:"volumeSizeGB,omitempty"`
	// LoadBalancer is the load balancer an lb-apply or lb-delete request
	// is about (Instance is empty then).
	LoadBalancer *BalancerSpec `json:"loadBalancer,omitempty"`
}

// SnapshotRef is a snapshot of an instance's data volume as the
// provisioner knows it. ID is FM's; Store and Ref say where the backend
// keeps it, once taken.
type SnapshotRef struct {
	ID string `json:"id"`
	// Store is "object-store" (an archive in the bus's object store), "s3"
	// (an archive in a bucket) or "ebs" (an EBS snapshot).
	Store string `json:"store,omitempty"`
	// Ref is the store's name of it: an object name, an S3 key, an EBS
	// snapshot id.
	Ref string `json:"ref,omitempty"`
	// SHA256 (hex) is the digest of an archive; a restore checks it.
	SHA256    string `json:"sha256,omitempty"`
	SizeBytes int64  `json:"sizeBytes,omitempty"`
	// VolumeSizeGB is the size of the volume it was taken of.
	VolumeSizeGB int `json:"volumeSizeGB,omitempty"`
	// Region is the cloud region of a cloud snapshot.
	Region string `json:"region,omitempty"`
}

// MachineSpec is what a backend needs to build an instance's machine.
type MachineSpec struct {
	Label        string            `json:"label"`
	NodeType     string            `json:"nodeType"`
	ImageID      string            `json:"imageId"`
	DSSVersion   string            `json:"dssVersion"`
	AMIs         map[string]string `json:"amis,omitempty"`
	InstanceType string            `json:"instanceType"`
	// BasePort is the DSS base port the machine must leave free.
	BasePort   int               `json:"basePort"`
	Network    NetworkSpec       `json:"network"`
	Access     AccessSpec        `json:"access"`
	DataVolume VolumeSpec        `json:"dataVolume"`
	RootVolume VolumeSpec        `json:"rootVolume"`
	Tags       map[string]string `json:"tags,omitempty"`
	ElasticIP  *ElasticIPSpec    `json:"elasticIp,omitempty"`
	// Join, when FM runs with NATS credentials, is how the machine's agent
	// gets its own: a single-use token to exchange at URL.
	Join *JoinSpec `json:"join,omitempty"`
	// Agent is where a cloud machine downloads the fm binary its agent runs
	// (the local backend runs its own).
	Agent *AgentDownload `json:"agent,omitempty"`
}

// AgentDownload is the fm binary as a new machine fetches it: an HTTP(S)
// URL, verified against its SHA-256 (hex) before it runs.
type AgentDownload struct {
	URL    string `json:"url"`
	SHA256 string `json:"sha256"`
}

// The cloud authentication modes (the tenant's awsAuthenticationMode).
const (
	CloudAuthSameAsFM = "SAME_AS_FM" // the provisioner's own identity (the standard AWS chain)
	CloudAuthIAMRole  = "IAM_ROLE"   // a role assumed with the provisioner's identity
	CloudAuthKeypair  = "KEYPAIR"    // a static access key
)

// CloudAuth is the identity a backend acts as. The secret access key travels
// sealed with FM's secret key, which the provisioner holds too.
type CloudAuth struct {
	Mode    string `json:"mode"`
	RoleARN string `json:"roleArn,omitempty"`
	// ExternalID is passed when the role is assumed (a cloud account's,
	// which its role's trust policy requires).
	ExternalID            string `json:"externalId,omitempty"`
	AccessKeyID           string `json:"accessKeyId,omitempty"`
	SealedSecretAccessKey string `json:"sealedSecretAccessKey,omitempty"`
}

// JoinSpec tells a new machine's agent how to get its credentials.
type JoinSpec struct {
	// URL is FM's join endpoint (POST).
	URL string `json:"url"`
	// Token is single-use and short-lived. FM's server sends it sealed
	// (SealedToken) instead, with FM's secret key: read-only bus
	// credentials read provision requests, and must not be able to join
	// in a new machine's place. The provisioner, which holds the key,
	// opens it into Token for the machine.
	Token       string `json:"token"`
	SealedToken string `json:"sealedToken,omitempty"`
	// CACert is the PEM of the CA FM's TLS listeners use ("" without TLS).
	CACert string `json:"caCert,omitempty"`
}

// JoinRequest is the body an agent posts to the join endpoint. PublicKey is
// the NATS user key the machine made for itself (its seed never leaves the
// machine): a token is bound to the first key it is exchanged for, so that
// the same machine may ask again (its answer lost, or it died before it
// kept it) while any other is refused. Signature (base64, raw URL
// encoding) is PublicKey's signature of [JoinProof], which every join needs:
// a token may be asked for again by the key that exchanged it, and knowing
// a token and a public key (both of which others may read) is not enough.
type JoinRequest struct {
	Instance  string `json:"instance"`
	Token     string `json:"token"`
	PublicKey string `json:"publicKey,omitempty"`
	Signature string `json:"signature,omitempty"`
	// EC2Identity is sent by an agent on EC2 (its configuration names the
	// instance metadata service): what proves which EC2 machine asks.
	EC2Identity *EC2Identity `json:"ec2Identity,omitempty"`
}

// BackendEC2 is the EC2 backend's name in machine states.
const BackendEC2 = "ec2"

// EC2Identity is an EC2 machine's instance identity document and the
// document's signature, as the instance metadata service gives them
// (/latest/dynamic/instance-identity/document and …/signature: base64 of
// an RSA signature of the document's SHA-256, by AWS's key of the region).
// Only the machine itself can read them. A server given AWS's certificates
// joins a machine only with the document of the EC2 instance its
// provisioner launched for the token: a token read from the instance's
// user data elsewhere (the EC2 API shows it) is of no use.
type EC2Identity struct {
	Document  string `json:"document"`
	Signature string `json:"signature"`
}

// JoinProof is what a machine signs with its NATS key to prove, when it
// joins, that it holds the key's seed.
func JoinProof(instance, token string) []byte {
	return []byte("fm-join\n" + instance + "\n" + token)
}

// JoinResponse is what the join endpoint answers: the agent's NATS user JWT
// for the PublicKey it sent and its instance key (base64), which seals what
// FM and the agent tell each other. Credentials, a whole creds file with a
// key FM made, is what FMs answered before JoinRequest.PublicKey was added;
// an agent still accepts it, this FM no longer sends it.
type JoinResponse struct {
	Credentials string `json:"credentials,omitempty"`
	JWT         string `json:"jwt,omitempty"`
	InstanceKey string `json:"instanceKey"`
}

// RenewRequest asks for a new JWT for an agent's NATS user before (or, over
// HTTP, after) its credentials expire: on the bus, on RenewSubject of the
// agent's instance, whose permissions only that instance's agents have; over
// HTTP, at the join endpoint's "/renew", from an agent whose credentials
// expired while its machine was off. Signature (base64, raw URL encoding)
// is PublicKey's signature of [RenewProof]: over HTTP it is the only proof
// of who asks, so Time must be within minutes of FM's clock.
type RenewRequest struct {
	Header
	Instance  string    `json:"instance"`
	PublicKey string    `json:"publicKey"`
	Time      time.Time `json:"time"`
	Signature string    `json:"signature"`
}

// Validate implements Message.
func (r *RenewRequest) Validate() error {
	switch {
	case !ValidToken(r.Instance):
		return fmt.Errorf("instance %q is not a valid id", r.Instance)
	case r.PublicKey == "" || r.Signature == "":
		return errors.New("publicKey and signature are required")
	case r.Time.IsZero():
		return errors.New("time is required")
	}
	return nil
}

// RenewProof is what an agent signs with its NATS key to renew its
// credentials.
func RenewProof(instance, publicKey string, at time.Time) []byte {
	return []byte("fm-renew\n" + instance + "\n" + publicKey + "\n" + at.UTC().Format(time.RFC3339Nano))
}

// RenewResponse carries the new JWT of the same user, or why there is none.
type RenewResponse struct {
	Header
	JWT   string `json:"jwt,omitempty"`
	Error *Error `json:"error,omitempty"`
}

// Validate implements Message.
func (r *RenewResponse) Validate() error {
	if (r.JWT == "") == (r.Error == nil) {
		return errors.New("exactly one of jwt and error is required")
	}
	return nil
}

// CommandsAfterRequest asks FM, on CommandsAfterSubject of the agent's
// instance, for the instance's commands stored in FM_COMMANDS after stream
// sequence After (0: from the first). An agent asks when it starts, after
// every reconnection and now and then; between, it receives each command
// as it is stored, on CommandLiveSubject, with its sequence in the
// Nats-Sequence header.
type CommandsAfterRequest struct {
	Header
	After uint64 `json:"after,omitempty"`
}

// Validate implements Message.
func (r *CommandsAfterRequest) Validate() error { return nil }

// StoredCommand is one command as FM_COMMANDS holds it: its stream
// sequence and the command's encoding, as published (absent if what is
// stored is not JSON: the agent rejects it as malformed).
type StoredCommand struct {
	Seq     uint64          `json:"seq"`
	Command json.RawMessage `json:"command,omitempty"`
}

// MaxCommandsPerAnswer bounds the commands of one CommandsAfterResponse.
const MaxCommandsPerAnswer = 64

// CommandsAfterPace is how often FM answers an instance's catch-ups: one
// asked sooner is answered ResourceExhausted.
const CommandsAfterPace = 250 * time.Millisecond

// CommandsAfterResponse holds the commands asked for, in stream order (at
// most MaxCommandsPerAnswer, fewer when they are large: More says that
// others follow the last), or why there are none. Reset says that After
// is beyond the last sequence FM_COMMANDS holds (the bus was restored or
// replaced): the agent catches up from the first, running only the
// commands it has not run (by id).
type CommandsAfterResponse struct {
	Header
	Commands []StoredCommand `json:"commands,omitempty"`
	More     bool            `json:"more,omitempty"`
	Reset    bool            `json:"reset,omitempty"`
	Error    *Error          `json:"error,omitempty"`
}

// Validate implements Message.
func (r *CommandsAfterResponse) Validate() error {
	if (r.Error != nil || r.Reset) && (len(r.Commands) > 0 || r.More) {
		return errors.New("an error or a reset comes without commands")
	}
	if r.Error != nil && r.Reset {
		return errors.New("an error comes without a reset")
	}
	if len(r.Commands) > MaxCommandsPerAnswer {
		return fmt.Errorf("%d commands: at most %d are sent at once", len(r.Commands), MaxCommandsPerAnswer)
	}
	if r.More && len(r.Commands) == 0 {
		return errors.New("more is said of a non-empty answer only")
	}
	var last uint64
	for _, c := range r.Commands {
		if c.Seq <= last {
			return fmt.Errorf("command sequences are not increasing (%d after %d)", c.Seq, last)
		}
		last = c.Seq
	}
	return nil
}

// NetworkSpec is the instance's virtual network, as a backend needs it.
type NetworkSpec struct {
	ID                       string   `json:"id"`
	Region                   string   `json:"region"`
	VpcID                    string   `json:"vpcId"`
	SubnetID                 string   `json:"subnetId"`
	AutoCreateSecurityGroups bool     `json:"autoCreateSecurityGroups"`
	SecurityGroups           []string `json:"securityGroups,omitempty"`
	AssignPublicIP           bool     `json:"assignPublicIp"`
	DNSStrategy              string   `json:"dnsStrategy"`
	PrivateZoneID            string   `json:"privateZoneId,omitempty"`
	PublicZoneID             string   `json:"publicZoneId,omitempty"`
	// InternetAccess is the network's internetAccessMode: InternetAccessYes
	// (or empty, from an older server), InternetAccessNo (no public address,
	// and FM's security groups let traffic out only to private addresses)
	// or InternetAccessEgressOnly (no public address; out to anywhere, as
	// the subnet's routes allow).
	InternetAccess string `json:"internetAccess,omitempty"`
	// WebPorts are the TCP ports the machine serves to its users (DSS's
	// own port, or its HTTPS front's), which FM's web security group opens
	// beside SSH. Empty (an older server): SSH, 80, 443 and BasePort.
	WebPorts []int `json:"webPorts,omitempty"`
	// Peering, when set, is FM's own VPC, which the network's VPC is peered
	// with (autoCreatePeerings), routes included.
	Peering *PeeringSpec `json:"peering,omitempty"`
}

// PeeringSpec is a VPC a network's VPC is peered with: FM's own, by the
// subnet whose route table gets the route back.
type PeeringSpec struct {
	VpcID    string `json:"vpcId"`
	SubnetID string `json:"subnetId,omitempty"`
	Region   string `json:"region,omitempty"`
}

// Machine details (MachineState.Details) the provisioner acts on, beside a
// backend's own.
const (
	// DetailRuntimeProfile is set by a backend that made the machine with
	// the template's startup instance profile: the runtime profile's ARN,
	// which the provisioner gives the machine once its agent reports DSS
	// set up, and then removes.
	DetailRuntimeProfile = "runtimeProfilePending"
	// DetailInstanceProfile is the instance profile the machine has.
	DetailInstanceProfile = "instanceProfile"
	// DetailMadeBy is the provision request that made the machine (its
	// agent's AgentStatus.MachineRequest).
	DetailMadeBy = "madeBy"
)

// The internet access modes of a network (NetworkSpec.InternetAccess).
const (
	InternetAccessYes        = "YES"
	InternetAccessNo         = "NO"
	InternetAccessEgressOnly = "EGRESS_ONLY"
)

// Public reports whether the network's machines may have a public address.
func (n NetworkSpec) Public() bool {
	return n.InternetAccess == "" || n.InternetAccess == InternetAccessYes
}

// AccessSpec is how the machine is reached and what identity it runs with
// (from the template).
type AccessSpec struct {
	KeyPairName               string `json:"keyPairName,omitempty"`
	StartupInstanceProfileArn string `json:"startupInstanceProfileArn,omitempty"`
	RuntimeInstanceProfileArn string `json:"runtimeInstanceProfileArn,omitempty"`
	RestrictMetadataAccess    bool   `json:"restrictMetadataAccess"`
}

// VolumeSpec describes a disk. Zero values leave the backend's defaults.
type VolumeSpec struct {
	Type      string `json:"type,omitempty"`
	SizeGB    int    `json:"sizeGB,omitempty"`
	MaxSizeGB int    `json:"maxSizeGB,omitempty"`
	IOPS      int    `json:"iops,omitempty"`
	// ThroughputMiBps is a gp3 volume's throughput (0: EBS's default).
	ThroughputMiBps int    `json:"throughputMiBps,omitempty"`
	Encryption      string `json:"encryption,omitempty"`
	KMSKeyID        string `json:"kmsKeyId,omitempty"`
}

// ElasticIPSpec asks for a static public IP.
type ElasticIPSpec struct {
	AllocationID string `json:"allocationId,omitempty"`
}

// Validate implements Message.
func (r *ProvisionRequest) Validate() error {
	lb := r.Action == ProvisionBalancerApply || r.Action == ProvisionBalancerDelete
	switch {
	case !ValidToken(r.ID):
		return fmt.Errorf("id %q is not a valid id", r.ID)
	case !lb && !ValidToken(r.Instance):
		return fmt.Errorf("instance %q is not a valid id", r.Instance)
	}
	switch r.Action {
	case ProvisionReprovision:
		if r.Spec == nil || r.Generation == 0 {
			return errors.New("reprovision needs a spec and a generation")
		}
		if r.FromSnapshot != nil && !ValidToken(r.FromSnapshot.ID) {
			return errors.New("a restore needs a snapshot with a valid id")
		}
	case ProvisionStart:
		if r.Spec == nil {
			return errors.New("start needs a spec")
		}
	case ProvisionSnapshot, ProvisionDeleteSnapshot:
		if r.Snapshot == nil || !ValidToken(r.Snapshot.ID) {
			return errors.New("a snapshot request needs a snapshot with a valid id")
		}
	case ProvisionGrowVolume:
		if r.VolumeSizeGB <= 0 {
			return errors.New("grow-volume needs a volume size")
		}
	case ProvisionBalancerApply, ProvisionBalancerDelete:
		return validBalancerRequest(r)
	case ProvisionDeprovision, ProvisionStop, ProvisionDelete:
	default:
		return fmt.Errorf("action %q is unknown", r.Action)
	}
	return nil
}

// MachineStatus is where a machine stands.
type MachineStatus string

// The machine statuses.
const (
	MachineProvisioning   MachineStatus = "provisioning"
	MachineRunning        MachineStatus = "running"
	MachineStopping       MachineStatus = "stopping"
	MachineStopped        MachineStatus = "stopped"
	MachineDeprovisioning MachineStatus = "deprovisioning"
	MachineDeprovisioned  MachineStatus = "deprovisioned" // no machine; the data volume is kept
	MachineDeleted        MachineStatus = "deleted"       // nothing left
	MachineFailed         MachineStatus = "failed"        // an operation failed; Error says why
	MachineLost           MachineStatus = "lost"          // the machine disappeared on its own
)

// MachineState is the provisioner's record of an instance's machine, the
// value of its key in fm_machines.
type MachineState struct {
	Header
	Instance string        `json:"instance"`
	Backend  string        `json:"backend"` // the backend's name: BackendEC2, "local"
	Status   MachineStatus `json:"status"`
	// Generation is the desired generation the machine was provisioned for.
	Generation uint64 `json:"generation"`
	// RequestID and Action are the last provision request handled, and
	// Order its order (ProvisionRequest.Order): a request of a lower order
	// (a late copy of an older one) is superseded and not carried out.
	RequestID string          `json:"requestId"`
	Action    ProvisionAction `json:"action"`
	Order     uint64          `json:"order,omitempty"`
	// Before is the status the machine had when the request under way (a
	// transitional Status) began: a request refused before it changed
	// anything leaves the machine in it, after a crash too.
	Before MachineStatus `json:"before,omitempty"`
	// MachineID identifies the machine (an EC2 instance id, a local process).
	MachineID string `json:"machineId,omitempty"`
	// VolumeID identifies the data volume; it outlives machines.
	VolumeID     string `json:"volumeId,omitempty"`
	VolumeSizeGB int    `json:"volumeSizeGB,omitempty"`
	PrivateIP    string `json:"privateIp,omitempty"`
	PublicIP     string `json:"publicIp,omitempty"`
	PrivateDNS   string `json:"privateDns,omitempty"`
	PublicDNS    string `json:"publicDns,omitempty"`
	// Details are backend specifics worth showing (security groups, …).
	Details map[string]string `json:"details,omitempty"`
	Error   *Error            `json:"error,omitempty"`
	Updated time.Time         `json:"updated"`
}

// HasMachine reports whether a machine exists in this state (running,
// stopped or on its way), as opposed to none or only a volume.
func (m *MachineState) HasMachine() bool {
	switch m.Status {
	case "", MachineDeprovisioned, MachineDeleted:
		return false
	case MachineFailed, MachineLost:
		return m.MachineID != ""
	}
	return true
}

// Validate implements Message.
func (m *MachineState) Validate() error {
	if !ValidToken(m.Instance) {
		return fmt.Errorf("instance %q is not a valid id", m.Instance)
	}
	if m.Status == "" {
		return errors.New("status is required")
	}
	if m.Status == MachineFailed && m.Error == nil {
		return errors.New("a failed machine needs an error")
	}
	return nil
}
