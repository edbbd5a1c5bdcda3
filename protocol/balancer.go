package protocol

import (
	"errors"
	"fmt"
	"time"
)

// The load balancer operations. Their provision request names no instance:
// its LoadBalancer describes the load balancer, whose id is the subject's
// first token (the provisioner carries out one object's requests one after
// the other, keyed by that token).
const (
	// ProvisionBalancerApply makes the load balancer, or changes the one
	// made to match the spec (its nodes, its certificate), without taking
	// it down; with Recreate it removes it first.
	ProvisionBalancerApply ProvisionAction = "lb-apply"
	// ProvisionBalancerDelete removes the load balancer and everything made
	// for it; one already gone is not an error.
	ProvisionBalancerDelete ProvisionAction = "lb-delete"
)

// BalancerSpec is what a backend needs to make a load balancer.
type BalancerSpec struct {
	ID string `json:"id"`
	// Name is the user's name of it, shown in the cloud's tags.
	Name    string      `json:"name"`
	Network NetworkSpec `json:"network"`
	// SecondSubnetID is the network's second subnet (an AWS load balancer
	// spans two availability zones).
	SecondSubnetID string `json:"secondSubnetId,omitempty"`
	// Internal makes it reachable from inside the network only.
	Internal bool `json:"internal,omitempty"`
	// CertificateARN is the HTTPS listener's certificate; without one it
	// serves plain HTTP.
	CertificateARN string            `json:"certificateArn,omitempty"`
	Tags           map[string]string `json:"tags,omitempty"`
	Nodes          []BalancerNode    `json:"nodes"`
	// Recreate removes what exists before making it again (a reprovision):
	// once per request, however often it is delivered.
	Recreate bool `json:"recreate,omitempty"`
}

// BalancerNode is a DSS node behind a load balancer: requests for Hostname
// go to the instance's machine (MachineID, or Address) on Port.
type BalancerNode struct {
	Hostname  string `json:"hostname"`
	Instance  string `json:"instance"`
	MachineID string `json:"machineId,omitempty"`
	Address   string `json:"address,omitempty"`
	Port      int    `json:"port"`
}

// BalancerStatus is where a load balancer stands.
type BalancerStatus string

// The load balancer statuses.
const (
	BalancerApplying BalancerStatus = "applying"
	BalancerActive   BalancerStatus = "active"
	BalancerDeleting BalancerStatus = "deleting"
	BalancerDeleted  BalancerStatus = "deleted"
	BalancerFailed   BalancerStatus = "failed"
)

// BalancerState is a load balancer as the provisioner last made it, in
// BucketBalancers under its id.
type BalancerState struct {
	Header
	ID      string         `json:"id"`
	Backend string         `json:"backend"`
	Status  BalancerStatus `json:"status"`
	// RequestID, Action and Order are the last request handled
	// (MachineState's): one of a lower order is superseded.
	RequestID string          `json:"requestId"`
	Action    ProvisionAction `json:"action"`
	Order     uint64          `json:"order,omitempty"`
	// Address is where it answers (a DNS name, host:port).
	Address string `json:"address,omitempty"`
	// Nodes are those it serves.
	Nodes []BalancerNode `json:"nodes,omitempty"`
	// Details are the backend's names of what it made (ARNs, a port).
	Details map[string]string `json:"details,omitempty"`
	Error   *Error            `json:"error,omitempty"`
	Updated time.Time         `json:"updated"`
}

// Validate implements Message.
func (s *BalancerState) Validate() error {
	switch {
	case !ValidToken(s.ID):
		return fmt.Errorf("load balancer %q is not a valid id", s.ID)
	case s.Status == "":
		return errors.New("status is required")
	case s.Status == BalancerFailed && s.Error == nil:
		return errors.New("a failed load balancer needs an error")
	}
	return nil
}

// ForBalancer says whether r is a load balancer's request about id (the
// subject's first token).
func (r *ProvisionRequest) ForBalancer(id string) bool {
	return (r.Action == ProvisionBalancerApply || r.Action == ProvisionBalancerDelete) && r.LoadBalancer != nil && r.LoadBalancer.ID == id
}

// validBalancerRequest checks a load balancer's provision request.
func validBalancerRequest(r *ProvisionRequest) error {
	b := r.LoadBalancer
	switch {
	case b == nil || !ValidToken(b.ID):
		return errors.New("a load balancer request needs its load balancer, with a valid id")
	case r.Instance != "":
		return errors.New("a load balancer request names no instance")
	}
	for _, n := range b.Nodes {
		if n.Hostname == "" || !ValidToken(n.Instance) || n.Port <= 0 || n.Port > 65535 {
			return fmt.Errorf("load balancer node %q of instance %q is incomplete", n.Hostname, n.Instance)
		}
	}
	return nil
}
