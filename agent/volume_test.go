package agent

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/fleetmanager/fm/protocol"
	"github.com/rs/zerolog"
)

func TestGrowCommandForTheDataVolume(t *testing.T) {
	const mounts = `/dev/nvme0n1p1 / xfs rw,relatime 0 0
proc /proc proc rw 0 0
/dev/nvme1n1 /data xfs rw,noatime 0 0
/dev/sdg /data/other ext4 rw 0 0
/dev/sdh /datax ext4 rw 0 0
tmpfs /scratch tmpfs rw 0 0
`
	tests := []struct {
		path, program, arg string
		fails              bool
	}{
		{"/data", "xfs_growfs", "/data", false},
		{"/data/dataiku/dss_data", "xfs_growfs", "/data", false},
		{"/data/other/x", "resize2fs", "/dev/sdg", false},
		{"/datax/y", "resize2fs", "/dev/sdh", false},
		{"/scratch/d", "", "", true},
		{"/home/u", "xfs_growfs", "/", false},
	}
	for _, tc := range tests {
		t.Run(tc.path, func(t *testing.T) {
			m, ok := mountOf(strings.NewReader(mounts), tc.path)
			if !ok {
				t.Fatal("no mount found")
			}
			prog, args, err := growCommand(m)
			if tc.fails != (err != nil) {
				t.Fatalf("err = %v", err)
			}
			if !tc.fails && (prog != tc.program || len(args) != 1 || args[0] != tc.arg) {
				t.Fatalf("%s %v", prog, args)
			}
		})
	}
}

// TestGrowFilesystemOnABlockDevice grows real file systems, mounted from loop
// devices, after their device grew, as an EBS volume does after
// ModifyVolume. It needs root and loop devices (CI machines have them; it
// says so and skips where they are not).
func TestGrowFilesystemOnABlockDevice(t *testing.T) {
	const capSysResource = 24
	tests := []struct {
		fsType, mkfs string
		size         int64 // xfs needs 300 MiB at least
		needsCap     int   // a capability the kernel asks for, beyond root's usual ones
	}{
		// Online ext4 growth (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE,
		// which an EC2 machine's root has and some containers drop.
		{"ext4", "mkfs.ext4", 64 << 20, capSysResource},
		{"xfs", "mkfs.xfs", 320 << 20, 0},
	}
	for _, tc := range tests {
		t.Run(tc.fsType, func(t *testing.T) {
			if tc.needsCap != 0 && !hasCapability(t, tc.needsCap) {
				t.Skipf("growing %s online needs capability %d, which this process lacks", tc.fsType, tc.needsCap)
			}
			mnt, img, dev := loopMount(t, tc.mkfs, tc.size)
			before := fsSize(t, mnt)
			if err := os.Truncate(img, 2*tc.size); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command("losetup", "-c", dev).CombinedOutput(); err != nil {
				t.Fatalf("losetup -c: %v %s", err, out)
			}
			a := &Agent{cfg: Config{DataDir: filepath.Join(mnt, "dataiku")}, m: newMachine(Config{DataDir: mnt}, zerolog.Nop())}
			params, _ := json.Marshal(protocol.GrowFilesystemParams{SizeBytes: uint64(2 * tc.size)})
			res := a.growFilesystem(context.Background(), protocol.Command{Params: params})
			if res.err != nil {
				t.Fatalf("grow-filesystem: %v\n%s", res.err, res.output)
			}
			if after := fsSize(t, mnt); after < before*3/2 {
				t.Fatalf("the file system has %d bytes after growing, %d before (%s)", after, before, res.message)
			}
			if !strings.Contains(res.message, tc.fsType) {
				t.Fatalf("message %q", res.message)
			}
		})
	}
}

// loopMount makes a file system of size bytes with mkfs in an image file,
// attaches it to a loop device and mounts it; all is undone when the test
// ends. It skips the test where that cannot be done.
func loopMount(t *testing.T, mkfs string, size int64) (mnt, img, dev string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("loop devices need root")
	}
	for _, prog := range []string{mkfs, "losetup", "mount", "umount"} {
		if _, err := exec.LookPath(prog); err != nil {
			t.Skipf("%s is not installed", prog)
		}
	}
	dir := t.TempDir()
	img, mnt = filepath.Join(dir, "volume.img"), filepath.Join(dir, "data")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(mkfs, "-q", img).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v %s", mkfs, err, out)
	}
	out, err := exec.Command("losetup", "-f", "--show", img).CombinedOutput()
	if err != nil {
		t.Skipf("no loop device here: %v %s", err, out)
	}
	dev = strings.TrimSpace(string(out))
	t.Cleanup(func() { _ = exec.Command("losetup", "-d", dev).Run() })
	if out, err := exec.Command("mount", dev, mnt).CombinedOutput(); err != nil {
		t.Skipf("mounting a loop device is not permitted here: %v %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v %s", mnt, err, out)
		}
	})
	return mnt, img, dev
}

// hasCapability reports whether capability bit c is in this process's
// effective set.
func hasCapability(t *testing.T, c int) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if hex, ok := strings.CutPrefix(line, "CapEff:"); ok {
			set, err := strconv.ParseUint(strings.TrimSpace(hex), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return set&(1<<c) != 0
		}
	}
	return false
}

func fsSize(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(path, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks) * st.Bsize
}
