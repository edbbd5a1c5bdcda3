package agent

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
)

// Log shipping bounds: what is held while the bus is away, and the largest
// message on FM_LOGS.
const (
	maxPendingLogs = 1 << 20
	maxLogMessage  = 64 << 10
)

// logShipper sends log lines to FM_LOGS (fm.log.<instance>.<source>). While
// the bus is away it holds at most maxPendingLogs bytes, dropping the oldest
// and saying how much it dropped.
type logShipper struct {
	instance string
	nc       *nats.Conn
	log      zerolog.Logger

	mu      sync.Mutex
	pending []logChunk
	size    int
	dropped int
	wake    chan struct{}
}

type logChunk struct {
	source string
	data   []byte
}

func newLogShipper(instance string, log zerolog.Logger) *logShipper {
	return &logShipper{instance: instance, log: log, wake: make(chan struct{}, 1)}
}

// add queues log text from a source.
func (s *logShipper) add(source string, p []byte) {
	if len(p) == 0 {
		return
	}
	s.mu.Lock()
	s.pending = append(s.pending, logChunk{source: source, data: append([]byte(nil), p...)})
	s.size += len(p)
	for s.size > maxPendingLogs && len(s.pending) > 1 {
		s.size -= len(s.pending[0].data)
		s.dropped += len(s.pending[0].data)
		s.pending = s.pending[1:]
	}
	full := s.size > maxLogMessage
	s.mu.Unlock()
	if full {
		select {
		case s.wake <- struct{}{}:
		default:
		}
	}
}

// sourceWriter is an io.Writer for one source, for the agent's own log.
type sourceWriter struct {
	s      *logShipper
	source string
}

func (w sourceWriter) Write(p []byte) (int, error) {
	w.s.add(w.source, p)
	return len(p), nil
}

// run sends what is pending every second (or sooner when a lot is), while
// connected.
func (s *logShipper) run(ctx context.Context, nc *nats.Conn) {
	s.nc = nc
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			s.flush()
			return
		case <-tick.C:
		case <-s.wake:
		}
		s.flush()
	}
}

func (s *logShipper) flush() {
	if s.nc == nil || !s.nc.IsConnected() {
		return
	}
	s.mu.Lock()
	pending, dropped := s.pending, s.dropped
	s.pending, s.size, s.dropped = nil, 0, 0
	s.mu.Unlock()
	if dropped > 0 {
		pending = append([]logChunk{{source: protocol.LogSourceAgent, data: []byte(`{"level":"warn","message":"` +
			strconv.Itoa(dropped) + ` bytes of logs were dropped while the bus was away"}` + "\n")}}, pending...)
	}
	// Coalesce consecutive chunks of a source into messages of bounded size.
	var buf bytes.Buffer
	source := ""
	send := func() {
		if buf.Len() > 0 {
			_ = s.nc.Publish(protocol.LogSubject(s.instance, source), append([]byte(nil), buf.Bytes()...))
			buf.Reset()
		}
	}
	for _, c := range pending {
		// FM_LOGS refuses larger messages (bus/topology.go).
		for data := c.data; len(data) > 0; {
			if c.source != source || buf.Len() == maxLogMessage {
				send()
				source = c.source
			}
			n := min(len(data), maxLogMessage-buf.Len())
			buf.Write(data[:n])
			data = data[n:]
		}
	}
	send()
}

// tail ships what is appended to the file at path, from where the last run
// left off (kept in the offsets file), following truncation and rotation.
// open opens the file for reading (openDSSFile for DSS's log, which the DSS
// account may replace with anything). Of a file that grew by more than the
// shipper holds (maxPendingLogs), only that much of its end is read.
func (s *logShipper) tail(ctx context.Context, source, path, offsetFile string, open func(string) (*os.File, error)) {
	var offsets map[string]int64
	if _, err := loadJSON(offsetFile, &offsets); err != nil || offsets == nil {
		offsets = map[string]int64{}
	}
	off := offsets[path]
	lastSave := time.Now()
	buf := make([]byte, 256<<10)
	for {
		if f, err := open(path); err == nil {
			if st, err := f.Stat(); err == nil {
				if st.Size() < off {
					off = 0 // truncated or replaced
				}
				if st.Size()-off > maxPendingLogs {
					s.add(protocol.LogSourceAgent, []byte(`{"level":"warn","message":"`+strconv.FormatInt(st.Size()-maxPendingLogs-off, 10)+
						` bytes of the `+source+` log were skipped: it grew by more than the agent holds"}`+"\n"))
					off = st.Size() - maxPendingLogs
				}
				for off < st.Size() {
					n, err := f.ReadAt(buf[:min(int64(len(buf)), st.Size()-off)], off)
					if n > 0 {
						s.add(source, buf[:n])
						off += int64(n)
					}
					if err != nil {
						break
					}
				}
			}
			f.Close()
		}
		if time.Since(lastSave) > 10*time.Second && offsets[path] != off {
			offsets[path] = off
			_ = saveJSON(offsetFile, offsets, 0o600)
			lastSave = time.Now()
		}
		select {
		case <-ctx.Done():
			offsets[path] = off
			_ = saveJSON(offsetFile, offsets, 0o600)
			return
		case <-time.After(time.Second):
		}
	}
}

// rotatingFile is the agent's own log file, kept under maxSize by moving it
// to <name>.1.
type rotatingFile struct {
	mu      sync.Mutex
	path    string
	f       *os.File
	size    int64
	maxSize int64
}

func openRotating(path string, maxSize int64) (*rotatingFile, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, err
	}
	st, _ := f.Stat()
	return &rotatingFile{path: path, f: f, size: st.Size(), maxSize: maxSize}, nil
}

func (r *rotatingFile) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.f == nil {
		return len(p), nil
	}
	if r.size+int64(len(p)) > r.maxSize {
		r.f.Close()
		_ = os.Rename(r.path, r.path+".1")
		f, err := os.OpenFile(r.path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
		if err != nil {
			r.f = nil
			return 0, err
		}
		r.f, r.size = f, 0
	}
	n, err := r.f.Write(p)
	r.size += int64(n)
	return n, err
}

func (r *rotatingFile) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.f == nil {
		return nil
	}
	err := r.f.Close()
	r.f = nil
	return err
}

var _ io.Writer = (*rotatingFile)(nil)
