package server

import (
	"encoding/json"
	"time"

	"github.com/fleetmanager/fm/api"
)

// opRecord is an operation as fm_ops stores it: the future clients see, and
// what the server needs to finish it.
type opRecord struct {
	api.Future
	Instance string `json:"instance,omitempty"`
	// LoadBalancer is the load balancer a load balancer operation is
	// about (Instance is empty then).
	LoadBalancer string `json:"loadBalancer,omitempty"`
	// Target is the desired generation the operation waits for.
	Target uint64 `json:"targetGeneration,omitempty"`
	// RequestID and Request are the provision request the operation sent,
	// republished if it was lost (a crash between recording the operation
	// and publishing it).
	RequestID string          `json:"requestId,omitempty"`
	Request   json.RawMessage `json:"request,omitempty"`
	// CallID is the REST call that began the operation (X-Request-Id),
	// which its request and command carry.
	CallID string `json:"callId,omitempty"`
	// Order orders a lifecycle operation's requests among the instance's
	// (protocol.ProvisionRequest.Order): higher than every earlier
	// operation's (orderAfter).
	Order uint64 `json:"order,omitempty"`
	// CommandID and Command are the agent command the operation sent.
	CommandID string          `json:"commandId,omitempty"`
	Command   json.RawMessage `json:"command,omitempty"`
	// Desired is the desired state the operation wrote (a reprovision),
	// written again if a crash lost it.
	Desired json.RawMessage `json:"desired,omitempty"`
	// TargetImageID and TargetDSSVersion are what a reprovision installs,
	// recorded in the lifecycle when it succeeds.
	TargetImageID    string `json:"targetImageId,omitempty"`
	TargetDSSVersion string `json:"targetDssVersion,omitempty"`
	// EndState is the lifecycle state the instance goes to, recorded with
	// the operation's end, so that the lifecycle follows even if the
	// server stops in between ("" keeps the state; "deleted" removes the
	// instance).
	EndState string `json:"endState,omitempty"`
	// Deadline is when a still-running operation is failed.
	Deadline time.Time `json:"deadline,omitzero"`
	// Claimed is set, while the operation runs, by the call that recorded
	// it once it holds its target (act, actOnLB): the sweep never ends a
	// claimed operation as never started. The two are compare-and-set
	// writes of this record, so exactly one wins: either the call sends
	// the operation's request, or the sweep ends it and the call starts
	// again.
	Claimed bool `json:"claimed,omitempty"`
	// pendingSnapshot is a snapshot the operation takes first (before an
	// upgrade), recorded once the operation is.
	pendingSnapshot *api.Snapshot
}

// maxSteps bounds the progress an operation keeps.
const maxSteps = 200

func (op *opRecord) step(name, status, message string, at time.Time) {
	op.Progress.Steps = append(op.Progress.Steps, api.ProgressStep{Name: name, Status: status, Message: message, Time: at})
	if len(op.Progress.Steps) > maxSteps {
		op.Progress.Steps = op.Progress.Steps[len(op.Progress.Steps)-maxSteps:]
	}
}

// lifecycle is FM's lifecycle state of an instance, in fm_lifecycle. It is
// kept apart from the instance's settings so that a state change never
// conflicts with a user's save. An instance without one was never acted on:
// it is created.
type lifecycle struct {
	State string `json:"state"`
	// Generation is the last desired generation written.
	Generation uint64 `json:"generation"`
	// OpID is the operation under way, if any: one at a time.
	OpID   string `json:"opId,omitempty"`
	OpKind string `json:"opKind,omitempty"`
	// LastOpID is the operation that ended last: a step the agent reported
	// before its end but that FM folds after it is filed there.
	LastOpID string `json:"lastOpId,omitempty"`
	// ImageID and DSSVersion are what the last successful reprovision
	// installed, for the downgrade check.
	ImageID    string `json:"imageId,omitempty"`
	DSSVersion string `json:"dssVersion,omitempty"`
	// Machine is the instance's current machine: the provision request that
	// made it, which its agent names in its status.
	Machine string `json:"machine,omitempty"`
	// Order is the order of the last operation that claimed the instance
	// (opRecord.Order). Kept in the record's value, it comes back with
	// FM's records restored from a backup, where the bucket's revisions
	// are numbered again from 1.
	Order uint64 `json:"order,omitempty"`
	// BasePort is the DSS base port given to the instance.
	BasePort int        `json:"basePort,omitempty"`
	Error    *api.Error `json:"error,omitempty"`
	// PasswordRetrieved is set once get-initial-password answered.
	PasswordRetrieved bool      `json:"passwordRetrieved,omitempty"`
	Since             time.Time `json:"since"`
	UpdatedAt         time.Time `json:"updatedAt"`
}

// Lifecycle states.
const (
	stateCreated        = "created"
	stateProvisioning   = "provisioning"
	stateStarting       = "starting"
	stateRunning        = "running"
	stateStopping       = "stopping"
	stateStopped        = "stopped"
	stateDeprovisioning = "deprovisioning"
	stateDeprovisioned  = "deprovisioned"
	stateDeleting       = "deleting"
	stateFailed         = "failed"
	// stateDeleted is only an operation's end state: the instance is gone.
	stateDeleted = "deleted"
)

// lifecycleBusy groups the lifecycles an operation holds (table groupsOf).
const lifecycleBusy = "busy"

// instanceStates are the states an instance can be in.
var instanceStates = []string{stateCreated, stateProvisioning, stateStarting, stateRunning, stateStopping, stateStopped,
	stateDeprovisioning, stateDeprovisioned, stateDeleting, stateFailed}

// instanceSecrets are the DSS credentials FM keeps for an instance.
type instanceSecrets struct {
	InitialPassword string    `json:"initialPassword,omitempty"`
	AdminAPIKey     string    `json:"adminApiKey,omitempty"`
	Requested       time.Time `json:"requested,omitzero"`
	// InstanceKey (base64, 32 bytes) seals what the server and the agent of
	// the current machine tell each other; AgentUser is that agent's NATS
	// user (public key), revoked when the machine goes.
	InstanceKey string `json:"instanceKey,omitempty"`
	AgentUser   string `json:"agentUser,omitempty"`
	// AgentUserExpires is when the last JWT minted for AgentUser expires
	// (zero: one minted by an FM whose credentials never expired).
	AgentUserExpires time.Time `json:"agentUserExpires,omitzero"`
	// Retired are agent users of machines gone whose revocation is under
	// way (revocations.go).
	Retired []retiredUser `json:"retired,omitempty"`
}
