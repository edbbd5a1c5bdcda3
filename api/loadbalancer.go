package api

import (
	"encoding/json"
	"strings"
	"time"
)

// Load balancer enumerations (contract §4.4). The values are exact on the
// wire.
const (
	LBCertificateAWSARN      = "AWS_ARN"           // awsCertificateARN names an ACM certificate
	LBCertificateAzureSecret = "AZURE_SECRET_ID"   // Azure only: refused
	LBNoPublicIP             = "NO_PUBLIC_IP"      // internal scheme (with_private_scheme)
	LBDynamicPublicIP        = "DYNAMIC_PUBLIC_IP" // internet-facing, as AWS's are (absent: the same)
	LBStaticPublicIP         = "STATIC_PUBLIC_IP"  // Azure only (with azurePublicIPID): refused
)

// Load balancer states, as FM's lifecycle of one sees them (server-owned).
const (
	LBStateNotProvisioned = "NOT_PROVISIONED" // nothing in the cloud
	LBStateProvisioning   = "PROVISIONING"
	LBStateProvisioned    = "PROVISIONED" // made, and serving the nodes it was last given
	LBStateUpdating       = "UPDATING"
	LBStateDeprovisioning = "DEPROVISIONING"
	LBStateFailed         = "FAILED" // its last operation failed; what is in the cloud is in physical/status
)

// LoadBalancer is a load balancer in front of DSS nodes (contract §4.4):
// each node is reached by its host name (host-based routing), over HTTPS
// with the certificate awsCertificateARN names, HTTP redirected to HTTPS.
// Its settings change with PUT (a full replace); what is in the cloud
// changes only with its actions (provision, update, reprovision,
// deprovision). An object's other keys (an Azure creator's, what a client
// echoes back) are kept in Extra.
type LoadBalancer struct {
	ID               string            `json:"id"`
	Name             string            `json:"name"`
	Description      string            `json:"description"`
	VirtualNetworkID string            `json:"virtualNetworkId"`
	CloudTags        map[string]string `json:"cloudTags"`
	FMTags           []string          `json:"fmTags"`
	// PublicIPMode is NO_PUBLIC_IP (internal), or DYNAMIC_PUBLIC_IP or
	// absent (internet-facing).
	PublicIPMode string `json:"publicIpMode"`
	// CertificateMode is AWS_ARN, with AWSCertificateARN the listener's
	// certificate; without one the load balancer serves plain HTTP.
	CertificateMode     string `json:"certificateMode"`
	AWSCertificateARN   string `json:"awsCertificateARN"`
	AzureAssignPublicIP bool   `json:"azureAssignPublicIP"`
	// Nodes are the DSS nodes served: the host name each is reached by,
	// and its instance. Always present, empty or not (the client's
	// add_node and remove_node read it).
	Nodes []LoadBalancerNode `json:"nodes"`
	// State and the rest are FM's: what the load balancer's last
	// operation left it in (a save never changes them).
	State       string `json:"state"`
	OperationID string `json:"operationId,omitempty"`
	// Address is where it answers: its DNS name on AWS, host:port locally.
	Address string `json:"address,omitempty"`
	Error   *Error `json:"error,omitempty"`
	// Order counts its operations: the provisioner carries out none older
	// than the last it did.
	Order uint64 `json:"order,omitempty"`
	// Extra holds the object's keys FM does not know, kept as they came.
	Extra map[string]json.RawMessage `json:"-"`
	Meta
}

// LoadBalancerNode is one DSS node behind a load balancer.
type LoadBalancerNode struct {
	Hostname   string `json:"hostname"`
	InstanceID string `json:"instanceId"`
}

// loadBalancerKeys are the JSON keys of LoadBalancer's fields, in lower
// case (TestLoadBalancerKeys keeps the list true).
var loadBalancerKeys = map[string]bool{"id": true, "name": true, "description": true, "virtualnetworkid": true,
	"cloudtags": true, "fmtags": true, "publicipmode": true, "certificatemode": true, "awscertificatearn": true,
	"azureassignpublicip": true, "nodes": true, "state": true, "operationid": true, "address": true, "error": true,
	"order": true, "revision": true, "createdat": true, "updatedat": true, "deleting": true}

// loadBalancerSecretKeys are keys of other clouds' load balancers that
// hold secrets: never kept.
var loadBalancerSecretKeys = map[string]bool{"azurecertificatesecret": true}

func knownLoadBalancerKey(k string) bool {
	lower := strings.ToLower(k)
	return loadBalancerKeys[lower] || loadBalancerSecretKeys[lower]
}

type loadBalancerFields LoadBalancer

// MarshalJSON writes the load balancer's fields and its Extra keys; nodes
// is never null.
func (lb LoadBalancer) MarshalJSON() ([]byte, error) {
	if lb.Nodes == nil {
		lb.Nodes = []LoadBalancerNode{}
	}
	return marshalWithExtra(loadBalancerFields(lb), lb.Extra, knownLoadBalancerKey)
}

// UnmarshalJSON reads the load balancer's fields, and keeps the keys it
// does not know in Extra.
func (lb *LoadBalancer) UnmarshalJSON(b []byte) error {
	var f loadBalancerFields
	if err := json.Unmarshal(b, &f); err != nil {
		return err
	}
	extra, err := extraKeys(b, knownLoadBalancerKey)
	if err != nil {
		return err
	}
	f.Extra = extra
	*lb = LoadBalancer(f)
	return nil
}

// LoadBalancerPhysicalStatus is what GET /load-balancers/{id}/physical/status
// answers: what the provisioner last made of the load balancer (Dataiku's
// client reads no field of it).
type LoadBalancerPhysicalStatus struct {
	ID      string `json:"id"`
	State   string `json:"state"`
	Backend string `json:"backend,omitempty"`
	// Status is the provisioner's: none, applying, active, deleting,
	// deleted, failed.
	Status  string             `json:"status"`
	Address string             `json:"address,omitempty"`
	Nodes   []LoadBalancerNode `json:"nodes"`
	Details map[string]string  `json:"details,omitempty"`
	Error   *Error             `json:"error,omitempty"`
	Updated *time.Time         `json:"updated,omitempty"`
}
