package agent

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// maxLogInBundle bounds each log file in a diagnosis bundle (its tail is
// kept).
const maxLogInBundle = 8 << 20

// collectDiagnosis bundles the agent's and DSS's logs and the machine's facts
// into a .tar.gz and sends it to FM, which files it in the fm_diagnosis
// object store.
func (a *Agent) collectDiagnosis(ctx context.Context, commandID string) (protocol.DiagnosisResult, error) {
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	add := func(name string, data []byte) error {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o600, Size: int64(len(data)), ModTime: time.Now(), Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	addFile := func(name, path string) error {
		data, err := readTail(path, maxLogInBundle)
		if err != nil {
			return nil // absent files are simply not in the bundle
		}
		return add(name, data)
	}
	status, _ := json.MarshalIndent(a.rep.currentStatus(), "", "  ")
	mk, _ := json.MarshalIndent(a.m.loadMarker(), "", "  ")
	facts, _ := json.MarshalIndent(a.machineFacts(time.Now()), "", "  ")
	for name, data := range map[string][]byte{"agent/status.json": status, "agent/marker.json": mk, "agent/facts.json": facts} {
		if err := add(name, data); err != nil {
			return protocol.DiagnosisResult{}, err
		}
	}
	files := map[string]string{
		"agent/agent.log":            a.m.agentLogPath(),
		"agent/agent.log.1":          a.m.agentLogPath() + ".1",
		"dss/install.ini":            filepath.Join(a.m.dssDir, "install.ini"),
		"dss/dss-version.json":       filepath.Join(a.m.dssDir, "dss-version.json"),
		"dss/bin/env-site.sh":        filepath.Join(a.m.dssDir, "bin", "env-site.sh"),
		"dss/config/migrations.json": filepath.Join(a.m.dssDir, "config", "migrations.json"),
	}
	logs, _ := filepath.Glob(filepath.Join(a.m.dssDir, "run", "*.log"))
	for _, l := range logs {
		files["dss/run/"+filepath.Base(l)] = l
	}
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if err := addFile(n, files[n]); err != nil {
			return protocol.DiagnosisResult{}, err
		}
	}
	if err := tw.Close(); err != nil {
		return protocol.DiagnosisResult{}, err
	}
	if err := gz.Close(); err != nil {
		return protocol.DiagnosisResult{}, err
	}
	// The agent may publish only on its own subjects: the bundle goes in
	// chunks on its log subject, and the server files it in fm_diagnosis.
	data := buf.Bytes()
	sum := sha256.Sum256(data)
	subject := protocol.LogSubject(a.cfg.Instance, "diag-"+commandID)
	chunks := 0
	for off := 0; off < len(data); off += diagnosisChunk {
		end := min(off+diagnosisChunk, len(data))
		if _, err := a.js.Publish(ctx, subject, data[off:end], jetstream.WithMsgID(subject+"."+strconv.Itoa(chunks))); err != nil {
			return protocol.DiagnosisResult{}, fmt.Errorf("send the diagnosis bundle: %w", err)
		}
		chunks++
	}
	return protocol.DiagnosisResult{Subject: subject, Chunks: chunks, SizeBytes: int64(len(data)), SHA256: hex.EncodeToString(sum[:])}, nil
}

// diagnosisChunk is the size of a diagnosis bundle's messages, well under
// NATS's default 1 MiB payload limit.
const diagnosisChunk = 256 << 10

// readTail reads at most n bytes from the end of a file.
func readTail(path string, n int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.Size() > n {
		if _, err := f.Seek(st.Size()-n, io.SeekStart); err != nil {
			return nil, err
		}
	}
	return io.ReadAll(io.LimitReader(f, n))
}
