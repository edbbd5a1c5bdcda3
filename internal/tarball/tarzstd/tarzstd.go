// Package tarzstd is zstd for package tarball: several times faster than
// gzip at a like ratio, on every core (the local backend's snapshots). It
// is apart from tarball so that what reads only gzipped kits (the slim
// agent) does not link it. Only this module may import it.
package tarzstd

import (
	"io"

	"github.com/fleetmanager/fm/internal/tarball"
	"github.com/klauspost/compress/zstd"
)

// maxWindow bounds what an archive may make the reader hold: the encoder
// here uses 8 MiB at most, and a damaged or foreign header asking for more
// is refused rather than allocated.
const maxWindow = 64 << 20

// Codec writes and reads tars compressed with zstd (".tar.zst").
var Codec = tarball.Codec{
	Name:  "zstd",
	Ext:   ".tar.zst",
	Magic: []byte{0x28, 0xb5, 0x2f, 0xfd},
	NewWriter: func(w io.Writer) (io.WriteCloser, error) {
		return zstd.NewWriter(w, zstd.WithEncoderLevel(zstd.SpeedDefault), zstd.WithConcurrentBlocks(true))
	},
	NewReader: func(r io.Reader) (io.Reader, func(), error) {
		dec, err := zstd.NewReader(r, zstd.WithDecoderMaxWindow(maxWindow), zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, nil, err
		}
		return dec, dec.Close, nil
	},
}
