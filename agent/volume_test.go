package agent

import (
	"strings"
	"testing"
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
