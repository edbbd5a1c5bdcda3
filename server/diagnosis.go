package server

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/fleetmanager/fm/api"
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
		out = append(out, api.Diagnosis{Name: name, SizeBytes: int64(info.Size), CreatedAt: info.ModTime.UTC()})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].CreatedAt.After(out[j].CreatedAt) })
	return out, nil
}

// getDiagnosis serves GET /instances/{id}/diagnoses/{name}: the bundle
// itself (application/gzip), streamed from fm_diagnosis.
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
	obj, err := store.Get(r.Context(), object)
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		return nil, newAPIError(protocol.CodeNotFound, "No such diagnosis",
			"instance %s has no diagnosis bundle %s (bundles expire after 7 days; see GET /instances/%s/diagnoses)", id, r.PathValue("name"), id)
	}
	if err != nil {
		return nil, unavailable(err, "the diagnosis bundle cannot be read")
	}
	info, err := obj.Info()
	if err != nil {
		obj.Close()
		return nil, unavailable(err, "the diagnosis bundle cannot be read")
	}
	return &fileDownload{name: id + "-" + r.PathValue("name"), contentType: "application/gzip",
		size: int64(info.Size), body: obj}, nil
}
