package protocol

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
)
