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
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// Log shipping bounds: what is held while the bus is away, and the largest
// message on FM_LOGS.
const (
	maxPendingLogs = 1 << 20
	maxLogMessage  = 64 << 10
)

// logShipper sends log lines to FM_LOGS (fm.log.<instance>.<source>). A
// message leaves it only once the bus stored it: one the bus did not
// acknowledge (a node lost, a stream electing its leader) is sent again at
// the next flush under the same message id, so that the bus keeps it once.
// While the bus does not take them it holds at most maxPendingLogs bytes
// not yet made into messages and as much made into messages, dropping the
// oldest of each and saying how much it dropped.
type logShipper struct {
	instance string
	js       jetstream.JetStream
	log      zerolog.Logger
	// run tells this run's message ids apart from an earlier run's.
	runID string

	mu      sync.Mutex
	pending []logChunk
	size    int
	dropped int
	wake    chan struct{}

	// unsent are the messages made of pending chunks and not yet stored,
	// in order; only the shipping goroutine touches them.
	unsent     []logMessage
	unsentSize int
	seq        uint64
}

type logChunk struct {
	source string
	data   []byte
}

// logMessage is one FM_LOGS message, with the id it keeps until stored.
type logMessage struct {
	subject, id string
	data        []byte
}

func newLogShipper(instance string, log zerolog.Logger) *logShipper {
	return &logShipper{instance: instance, log: log, runID: protocol.NewID("lg"), wake: make(chan struct{}, 1)}
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
// connected, and once more (for a moment) when ctx ends.
func (s *logShipper) run(ctx context.Context, js jetstream.JetStream) {
	s.js = js
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			last, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
			s.flush(last)
			cancel()
			return
		case <-tick.C:
		case <-s.wake:
		}
		s.flush(ctx)
	}
}

// logPublishTimeout bounds the wait for the bus to store one message.
const logPublishTimeout = 5 * time.Second

// flush makes messages of what is pending and sends the messages not yet
// stored, in order, until one is not acknowledged: it and those after it
// are sent again next time.
func (s *logShipper) flush(ctx context.Context) {
	if s.js == nil || !s.js.Conn().IsConnected() {
		return
	}
	s.mu.Lock()
	pending, dropped := s.pending, s.dropped
	s.pending, s.size, s.dropped = nil, 0, 0
	s.mu.Unlock()
	if dropped > 0 {
		pending = append([]logChunk{{source: protocol.LogSourceAgent, data: []byte(`{"level":"warn","message":"` +
			strconv.Itoa(dropped) + ` bytes of logs were dropped while the bus did not take them"}` + "\n")}}, pending...)
	}
	s.queue(pending)
	for len(s.unsent) > 0 {
		m := s.unsent[0]
		pctx, cancel := context.WithTimeout(ctx, logPublishTimeout)
		_, err := s.js.Publish(pctx, m.subject, m.data, jetstream.WithMsgID(m.id))
		cancel()
		if err != nil {
			return // not logged: this log would be shipped too, and fail alike
		}
		s.unsent, s.unsentSize = s.unsent[1:], s.unsentSize-len(m.data)
	}
}

// queue makes messages of bounded size of the chunks, consecutive chunks
// of a source together, behind those not yet stored; past maxPendingLogs,
// the oldest are dropped (and said to be, next time).
func (s *logShipper) queue(chunks []logChunk) {
	var buf bytes.Buffer
	source := ""
	add := func() {
		if buf.Len() > 0 {
			s.seq++
			s.unsent = append(s.unsent, logMessage{subject: protocol.LogSubject(s.instance, source),
				id: s.runID + "-" + strconv.FormatUint(s.seq, 10), data: bytes.Clone(buf.Bytes())})
			s.unsentSize += buf.Len()
			buf.Reset()
		}
	}
	for _, c := range chunks {
		// FM_LOGS refuses larger messages (bus/topology.go).
		for data := c.data; len(data) > 0; {
			if c.source != source || buf.Len() == maxLogMessage {
				add()
				source = c.source
			}
			n := min(len(data), maxLogMessage-buf.Len())
			buf.Write(data[:n])
			data = data[n:]
		}
	}
	add()
	for s.unsentSize > maxPendingLogs && len(s.unsent) > 1 {
		s.unsentSize -= len(s.unsent[0].data)
		s.mu.Lock()
		s.dropped += len(s.unsent[0].data)
		s.mu.Unlock()
		s.unsent = s.unsent[1:]
	}
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
