package seal

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"testing"
	"testing/iotest"
)

func sealStream(t *testing.T, key []byte, where string, plain []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	w, err := NewStreamWriter(&buf, key, where)
	if err != nil {
		t.Fatal(err)
	}
	// In uneven writes, across chunk boundaries.
	for rest := plain; len(rest) > 0; {
		n := min(len(rest), 1000+len(rest)%70000)
		if _, err := w.Write(rest[:n]); err != nil {
			t.Fatal(err)
		}
		rest = rest[n:]
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func openStream(key []byte, where string, sealed []byte) ([]byte, error) {
	r, err := NewStreamReader(bytes.NewReader(sealed), key, where)
	if err != nil {
		return nil, err
	}
	return io.ReadAll(r)
}

func TestStreamRoundTrip(t *testing.T) {
	key := NewKey()
	for _, size := range []int{0, 1, streamChunkSize - 1, streamChunkSize, streamChunkSize + 1, 3*streamChunkSize + 17} {
		plain := bytes.Repeat([]byte("DSS license 12345 "), size/18+1)[:size]
		sealed := sealStream(t, key, "in-a/snap-1", plain)
		if size > 20 && bytes.Contains(sealed, plain[:20]) {
			t.Fatalf("%d bytes: the plaintext is in the sealed stream", size)
		}
		got, err := openStream(key, "in-a/snap-1", sealed)
		if err != nil || !bytes.Equal(got, plain) {
			t.Fatalf("%d bytes: opened %d bytes, %v", size, len(got), err)
		}
		if got := StreamPlainSize(int64(len(sealed))); got != int64(size) {
			t.Fatalf("%d bytes sealed in %d: StreamPlainSize says %d", size, len(sealed), got)
		}
	}
	if got := StreamPlainSize(10); got != -1 {
		t.Fatalf("StreamPlainSize of 10 bytes: %d", got)
	}
}

// TestStreamRefusesTampering: a stream opens only whole, in order, with its
// key, where it belongs.
func TestStreamRefusesTampering(t *testing.T) {
	key := NewKey()
	plain := bytes.Repeat([]byte{7}, 2*streamChunkSize+100)
	sealed := sealStream(t, key, "in-a/snap-1", plain)
	head := len(streamMagic) + streamSaltSize
	chunk := streamChunkSize + 16
	swapped := append([]byte{}, sealed[:head]...)
	swapped = append(swapped, sealed[head+chunk:head+2*chunk]...)
	swapped = append(swapped, sealed[head:head+chunk]...)
	swapped = append(swapped, sealed[head+2*chunk:]...)
	flipped := append([]byte{}, sealed...)
	flipped[head+10] ^= 1
	tests := []struct {
		name   string
		key    []byte
		where  string
		sealed []byte
	}{
		{"another key", NewKey(), "in-a/snap-1", sealed},
		{"another place", key, "in-b/snap-1", sealed},
		{"cut at a chunk's end", key, "in-a/snap-1", sealed[:head+2*chunk]},
		{"cut inside a chunk", key, "in-a/snap-1", sealed[:len(sealed)-5]},
		{"chunks swapped", key, "in-a/snap-1", swapped},
		{"a bit flipped", key, "in-a/snap-1", flipped},
		{"not sealed", key, "in-a/snap-1", []byte("plain tar bytes, long enough to read a header from")},
		{"bytes appended", key, "in-a/snap-1", append(append([]byte{}, sealed...), 1, 2, 3)},
		{"the header alone", key, "in-a/snap-1", sealed[:head]},
		{"the last full chunk dropped", key, "in-a/snap-1", sealed[:head+chunk]},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := openStream(tc.key, tc.where, tc.sealed); !errors.Is(err, ErrStreamBroken) {
				t.Fatalf("opened, or another error: %v", err)
			}
		})
	}
}

// failingReader gives its data, then err instead of io.EOF.
type failingReader struct {
	data []byte
	err  error
}

func (f *failingReader) Read(p []byte) (int, error) {
	if len(f.data) == 0 {
		return 0, f.err
	}
	n := copy(p, f.data)
	f.data = f.data[n:]
	return n, nil
}

// TestStreamPassesReadErrorsOn: an error of the reader under the stream,
// even one wrapping io.ErrUnexpectedEOF, is given back as it is, never taken
// for the stream's end, and again on every later read.
func TestStreamPassesReadErrorsOn(t *testing.T) {
	key := NewKey()
	sealed := sealStream(t, key, "w", bytes.Repeat([]byte{1}, 3*streamChunkSize))
	cause := fmt.Errorf("read archive: %w", io.ErrUnexpectedEOF)
	for _, at := range []int{4, len(streamMagic) + streamSaltSize + 10, len(sealed) / 2, len(sealed) - 1} {
		r, err := NewStreamReader(&failingReader{data: sealed[:at], err: cause}, key, "w")
		if err == nil {
			_, err = io.ReadAll(r)
			if _, again := r.Read(make([]byte, 10)); again != err {
				t.Fatalf("cut at %d: %v, then %v", at, err, again)
			}
		}
		if err != cause {
			t.Fatalf("cut at %d: %v, want the reader's error", at, err)
		}
	}
	// Readers that give little at a time still open it.
	for name, r := range map[string]io.Reader{
		"one byte at a time": iotest.OneByteReader(bytes.NewReader(sealed)),
		"half at a time":     iotest.HalfReader(bytes.NewReader(sealed)),
		"EOF with the data":  iotest.DataErrReader(bytes.NewReader(sealed)),
	} {
		sr, err := NewStreamReader(r, key, "w")
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if got, err := io.ReadAll(sr); err != nil || len(got) != 3*streamChunkSize {
			t.Fatalf("%s: %d bytes, %v", name, len(got), err)
		}
	}
}

// TestStreamWriterEnds: a zero-length write is nothing, Close twice is
// once, a write after Close fails, and a failing writer's error sticks.
func TestStreamWriterEnds(t *testing.T) {
	key := NewKey()
	var buf bytes.Buffer
	w, err := NewStreamWriter(&buf, key, "w")
	if err != nil {
		t.Fatal(err)
	}
	if n, err := w.Write(nil); n != 0 || err != nil {
		t.Fatalf("empty write: %d %v", n, err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	size := buf.Len()
	if err := w.Close(); err != nil || buf.Len() != size {
		t.Fatalf("Close again: %v, %d bytes more", err, buf.Len()-size)
	}
	if _, err := w.Write([]byte("late")); err == nil {
		t.Fatal("a write after Close succeeded")
	}
	if got, err := openStream(key, "w", buf.Bytes()); err != nil || len(got) != 0 {
		t.Fatalf("the empty stream: %q %v", got, err)
	}
	broken := errors.New("disk full")
	fw, err := NewStreamWriter(&limitedWriter{left: 100, err: broken}, key, "w")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fw.Write(make([]byte, 2*streamChunkSize)); err != broken {
		t.Fatalf("write on a failing writer: %v", err)
	}
	if err := fw.Close(); err != broken {
		t.Fatalf("Close on a failing writer: %v", err)
	}
}

type limitedWriter struct {
	left int
	err  error
}

func (l *limitedWriter) Write(p []byte) (int, error) {
	if len(p) > l.left {
		return 0, l.err
	}
	l.left -= len(p)
	return len(p), nil
}
