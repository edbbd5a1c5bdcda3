package server

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// fileDiagnosis joins the chunks of a diagnosis bundle an agent sent on its
// diagnosis subject (FM_DIAG), checks them against the digest the agent
// gave, opens them (an agent with an instance key seals its bundle), and
// keeps the bundle in fm_diagnosis as <instance>/<command>.tar.gz, sealed
// with FM's key. It returns the command's result naming the object, with
// the bundle's size and digest. The chunks stay until the operation
// settles (dropDiagnosisChunks): an event folded again, its operation's
// end not written, finds the bundle filed and files nothing twice. An
// error that foldAgain takes for the bus's is worth folding again; any
// other fails the operation.
func (s *Server) fileDiagnosis(ctx context.Context, instance, commandID string, raw json.RawMessage) (protocol.DiagnosisResult, error) {
	var d protocol.DiagnosisResult
	if err := json.Unmarshal(raw, &d); err != nil {
		return d, fmt.Errorf("the agent's diagnosis result does not decode: %v", err)
	}
	// Each run of the command sends on a subject of its own (a run cut
	// short by a crash left chunks on its subject): <command>-<run id>.
	want := protocol.DiagSubject(instance, commandID)
	if run, ok := strings.CutPrefix(d.Subject, want+"-"); d.Subject != want && (!ok || !protocol.ValidToken(run)) {
		return d, fmt.Errorf("the agent sent its bundle on %q, not %q", d.Subject, want+"-<run>")
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	store, err := s.js.ObjectStore(ctx, protocol.ObjectStoreDiagnosis)
	if err != nil {
		return d, fmt.Errorf("diagnosis store: %w", err)
	}
	name := instance + "/" + commandID + ".tar.gz"
	if filed, err := s.filedDiagnosis(ctx, store, name); err == nil {
		return filed, nil
	} else if !errors.Is(err, jetstream.ErrObjectNotFound) {
		return d, fmt.Errorf("diagnosis store: %w", err)
	}
	cons, err := s.js.OrderedConsumer(ctx, protocol.StreamDiagnosis, jetstream.OrderedConsumerConfig{FilterSubjects: []string{d.Subject}})
	if err != nil {
		return d, fmt.Errorf("read the bundle: %w", err)
	}
	var buf bytes.Buffer
	for i := 0; i < d.Chunks; i++ {
		m, err := cons.Next(jetstream.FetchMaxWait(10 * time.Second))
		if err != nil {
			// Not the bus's failure to fold again: the chunk is missing.
			return d, fmt.Errorf("read the bundle: chunk %d of %d: %v", i+1, d.Chunks, err)
		}
		buf.Write(m.Data())
	}
	sum := sha256.Sum256(buf.Bytes())
	if int64(buf.Len()) != d.SizeBytes || hex.EncodeToString(sum[:]) != d.SHA256 {
		return d, fmt.Errorf("the bundle is incomplete or damaged: %d bytes, %d expected", buf.Len(), d.SizeBytes)
	}
	var bundle io.Reader = &buf
	if d.Sealed {
		sec, _, err := s.st.secrets.fetch(ctx, instance)
		if err != nil {
			return d, fmt.Errorf("the instance's key: %w", err)
		}
		key, err := base64.StdEncoding.DecodeString(sec.InstanceKey)
		if err != nil || len(key) == 0 {
			return d, errors.New("the bundle is sealed, and the instance has no key to open it with")
		}
		if bundle, err = seal.NewStreamReader(bundle, key, protocol.SealedDiagnosisPlace(instance, commandID)); err != nil {
			return d, fmt.Errorf("the bundle does not open with the instance's key: %v", err)
		}
	}
	// Kept sealed with FM's key, as every secret FM keeps: a bundle holds
	// logs and DSS's settings. Opened as it is stored: a bundle that does
	// not open whole (damaged, or sealed elsewhere) fails the Put, which
	// leaves no object.
	digest, counted := sha256.New(), &countingWriter{}
	pr, pw := io.Pipe()
	go func() {
		w, err := seal.NewStreamWriter(pw, s.cfg.SecretKey, diagnosisPlace(name))
		if err == nil {
			if _, err = io.Copy(w, io.TeeReader(bundle, io.MultiWriter(digest, counted))); err == nil {
				err = w.Close()
			}
		}
		pw.CloseWithError(err)
	}()
	_, err = store.Put(ctx, jetstream.ObjectMeta{Name: name, Description: "diagnosis of " + instance,
		Metadata: map[string]string{diagnosisSealedMeta: "stream"}}, pr)
	pr.CloseWithError(err) // ends the writer, if the Put ended first
	switch {
	case errors.Is(err, seal.ErrStreamBroken):
		return d, fmt.Errorf("the bundle does not open with the instance's key: %v", err)
	case err != nil:
		return d, fmt.Errorf("file the bundle: %w", err)
	}
	return protocol.DiagnosisResult{Object: name, SizeBytes: counted.n, SHA256: hex.EncodeToString(digest.Sum(nil))}, nil
}

// filedDiagnosis is the result naming bundle name, already in store (its
// size and digest read back), or jetstream.ErrObjectNotFound.
func (s *Server) filedDiagnosis(ctx context.Context, store jetstream.ObjectStore, name string) (protocol.DiagnosisResult, error) {
	r, size, err := s.openDiagnosis(ctx, store, name)
	if err != nil {
		return protocol.DiagnosisResult{}, err
	}
	defer r.Close()
	digest := sha256.New()
	if _, err := io.Copy(digest, r); err != nil {
		return protocol.DiagnosisResult{}, fmt.Errorf("read %s: %w", name, err)
	}
	return protocol.DiagnosisResult{Object: name, SizeBytes: size, SHA256: hex.EncodeToString(digest.Sum(nil))}, nil
}

// openDiagnosis opens bundle name of store as it was collected (a bundle
// kept sealed is opened with FM's key), with its size.
func (s *Server) openDiagnosis(ctx context.Context, store jetstream.ObjectStore, name string) (io.ReadCloser, int64, error) {
	obj, err := store.Get(ctx, name)
	if err != nil {
		return nil, 0, err
	}
	info, err := obj.Info()
	if err != nil {
		obj.Close()
		return nil, 0, err
	}
	if info.Metadata[diagnosisSealedMeta] == "" {
		return obj, int64(info.Size), nil // filed by an FM from before
	}
	size := seal.StreamPlainSize(int64(info.Size))
	opened, err := seal.NewStreamReader(obj, s.cfg.SecretKey, diagnosisPlace(name))
	if err == nil && size < 0 {
		err = seal.ErrStreamBroken
	}
	if err != nil {
		obj.Close()
		return nil, 0, fmt.Errorf("%w: %w", errDiagnosisBroken, err)
	}
	return readCloser{opened, obj}, size, nil
}

// errDiagnosisBroken: a bundle kept sealed does not open with FM's key.
var errDiagnosisBroken = errors.New("the diagnosis bundle does not open with FM's key (damaged, or kept by an FM with another secrets.key)")

// countingWriter counts what is written to it.
type countingWriter struct{ n int64 }

func (c *countingWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// dropDiagnosisChunks drops what is left in FM_DIAG of an instance's
// diagnosis bundles, once its collect-diagnosis ended (settle): every
// run's, those cut short too. One left by a server stopped in between
// ages out of the stream in a day.
func (s *Server) dropDiagnosisChunks(ctx context.Context, instance string) {
	st, err := s.js.Stream(ctx, protocol.StreamDiagnosis)
	if err == nil {
		err = st.Purge(ctx, jetstream.WithPurgeSubject(protocol.DiagSubject(instance, "*")))
	}
	if err != nil {
		s.log.Warn().Err(err).Str("instance", instance).Msg("diagnosis chunks not dropped; they age out of FM_DIAG")
	}
}

// diagnosisName checks a bundle's name as GET /instances/{id}/diagnoses/
// {name} takes it: "<command id>.tar.gz", as fileDiagnosis names them, so
// that no name reaches another instance's bundles.
func diagnosisName(id, name string) (string, error) {
	cmd, ok := strings.CutSuffix(name, ".tar.gz")
	if !protocol.ValidToken(id) || !ok || !protocol.ValidToken(cmd) {
		return "", newAPIError(protocol.CodeNotFound, "No such diagnosis",
			"%q is not a diagnosis bundle of an instance (<command id>.tar.gz)", name)
	}
	return id + "/" + name, nil
}

// listDiagnoses serves GET /instances/{id}/diagnoses (FM's own): the
// instance's bundles in fm_diagnosis, newest first (they expire after the
// store's retention, 7 days by default). The instance may be gone: its
// bundles stay until they expire.
func (s *Server) listDiagnoses(r *http.Request) (any, error) {
	id := r.PathValue("id")
	if !protocol.ValidToken(id) {
		return nil, notFound(kindInstance, id)
	}
	store, err := s.js.ObjectStore(r.Context(), protocol.ObjectStoreDiagnosis)
	if err != nil {
		return nil, unavailable(err, "the diagnosis store cannot be read")
	}
	infos, err := store.List(r.Context())
	if err != nil && !errors.Is(err, jetstream.ErrNoObjectsFound) {
		return nil, unavailable(err, "the diagnosis store cannot be read")
	}
	out := []api.Diagnosis{}
	for _, info := range infos {
		name, ok := strings.CutPrefix(info.Name, id+"/")
		if !ok || info.Deleted {
			continue
		}
		size := int64(info.Size)
		if info.Metadata[diagnosisSealedMeta] != "" {
			size = max(seal.StreamPlainSize(size), 0)
		}
		out = append(out, api.Diagnosis{Name: name, SizeBytes: size, CreatedAt: info.ModTime.UTC()})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].CreatedAt.After(out[j].CreatedAt) })
	return out, nil
}

// getDiagnosis serves GET /instances/{id}/diagnoses/{name}: the bundle
// itself (application/gzip), streamed from fm_diagnosis and opened.
func (s *Server) getDiagnosis(r *http.Request) (any, error) {
	id := r.PathValue("id")
	object, err := diagnosisName(id, r.PathValue("name"))
	if err != nil {
		return nil, err
	}
	store, err := s.js.ObjectStore(r.Context(), protocol.ObjectStoreDiagnosis)
	if err != nil {
		return nil, unavailable(err, "the diagnosis store cannot be read")
	}
	body, size, err := s.openDiagnosis(r.Context(), store, object)
	switch {
	case errors.Is(err, jetstream.ErrObjectNotFound):
		return nil, newAPIError(protocol.CodeNotFound, "No such diagnosis",
			"instance %s has no diagnosis bundle %s (bundles expire after 7 days; see GET /instances/%s/diagnoses)", id, r.PathValue("name"), id)
	case errors.Is(err, errDiagnosisBroken):
		return nil, newAPIError(protocol.CodeDataLoss, "Diagnosis unreadable", "%v", err)
	case err != nil:
		return nil, unavailable(err, "the diagnosis bundle cannot be read")
	}
	return &fileDownload{name: id + "-" + r.PathValue("name"), contentType: "application/gzip", size: size, body: body}, nil
}

// diagnosisSealedMeta marks a bundle kept sealed with FM's key (those
// filed before were kept as they came).
const diagnosisSealedMeta = "fm-sealed"

// diagnosisPlace is where a bundle kept in fm_diagnosis (its object name)
// belongs, sealed.
func diagnosisPlace(object string) string { return protocol.ObjectStoreDiagnosis + "/" + object }

// readCloser reads from one and closes the other.
type readCloser struct {
	io.Reader
	io.Closer
}

// admitStored tells the relay of what agents store (natsauth.Relay)
// whether to store a message of size bytes an agent sent on subject.
// Diagnosis chunks are taken only for the collect-diagnosis of their
// instance under way, on its command's subjects, and only so many bytes
// (diagBytesPerOperation): FM_DIAG is shared by every instance, and an
// agent could otherwise fill it on subjects of its own making and push out
// the chunks of another's bundle not yet filed. Everything else an agent
// may send is stored: its permissions already narrowed it to its own
// subjects, and the streams' limits to its share.
//
// It decides on the copies of the instance's lifecycle and operations,
// which every fm server keeps in memory. A copy may lag behind the
// operation's claim for a moment (the agent answers its command at once):
// then, and only then, the buckets are read, at most once a second per
// instance, so that chunks sent for nothing cost the bus nothing. A chunk
// refused is not answered, and the agent sends it again.
func (s *Server) admitStored(ctx context.Context, subject string, size int) bool {
	instance := protocol.InstanceFromSubject(subject)
	run, ok := strings.CutPrefix(subject, protocol.DiagSubject(instance, ""))
	if instance == "" || !ok {
		return true
	}
	collecting := func(lc lifecycle, op opRecord) bool {
		return lc.OpID == op.JobID && op.Kind == opDiagnosis && op.State == api.OpRunning && op.Instance == instance &&
			op.CommandID != "" && (run == op.CommandID || strings.HasPrefix(run, op.CommandID+"-"))
	}
	lc, _, ok := s.st.lifecycle.get(instance)
	if !ok || lc.OpID == "" {
		return false
	}
	op, _, found := s.st.ops.get(lc.OpID)
	if !found || !collecting(lc, op) {
		if !s.diagLookups.allow(instance, time.Now()) {
			return false
		}
		var err error
		if lc, _, err = s.st.lifecycle.fetch(ctx, instance); err != nil || lc.OpID == "" {
			return false
		}
		if op, _, err = s.st.ops.fetch(ctx, lc.OpID); err != nil || !collecting(lc, op) {
			return false
		}
	}
	return s.diagChunks.take(op.JobID, size, func(job string) bool {
		op, _, ok := s.st.ops.get(job)
		return ok && op.State == api.OpRunning
	})
}

// diagBytesPerOperation bounds the diagnosis chunks stored for one
// collect-diagnosis, all its runs together: a bundle is at most 34 files of
// 8 MiB (the agent's bounds) compressed, about 272 MiB; 320 MiB leaves room
// for a run cut short. Each fm server counts what it relays, from its
// start: with N replicas, N times as much at most. What is left when the
// operation ends is dropped (dropDiagnosisChunks).
const diagBytesPerOperation = 320 << 20

// diagBudget counts the bytes of diagnosis chunks relayed per operation.
type diagBudget struct {
	mu   sync.Mutex
	used map[string]int // operation id -> bytes
}

// take counts a chunk of size bytes of operation job if its budget allows
// it. Counts of operations that no longer run (running says which do) go
// once there are more than a few.
func (b *diagBudget) take(job string, size int, running func(job string) bool) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.used == nil {
		b.used = map[string]int{}
	}
	if _, counted := b.used[job]; !counted && len(b.used) >= 64 {
		for j := range b.used {
			if !running(j) {
				delete(b.used, j)
			}
		}
	}
	if b.used[job]+size > diagBytesPerOperation {
		return false
	}
	b.used[job] += size
	return true
}

// diagnosisFilers is how many diagnosis bundles a server files at once,
// beside its folding.
const diagnosisFilers = 2

// diagnosisFiler files diagnosis bundles (up to hundreds of MiB read and
// stored each) beside the folding of events, so that every other
// instance's events do not wait for one.
type diagnosisFiler struct {
	s       *Server
	slots   chan struct{}
	running sync.WaitGroup

	mu       sync.Mutex
	inFlight map[string]uint64 // command id -> stream sequence of the result being filed
}

func newDiagnosisFiler(s *Server) *diagnosisFiler {
	return &diagnosisFiler{s: s, slots: make(chan struct{}, diagnosisFilers), inFlight: map[string]uint64{}}
}

// diagnosisWait is how long a diagnosis result waits, handed back, for a
// filer to be free.
const diagnosisWait = 10 * time.Second

// file folds m, the result of collect-diagnosis command cmd, in the
// background. With every filer busy it is handed back for later, not
// waited for: the folding goes on. Another copy of a result being filed
// takes no filer: a redelivery of the same message is handed back (the
// first's outcome settles it), and one published again by the agent is
// dropped (the first's outcome stands; an agent sending its result over
// and over must not fill the events handed out, which the fleet shares).
func (f *diagnosisFiler) file(ctx context.Context, m jetstream.Msg, cmd string) {
	md, err := m.Metadata()
	if err != nil {
		_ = m.NakWithDelay(diagnosisWait)
		return
	}
	seq := md.Sequence.Stream
	f.mu.Lock()
	filing, busy := f.inFlight[cmd]
	if !busy {
		select {
		case f.slots <- struct{}{}:
			f.inFlight[cmd] = seq
		default:
			f.mu.Unlock()
			_ = m.NakWithDelay(diagnosisWait)
			return
		}
	}
	f.mu.Unlock()
	switch {
	case busy && filing == seq:
		_ = m.NakWithDelay(diagnosisWait)
		return
	case busy:
		_ = m.Ack()
		return
	}
	// The event stays this server's while it is filed, however long that
	// takes: another server would file it a second time.
	_ = m.InProgress()
	_, kept := bus.KeepInProgress(ctx, m, eventsAckWait/3)
	f.running.Add(1)
	go func() {
		defer f.running.Done()
		ferr := f.s.foldEvent(withoutWriteRetries(ctx), m.Subject(), m.Data())
		kept()
		f.s.settleEvent(ctx, m, ferr)
		f.mu.Lock()
		delete(f.inFlight, cmd)
		f.mu.Unlock()
		<-f.slots
	}()
}

// wait returns once every filing started has ended (and its event been
// acknowledged or handed back).
func (f *diagnosisFiler) wait() { f.running.Wait() }

// filesDiagnosis says whether folding the event on subject would file a
// diagnosis bundle, and of which command: the answer of an instance's
// running collect-diagnosis command, as the server's copy of its operations
// knows it. Any other event, and one the copy does not know yet, is folded
// in line.
func (s *Server) filesDiagnosis(subject string, data []byte) (string, bool) {
	if protocol.EventKindFromSubject(subject) != protocol.EventCommand || !bytes.Contains(data, []byte(protocol.CommandCollectDiagnosis)) {
		return "", false
	}
	var e protocol.Event
	if protocol.Decode(data, &e) != nil || e.Step != string(protocol.CommandCollectDiagnosis) || e.Status == protocol.StatusFailed {
		return "", false
	}
	id := protocol.InstanceFromSubject(subject)
	opID := e.OpID
	if lc, _, ok := s.st.lifecycle.get(id); ok && lc.OpID != "" {
		opID = lc.OpID
	}
	op, _, ok := s.st.ops.get(opID)
	return op.CommandID, ok && op.State == api.OpRunning && op.CommandID != "" && e.CommandID == op.CommandID && op.Instance == id
}
