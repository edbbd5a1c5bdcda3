package seal

import (
	"bufio"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// streamMagic begins a sealed stream (NewStreamWriter): what is sealed too
// large to hold in memory, such as a snapshot archive. After it come a
// random salt, from which and the key and where the stream belongs a key of
// the stream's own is derived (HKDF-SHA256), then chunks of 64 KiB of
// plaintext sealed with AES-256-GCM, each under a nonce of its number and
// a flag on the last (the STREAM construction): a stream cut short, with
// chunks moved, or moved to where it does not belong, does not open.
const streamMagic = "FMSEALS1"

// StreamMagic is what a sealed stream begins with.
func StreamMagic() []byte { return []byte(streamMagic) }

const (
	streamSaltSize  = 16
	streamChunkSize = 64 << 10
)

// ErrStreamBroken is a sealed stream that does not open: another key,
// another place, damaged, or cut short.
var ErrStreamBroken = errors.New("seal: the sealed stream does not open (another key or place, damaged, or cut short)")

func streamAEAD(key, salt []byte, where string) (cipher.AEAD, error) {
	sub, err := hkdf.Key(sha256.New, key, salt, "fm sealed stream "+where, 32)
	if err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(sub)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

func streamNonce(n uint64, last bool) []byte {
	nonce := make([]byte, 12)
	binary.BigEndian.PutUint64(nonce[3:11], n)
	if last {
		nonce[11] = 1
	}
	return nonce
}

type streamWriter struct {
	w      io.Writer
	aead   cipher.AEAD
	buf    []byte // plaintext of the chunk being filled
	sealed []byte // the chunk sealed, reused
	n      uint64
	err    error // sticky: the first error, or errClosed
}

var errClosed = errors.New("seal: write to a closed stream")

// NewStreamWriter seals what is written to it into w, for where it belongs
// (e.g. the archive's name); Close seals the last chunk and must be called.
func NewStreamWriter(w io.Writer, key []byte, where string) (io.WriteCloser, error) {
	if len(key) != 32 {
		return nil, fmt.Errorf("seal: the key must be 32 bytes, not %d", len(key))
	}
	salt := make([]byte, streamSaltSize)
	if _, err := rand.Read(salt); err != nil {
		return nil, err
	}
	aead, err := streamAEAD(key, salt, where)
	if err != nil {
		return nil, err
	}
	if _, err := w.Write(append([]byte(streamMagic), salt...)); err != nil {
		return nil, err
	}
	return &streamWriter{w: w, aead: aead, buf: make([]byte, 0, streamChunkSize)}, nil
}

func (s *streamWriter) Write(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	written := 0
	for len(p) > 0 {
		if len(s.buf) == streamChunkSize {
			// Full, and more follows: not the last chunk.
			if s.err = s.flush(false); s.err != nil {
				return written, s.err
			}
		}
		k := copy(s.buf[len(s.buf):streamChunkSize], p)
		s.buf = s.buf[:len(s.buf)+k]
		p, written = p[k:], written+k
	}
	return written, nil
}

func (s *streamWriter) flush(last bool) error {
	s.sealed = s.aead.Seal(s.sealed[:0], streamNonce(s.n, last), s.buf, nil)
	s.n++
	s.buf = s.buf[:0]
	n, err := s.w.Write(s.sealed)
	if err == nil && n < len(s.sealed) {
		err = io.ErrShortWrite
	}
	return err
}

// Close seals the last chunk; closed again, it does nothing.
func (s *streamWriter) Close() error {
	if s.err == errClosed {
		return nil
	}
	if s.err != nil {
		return s.err
	}
	if s.err = s.flush(true); s.err != nil {
		return s.err
	}
	s.err = errClosed
	return nil
}

type streamReader struct {
	r    *bufio.Reader
	aead cipher.AEAD
	n    uint64
	buf  []byte // sealed chunk, opened in place
	out  []byte // what is opened and not yet read (in buf)
	done bool
	err  error // sticky
}

// NewStreamReader opens the sealed stream r for where it belongs. Its reads
// fail with ErrStreamBroken for a stream that does not open, also one cut
// short: nothing of a chunk is given before the chunk is opened whole.
func NewStreamReader(r io.Reader, key []byte, where string) (io.Reader, error) {
	if len(key) != 32 {
		return nil, fmt.Errorf("seal: the key must be 32 bytes, not %d", len(key))
	}
	head := make([]byte, len(streamMagic)+streamSaltSize)
	if _, err := io.ReadFull(r, head); err == io.EOF || err == io.ErrUnexpectedEOF {
		return nil, ErrStreamBroken
	} else if err != nil {
		return nil, err // the reader's: it may pass
	}
	if string(head[:len(streamMagic)]) != streamMagic {
		return nil, ErrStreamBroken
	}
	aead, err := streamAEAD(key, head[len(streamMagic):], where)
	if err != nil {
		return nil, err
	}
	return &streamReader{r: bufio.NewReaderSize(r, streamChunkSize+aead.Overhead()+1), aead: aead,
		buf: make([]byte, streamChunkSize+aead.Overhead())}, nil
}

func (s *streamReader) Read(p []byte) (int, error) {
	for len(s.out) == 0 {
		if s.err != nil {
			return 0, s.err
		}
		if s.done {
			return 0, io.EOF
		}
		n, err := io.ReadFull(s.r, s.buf)
		last := false
		// Only the reader's own end of data ends the stream: any other
		// error is passed on as it is (it may pass), never taken for an end.
		switch {
		case err == io.EOF || err == io.ErrUnexpectedEOF:
			last = true // short: the last chunk
		case err != nil:
			s.err = err
			return 0, err
		default:
			if _, perr := s.r.Peek(1); perr == io.EOF {
				last = true // full, and nothing follows
			} else if perr != nil {
				s.err = perr
				return 0, perr
			}
		}
		plain, oerr := s.aead.Open(s.buf[:0], streamNonce(s.n, last), s.buf[:n], nil)
		if oerr != nil {
			s.err = ErrStreamBroken
			return 0, s.err
		}
		s.n++
		s.out, s.done = plain, last
	}
	k := copy(p, s.out)
	s.out = s.out[k:]
	return k, nil
}

// StreamPlainSize is the size of what a sealed stream of sealed bytes
// opens to (-1 if no stream has that size): a listing can say it without
// opening the stream.
func StreamPlainSize(sealed int64) int64 {
	const head, sealedChunk = int64(len(streamMagic) + streamSaltSize), int64(streamChunkSize + 16) // AES-GCM's tag
	body := sealed - head
	if body < 16 {
		return -1
	}
	chunks := (body + sealedChunk - 1) / sealedChunk
	return body - 16*chunks
}
