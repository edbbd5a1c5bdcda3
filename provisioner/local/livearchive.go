package local

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/fleetmanager/fm/internal/tarball"
	"github.com/fleetmanager/fm/protocol"
)

// archiveLive writes the volume folder vol to w as a compressed tar of one
// point in time (tarball.LiveArchive), and says how many of the machine's
// processes it paused and for how long. The folder is archived first while
// they run; then they are stopped only while what changed since is written
// again and what went is written as deleted. So the pause lasts as long as
// the archiving of what DSS wrote meanwhile, not of the whole volume, and
// nothing is copied aside: the volume is read once.
func (b *Backend) archiveLive(inst, vol string, w io.Writer, c tarball.Codec) (int, time.Duration, error) {
	la, err := tarball.NewLiveArchive(w, vol, c)
	if err != nil {
		return 0, 0, err
	}
	if err := la.FirstPass(); err != nil {
		la.Abort()
		return 0, 0, err
	}
	paused, took, err := b.paused(inst, la.CatchUp)
	if err != nil {
		la.Abort()
		return paused, took, err
	}
	return paused, took, la.Close()
}

// stopWait bounds the wait for a stopped process's threads to be stopped.
const stopWait = 2 * time.Second

// maxStopRounds bounds the looks for the machine's processes: each look
// after the first is for one started (forked) before its parent stopped.
const maxStopRounds = 5

// pausedDir holds a pause marker per machine a snapshot may have left
// paused.
func (b *Backend) pausedDir() string { return filepath.Join(b.cfg.Dir, "paused") }

// pauseMarker is the file that says a snapshot may have left the
// instance's machine paused: written before the first SIGSTOP, removed
// after the SIGCONT, so that if the provisioner is killed in between, the
// next to take the lease resumes the machine (TakeOver). It is not in the
// machine's folder, which a machine being snapshotted need not have.
func (b *Backend) pauseMarker(inst string) string { return filepath.Join(b.pausedDir(), inst) }

// paused runs fn with the machine's processes (agent and DSS) stopped, and
// says how many it stopped and for how long. SIGSTOP is only asked for by
// kill: fn runs once every thread of every process is seen stopped (a write
// under way finished), and once a look for the processes finds no new one.
// A machine that will not hold still, that was resumed by someone else
// while fn ran, or that changed while fn ran (tarball.ErrNotStill), is an
// Unavailable error: the snapshot is tried again.
func (b *Backend) paused(inst string, fn func() error) (int, time.Duration, error) {
	start := time.Now()
	marker := b.pauseMarker(inst)
	err := os.MkdirAll(b.pausedDir(), 0o700)
	if err == nil {
		err = os.WriteFile(marker, nil, 0o600)
	}
	if err != nil {
		// Tried again: without its marker, a pause cut short would leave
		// the machine stopped for good.
		return 0, 0, protocol.Errorf(protocol.CodeUnavailable, "mark machine %s paused: %v", inst, err)
	}
	stopped := map[int]bool{}
	defer func() {
		for pid := range stopped {
			_ = syscall.Kill(pid, syscall.SIGCONT)
		}
		_ = os.Remove(marker)
	}()
	for round := 0; ; round++ {
		found := 0
		for _, pid := range b.machineProcesses(inst) {
			if !stopped[pid] && syscall.Kill(pid, syscall.SIGSTOP) == nil {
				stopped[pid] = true
				found++
			}
		}
		for pid := range stopped {
			if !cmdline.WaitStopped(pid, stopWait) {
				return len(stopped), time.Since(start), protocol.Errorf(protocol.CodeUnavailable,
					"process %d of instance %s did not stop within %s to be snapshotted (%s)", pid, inst, stopWait,
					strings.Join(cmdline.Running(pid), "; "))
			}
		}
		if found == 0 {
			break
		}
		if round == maxStopRounds {
			return len(stopped), time.Since(start), protocol.Errorf(protocol.CodeUnavailable,
				"instance %s kept starting processes while it was being paused to be snapshotted", inst)
		}
	}
	// A provisioner killed here leaves the machine paused: the next to take
	// the lease resumes it (TakeOver).
	b.crash.At("local/snapshot/machine-paused")
	err = fn()
	if errors.Is(err, tarball.ErrNotStill) {
		err = protocol.Errorf(protocol.CodeUnavailable, "instance %s: %v", inst, err)
	}
	// Someone else's SIGCONT (an operator, a second provisioner) while fn
	// ran would make the archive something other than one point in time,
	// unnoticed by fn if the writes came after it looked: the processes
	// must be stopped still.
	for pid := range stopped {
		if err == nil && !cmdline.WaitStopped(pid, 0) {
			err = protocol.Errorf(protocol.CodeUnavailable,
				"process %d of instance %s was resumed by something else while it was being snapshotted", pid, inst)
		}
	}
	return len(stopped), time.Since(start), err
}
