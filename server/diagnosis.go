package server

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// fileDiagnosis joins the chunks of a diagnosis bundle an agent sent on its
// diagnosis subject (FM_DIAG) into the fm_diagnosis object
// <instance>/<command>.tar.gz, checks it against the digest the agent gave,
// and drops the chunks. It returns the command's result naming the object.
func (s *Server) fileDiagnosis(ctx context.Context, instance, commandID string, raw json.RawMessage) (protocol.DiagnosisResult, error) {
	var d protocol.DiagnosisResult
	if err := json.Unmarshal(raw, &d); err != nil {
		return d, fmt.Errorf("the agent's diagnosis result does not decode: %w", err)
	}
	// Each run of the command sends on a subject of its own (a run cut
	// short by a crash left chunks on its subject): <command>-<run id>.
	want := protocol.DiagSubject(instance, commandID)
	if run, ok := strings.CutPrefix(d.Subject, want+"-"); d.Subject != want && (!ok || !protocol.ValidToken(run)) {
		return d, fmt.Errorf("the agent sent its bundle on %q, not %q", d.Subject, want+"-<run>")
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cons, err := s.js.OrderedConsumer(ctx, protocol.StreamDiagnosis, jetstream.OrderedConsumerConfig{FilterSubjects: []string{d.Subject}})
	if err != nil {
		return d, fmt.Errorf("read the bundle: %w", err)
	}
	var buf bytes.Buffer
	for i := 0; i < d.Chunks; i++ {
		m, err := cons.Next(jetstream.FetchMaxWait(10 * time.Second))
		if err != nil {
			return d, fmt.Errorf("read the bundle: chunk %d of %d: %w", i+1, d.Chunks, err)
		}
		buf.Write(m.Data())
	}
	sum := sha256.Sum256(buf.Bytes())
	if int64(buf.Len()) != d.SizeBytes || hex.EncodeToString(sum[:]) != d.SHA256 {
		return d, fmt.Errorf("the bundle is incomplete or damaged: %d bytes, %d expected", buf.Len(), d.SizeBytes)
	}
	store, err := s.js.ObjectStore(ctx, protocol.ObjectStoreDiagnosis)
	if err != nil {
		return d, fmt.Errorf("diagnosis store: %w", err)
	}
	name := instance + "/" + commandID + ".tar.gz"
	if _, err := store.Put(ctx, jetstream.ObjectMeta{Name: name, Description: "diagnosis of " + instance}, &buf); err != nil {
		return d, fmt.Errorf("file the bundle: %w", err)
	}
	if st, err := s.js.Stream(ctx, protocol.StreamDiagnosis); err == nil {
		if err := st.Purge(ctx, jetstream.WithPurgeSubject(d.Subject)); err != nil {
			s.log.Warn().Err(err).Str("subject", d.Subject).Msg("diagnosis chunks not dropped; they age out of FM_DIAG")
		}
	}
	d.Subject, d.Chunks, d.Object = "", 0, name
	return d, nil
}
