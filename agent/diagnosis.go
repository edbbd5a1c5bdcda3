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
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// maxLogInBundle bounds each log file in a diagnosis bundle (its tail is
// kept), maxLogsInBundle the number of DSS's logs (run/*.log, first by
// name) it holds: the bundle is made in memory.
const (
	maxLogInBundle  = 8 << 20
	maxLogsInBundle = 32
)

// collectDiagnosis bundles the agent's and DSS's logs and the machine's facts
// into a .tar.gz and sends it to FM, which files it in the fm_diagnosis
// object store.
func (a *Agent) collectDiagnosis(ctx context.Context, commandID string) (protocol.DiagnosisResult, error) {
	var buf bytes.Buffer
	// Sealed as it is made, with the instance key when the agent has one:
	// logs and DSS's settings may hold secrets, and the chunks wait in
	// FM_DIAG until filed.
	var out io.Writer = &buf
	var sealer io.WriteCloser
	if a.instanceKey != nil {
		var err error
		if sealer, err = seal.NewStreamWriter(&buf, a.instanceKey, protocol.SealedDiagnosisPlace(a.cfg.Instance, commandID)); err != nil {
			return protocol.DiagnosisResult{}, err
		}
		out = sealer
	}
	gz := gzip.NewWriter(out)
	tw := tar.NewWriter(gz)
	add := func(name string, data []byte) error {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o600, Size: int64(len(data)), ModTime: time.Now(), Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	// DSS's files are read as openDSSFile says (the DSS account may have
	// put a link to a file of root's in their place); the agent's own
	// log, plainly.
	addFile := func(name, path string) error {
		var f *os.File
		var err error
		if within(a.m.dssFolder(), path) {
			f, _, err = a.m.openDSSFile(path)
		} else {
			f, err = os.Open(path)
		}
		if err != nil {
			return nil // absent (or refused) files are simply not in the bundle
		}
		defer f.Close()
		data, err := readTail(f, maxLogInBundle)
		if err != nil {
			return nil
		}
		if strings.HasSuffix(name, ".sh") {
			data = redactShell(data)
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
	runDir := filepath.Join(a.m.dssDir, "run")
	logs, _ := a.m.readDSSDir(runDir, maxDirEntries)
	kept := 0
	for _, e := range logs {
		if kept < maxLogsInBundle && e.Type().IsRegular() && strings.HasSuffix(e.Name(), ".log") {
			files["dss/run/"+e.Name()] = filepath.Join(runDir, e.Name())
			kept++
		}
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
	if sealer != nil {
		if err := sealer.Close(); err != nil {
			return protocol.DiagnosisResult{}, err
		}
	}
	// The agent may publish only on its own subjects: the bundle goes in
	// chunks on its diagnosis subject, and the server files it in
	// fm_diagnosis.
	data := buf.Bytes()
	sum := sha256.Sum256(data)
	// A subject of this run's own: a run cut short by a crash left chunks
	// on its subject, which must not mix with this one's.
	subject := protocol.DiagSubject(a.cfg.Instance, commandID+"-"+protocol.NewID("r"))
	chunks := 0
	for off := 0; off < len(data); off += diagnosisChunk {
		end := min(off+diagnosisChunk, len(data))
		if err := a.publishChunk(ctx, subject, data[off:end], subject+"."+strconv.Itoa(chunks)); err != nil {
			return protocol.DiagnosisResult{}, fmt.Errorf("send the diagnosis bundle: %w", err)
		}
		chunks++
	}
	return protocol.DiagnosisResult{Subject: subject, Chunks: chunks, SizeBytes: int64(len(data)), SHA256: hex.EncodeToString(sum[:]),
		Sealed: sealer != nil}, nil
}

// chunkRetryFor bounds how long one chunk of a bundle is sent again before
// the collection fails: the bus away, or FM not taking it yet (its copy of
// the operation lagging behind), passes within it.
const chunkRetryFor = 2 * time.Minute

// publishChunk stores a chunk under id, sent again (the same id: stored
// once) until stored or chunkRetryFor has passed.
func (a *Agent) publishChunk(ctx context.Context, subject string, data []byte, id string) error {
	deadline := time.Now().Add(chunkRetryFor)
	for wait := 200 * time.Millisecond; ; wait = min(2*wait, 5*time.Second) {
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := a.js.Publish(pctx, subject, data, jetstream.WithMsgID(id))
		cancel()
		if err == nil || ctx.Err() != nil || time.Now().Add(wait).After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
	}
}

// secretName matches a shell variable's name that holds a secret; userInfo
// the password of a URL (a proxy's, typically).
var (
	secretName = regexp.MustCompile(`(?i)^(\s*(?:export\s+)?[A-Za-z_][A-Za-z0-9_]*(?:PASS|SECRET|TOKEN|KEY|CREDENTIAL)[A-Za-z0-9_]*=).*$`)
	userInfo   = regexp.MustCompile(`(://[^/\s:@'"]+):[^@\s'"]+@`)
)

// redactShell masks what a shell script of DSS's (bin/env-site.sh, where
// proxies and environment are set) may hold of secrets: values of
// variables whose names say secret, and passwords in URLs. The bundle is
// sealed on its way and where FM keeps it, but operators download it.
func redactShell(data []byte) []byte {
	lines := strings.Split(string(data), "\n")
	for i, l := range lines {
		l = secretName.ReplaceAllString(l, "${1}***")
		lines[i] = userInfo.ReplaceAllString(l, "${1}:***@")
	}
	return []byte(strings.Join(lines, "\n"))
}

// diagnosisChunk is the size of a diagnosis bundle's messages, well under
// NATS's default 1 MiB payload limit.
const diagnosisChunk = 256 << 10

// readTail reads at most n bytes from the end of a file.
func readTail(f *os.File, n int64) ([]byte, error) {
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
