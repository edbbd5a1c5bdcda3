package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/fleetmanager/fm/protocol"
)

// growFilesystem carries out CommandGrowFilesystem once the provisioner grew
// the data volume. On a machine whose data volume is a file system of its
// own, the file system is grown to fill the device (xfs_growfs, resize2fs);
// on the local backend, where the volume is a folder with a nominal size,
// the nominal size becomes the new one.
func (a *Agent) growFilesystem(ctx context.Context, cmd protocol.Command) commandResult {
	var p protocol.GrowFilesystemParams
	if err := json.Unmarshal(cmd.Params, &p); err != nil || p.SizeBytes == 0 {
		return commandResult{err: protocol.Errorf(protocol.CodeInvalidArgument, "grow-filesystem needs the new size in bytes")}
	}
	if a.cfg.DataVolumeBytes > 0 {
		if cur := a.nominalVolume.Load(); p.SizeBytes <= cur {
			return commandResult{message: fmt.Sprintf("the data volume already has %d bytes", cur)}
		}
		a.nominalVolume.Store(p.SizeBytes)
		return commandResult{message: fmt.Sprintf("the data volume's nominal size is now %d bytes", p.SizeBytes)}
	}
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return commandResult{err: protocol.Errorf(protocol.CodeInternal, "%v", err)}
	}
	defer f.Close()
	mnt, ok := mountOf(f, a.cfg.DataDir)
	if !ok {
		return commandResult{err: protocol.Errorf(protocol.CodeFailedPrecondition, "%s is not on a mounted file system", a.cfg.DataDir)}
	}
	name, args, err := growCommand(mnt)
	if err != nil {
		return commandResult{err: protocol.Errorf(protocol.CodeUnsupported, "%v", err)}
	}
	out, err := a.m.run(ctx, name, args...)
	if err != nil {
		return commandResult{err: protocol.Errorf(protocol.CodeInternal, "%v", err), output: out}
	}
	return commandResult{message: fmt.Sprintf("%s grown (%s)", mnt.point, mnt.fsType), output: out}
}

type mount struct{ device, point, fsType string }

// mountOf finds, in a mounts table (/proc/self/mounts), the mount that holds
// path: the one with the longest mount point that is a prefix of it.
func mountOf(table io.Reader, path string) (mount, bool) {
	path = filepath.Clean(path)
	var best mount
	found := false
	sc := bufio.NewScanner(table)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 3 {
			continue
		}
		m := mount{device: fields[0], point: fields[1], fsType: fields[2]}
		under := m.point == "/" || path == m.point || strings.HasPrefix(path, m.point+"/")
		if under && (!found || len(m.point) > len(best.point)) {
			best, found = m, true
		}
	}
	return best, found
}

// growCommand is the program that grows a mounted file system to its
// device's size.
func growCommand(m mount) (string, []string, error) {
	switch m.fsType {
	case "xfs":
		return "xfs_growfs", []string{m.point}, nil
	case "ext4", "ext3", "ext2":
		return "resize2fs", []string{m.device}, nil
	}
	return "", nil, fmt.Errorf("the data volume's file system (%s on %s) cannot be grown by FM", m.fsType, m.point)
}
