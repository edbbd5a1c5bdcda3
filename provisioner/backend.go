// Package provisioner is FM's provisioner role: the one consumer of
// FM_PROVISION, which turns provision requests into machine operations on a
// backend (local processes for the embedded default, EC2) and reports them in
// fm_machines and on FM_EVENTS. It talks to the server only through the bus.
// One provisioner is active at a time, elected through a lease in fm_leases.
//
// cmd/fm and tests import it, and the backends (provisioner/local,
// provisioner/ec2) implement its Backend interface. It imports protocol and
// bus, never server.
package provisioner

import (
	"context"
	"errors"

	"github.com/fleetmanager/fm/protocol"
)

// Backend makes and unmakes machines. Every method is idempotent: the
// provisioner calls it again, with the same request, after a crash or a
// redelivery, and it must then find and adopt what it made rather than make
// it twice. cur is the machine's last recorded state (zero for a new
// instance); the returned state is recorded as the new one.
type Backend interface {
	// Name is the backend's name in machine states ("local", "ec2").
	Name() string
	// Reprovision makes a new machine for req.Spec (ending any previous one),
	// with the instance's data volume (created the first time, kept after;
	// made from req.FromSnapshot when set, after checking it, with the
	// current one kept aside), and starts its agent.
	Reprovision(ctx context.Context, req Request, cur protocol.MachineState) (protocol.MachineState, error)
	// Deprovision ends the machine and keeps the data volume.
	Deprovision(ctx context.Context, req Request, cur protocol.MachineState) (protocol.MachineState, error)
	// Start starts a stopped machine.
	Start(ctx context.Context, req Request, cur protocol.MachineState) (protocol.MachineState, error)
	// Stop stops the machine, keeping its disks.
	Stop(ctx context.Context, req Request, cur protocol.MachineState) (protocol.MachineState, error)
	// Delete removes what is left of the instance: the machine, and the data
	// volume unless req.KeepVolume.
	Delete(ctx context.Context, req Request, cur protocol.MachineState) (protocol.MachineState, error)
	// Alive reports which of the machines recorded as running still run,
	// keyed by instance. It is asked about every running machine at once,
	// and answers in a few calls whatever their number (one look at each
	// local process, one filtered describe call per region and identity on
	// a cloud). A machine missing from the answer is unknown, not lost: it
	// is asked about again next time.
	Alive(ctx context.Context, machines []protocol.MachineState) (map[string]bool, error)
	// Snapshot takes snap of the data volume (cur.VolumeID) while the
	// machine keeps running, and returns where it is kept. Asked again for
	// the same snapshot (a redelivery), it finds the one it took and
	// describes it as it is kept, never taking a second.
	Snapshot(ctx context.Context, req Request, cur protocol.MachineState, snap protocol.SnapshotRef) (protocol.SnapshotRef, error)
	// DeleteSnapshot deletes a snapshot; one already gone is not an error.
	DeleteSnapshot(ctx context.Context, req Request, snap protocol.SnapshotRef) error
	// GrowVolume grows the data volume (cur.VolumeID) to sizeGB while the
	// machine runs, and returns the state with its new size; the agent grows
	// the file system after.
	GrowVolume(ctx context.Context, req Request, cur protocol.MachineState, sizeGB int) (protocol.MachineState, error)
}

// TakingOver is what a Backend may also do: mend, when its provisioner
// takes the lease, what a previous holder killed in the middle of a step
// left in a state no request will undo (the local backend resumes the
// machines a snapshot left paused). Only the lease holder acts on
// machines, so it is never done beside a live holder's work.
type TakingOver interface {
	TakeOver(ctx context.Context)
}

// GivingUp is what a Backend that serves something from the
// provisioner's own process (the local backend's load balancers) also
// does: stop serving it when the provisioner stops holding the lease, so
// that the next holder can (TakeOver serves it again).
type GivingUp interface {
	GiveUp()
}

// Untouched marks the error of an operation that failed before it changed
// anything (a snapshot to restore fails its check, the snapshot before an
// upgrade cannot be taken): the machine keeps its status, the error is
// recorded beside it, and the instance is left as it was.
func Untouched(err error) error { return untouchedError{err} }

type untouchedError struct{ err error }

func (e untouchedError) Error() string { return e.err.Error() }
func (e untouchedError) Unwrap() error { return e.err }

// IsUntouched reports whether err is marked by Untouched.
func IsUntouched(err error) bool {
	var u untouchedError
	return errors.As(err, &u)
}

// Request is a provision request with a way to report progress.
type Request struct {
	protocol.ProvisionRequest
	// Progress reports a step of the operation as it happens.
	Progress func(step, message string)
	// Ongoing reports how far a long step got (a snapshot's upload): the
	// operation shows the latest in place of the one before. It may be
	// nil (tests).
	Ongoing func(step, message string)
}

// Advance reports how far a long step got through Ongoing, if the request
// has it.
func (r Request) Advance(step, message string) {
	if r.Ongoing != nil {
		r.Ongoing(step, message)
	}
}
