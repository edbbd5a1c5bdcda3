// Package backup writes FM's state to one file and brings a fresh FM back
// to it: every JetStream stream of FM's account (its key-value buckets and
// object stores are streams too) with its configuration and messages, and
// the files of the data folder that hold FM's keys (the secret key, the NATS
// authority, the TLS certificates), without which a restored FM could
// neither open its sealed secrets nor let its agents back in.
//
// The web console's sessions (fm_sessions) are left out: a restored FM
// asks people to sign in again, rather than take back sessions signed out
// since the backup.
//
// cmd/fm (fm admin backup, fm admin restore) and tests import it; it
// imports only the NATS client and protocol's names.
package backup

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Format is the version of the backup file's layout.
const Format = 1

// Manifest is the first entry of a backup file.
type Manifest struct {
	Format  int           `json:"format"`
	Created time.Time     `json:"created"`
	Streams []StreamEntry `json:"streams"`
	Files   []string      `json:"files"`
}

// StreamEntry is one stream of a backup.
type StreamEntry struct {
	Name     string `json:"name"`
	Messages int    `json:"messages"`
	Bytes    int64  `json:"bytes"`
	// LastSeq is the stream's last sequence when it was copied: the copy
	// holds every message up to it.
	LastSeq uint64 `json:"lastSeq"`
}

// message is a stored message as the backup keeps it.
type message struct {
	Subject string      `json:"s"`
	Header  nats.Header `json:"h,omitempty"`
	Data    []byte      `json:"d,omitempty"`
}

// Entry names inside the file.
const (
	manifestName = "fm-backup.json"
	streamsDir   = "streams/"
	filesDir     = "files/"
)

// notBackedUp is the stream of the console's sessions.
const notBackedUp = "KV_" + protocol.BucketSessions

// ErrNotEmpty is returned by Restore when a stream of the backup already
// holds messages: a restore goes into a fresh FM only.
var ErrNotEmpty = errors.New("not a fresh FM")

// Write copies every stream of the account, then files (path -> content,
// relative to the data folder), into w as a gzipped tar. Each stream is a
// consistent copy up to its last sequence when its copy began; streams are
// copied one after the other.
func Write(ctx context.Context, js jetstream.JetStream, files map[string][]byte, w io.Writer) (Manifest, error) {
	m := Manifest{Format: Format, Created: time.Now().UTC()}
	tmp, err := os.MkdirTemp("", "fm-backup-")
	if err != nil {
		return m, err
	}
	defer os.RemoveAll(tmp)
	names := js.StreamNames(ctx)
	var streams []string
	for n := range names.Name() {
		if n == notBackedUp {
			continue
		}
		streams = append(streams, n)
	}
	if err := names.Err(); err != nil {
		return m, fmt.Errorf("list streams: %w", err)
	}
	sort.Strings(streams)
	zw := gzip.NewWriter(w)
	tw := tar.NewWriter(zw)
	var entries []func() error
	for _, name := range streams {
		st, err := js.Stream(ctx, name)
		if err != nil {
			return m, fmt.Errorf("stream %s: %w", name, err)
		}
		info, err := st.Info(ctx)
		if err != nil {
			return m, fmt.Errorf("stream %s: %w", name, err)
		}
		cfg, err := json.Marshal(info.Config)
		if err != nil {
			return m, err
		}
		msgsPath := path.Join(tmp, name+".msgs")
		entry, err := copyStream(ctx, js, st, info, msgsPath)
		if err != nil {
			return m, fmt.Errorf("stream %s: %w", name, err)
		}
		m.Streams = append(m.Streams, entry)
		entries = append(entries,
			func() error { return addBytes(tw, streamsDir+name+".json", cfg) },
			func() error { return addFile(tw, streamsDir+name+".msgs", msgsPath) })
	}
	for p := range files {
		m.Files = append(m.Files, p)
	}
	sort.Strings(m.Files)
	manifest, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return m, err
	}
	if err := addBytes(tw, manifestName, manifest); err != nil {
		return m, err
	}
	for _, add := range entries {
		if err := add(); err != nil {
			return m, err
		}
	}
	for _, p := range m.Files {
		if err := addBytes(tw, filesDir+p, files[p]); err != nil {
			return m, err
		}
	}
	if err := tw.Close(); err != nil {
		return m, err
	}
	return m, zw.Close()
}

// copyStream writes the stream's messages, up to its last sequence now, as
// JSON lines into a file.
func copyStream(ctx context.Context, js jetstream.JetStream, st jetstream.Stream, info *jetstream.StreamInfo, to string) (StreamEntry, error) {
	e := StreamEntry{Name: info.Config.Name, LastSeq: info.State.LastSeq}
	f, err := os.Create(to)
	if err != nil {
		return e, err
	}
	defer f.Close()
	bw := bufio.NewWriter(f)
	enc := json.NewEncoder(bw)
	keep := func(subject string, h nats.Header, data []byte) error {
		if h.Get("Nats-Marker-Reason") != "" {
			return nil // made by the server itself (a key's TTL ran out)
		}
		e.Messages++
		e.Bytes += int64(len(data))
		return enc.Encode(message{Subject: subject, Header: h, Data: data})
	}
	if info.State.Msgs > 0 {
		if info.Config.Retention == jetstream.LimitsPolicy {
			err = readOrdered(ctx, st, info.State.LastSeq, keep)
		} else {
			// A work queue allows no second consumer: read by sequence.
			err = readBySequence(ctx, st, info.State.FirstSeq, info.State.LastSeq, keep)
		}
		if err != nil {
			return e, err
		}
	}
	if err := bw.Flush(); err != nil {
		return e, err
	}
	return e, f.Close()
}

func readOrdered(ctx context.Context, st jetstream.Stream, last uint64, keep func(string, nats.Header, []byte) error) error {
	cons, err := st.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverAllPolicy})
	if err != nil {
		return err
	}
	for {
		msg, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second))
		if err != nil {
			return fmt.Errorf("read up to sequence %d: %w", last, err)
		}
		meta, err := msg.Metadata()
		if err != nil {
			return err
		}
		if meta.Sequence.Stream > last {
			return nil // written after the copy began
		}
		if err := keep(msg.Subject(), msg.Headers(), msg.Data()); err != nil {
			return err
		}
		// Done at the last sequence, or at the last message there is: the
		// last sequence itself may be gone (deleted, purged, aged out).
		if meta.Sequence.Stream == last || meta.NumPending == 0 {
			return nil
		}
	}
}

func readBySequence(ctx context.Context, st jetstream.Stream, first, last uint64, keep func(string, nats.Header, []byte) error) error {
	for seq := first; seq <= last; seq++ {
		msg, err := st.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue // deleted, or taken from the work queue meanwhile
		}
		if err != nil {
			return err
		}
		if err := keep(msg.Subject, msg.Header, msg.Data); err != nil {
			return err
		}
	}
	return nil
}

func addBytes(tw *tar.Writer, name string, b []byte) error {
	if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o600, Size: int64(len(b)), ModTime: time.Now()}); err != nil {
		return err
	}
	_, err := tw.Write(b)
	return err
}

func addFile(tw *tar.Writer, name, from string) error {
	f, err := os.Open(from)
	if err != nil {
		return err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return err
	}
	if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o600, Size: info.Size(), ModTime: info.ModTime()}); err != nil {
		return err
	}
	_, err = io.Copy(tw, f)
	return err
}

// ReadFiles returns the manifest and the files of a backup without touching
// any stream, so that the caller can put the keys in place before it starts
// the bus that Restore fills. A backup of a newer FM's bus layout (a stream
// stamped newer than this FM's, bus.ErrNewerLayout) is refused here, before
// anything is restored: this FM could not start on it.
func ReadFiles(r io.Reader) (Manifest, map[string][]byte, error) {
	var m Manifest
	files := map[string][]byte{}
	err := walk(r, func(name string, body io.Reader) error {
		switch {
		case name == manifestName:
			return json.NewDecoder(body).Decode(&m)
		case strings.HasPrefix(name, streamsDir) && strings.HasSuffix(name, ".json"):
			var cfg struct {
				Name     string            `json:"name"`
				Metadata map[string]string `json:"metadata"`
			}
			if err := json.NewDecoder(body).Decode(&cfg); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			if err := bus.CheckStamp(cfg.Name, cfg.Metadata); err != nil {
				return fmt.Errorf("a backup this FM cannot restore: %w", err)
			}
		case strings.HasPrefix(name, filesDir):
			b, err := io.ReadAll(body)
			files[strings.TrimPrefix(name, filesDir)] = b
			return err
		}
		return nil
	})
	if err == nil && m.Format != Format {
		err = fmt.Errorf("not an FM backup of format %d (found format %d)", Format, m.Format)
	}
	return m, files, err
}

// Restore creates every stream of the backup and publishes its messages
// again, in order. It refuses, before it changes anything, if a stream of
// the backup exists with messages (ErrNotEmpty).
func Restore(ctx context.Context, js jetstream.JetStream, r io.ReadSeeker) (Manifest, error) {
	m, _, err := ReadFiles(r)
	if err != nil {
		return m, err
	}
	for _, s := range m.Streams {
		st, err := js.Stream(ctx, s.Name)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			continue
		}
		if err != nil {
			return m, fmt.Errorf("stream %s: %w", s.Name, err)
		}
		info, err := st.Info(ctx)
		if err != nil {
			return m, fmt.Errorf("stream %s: %w", s.Name, err)
		}
		if info.State.Msgs > 0 {
			return m, fmt.Errorf("%w: stream %s already holds %d messages", ErrNotEmpty, s.Name, info.State.Msgs)
		}
	}
	if _, err := r.Seek(0, io.SeekStart); err != nil {
		return m, err
	}
	err = walk(r, func(name string, body io.Reader) error {
		switch {
		case strings.HasPrefix(name, streamsDir) && strings.HasSuffix(name, ".json"):
			var cfg jetstream.StreamConfig
			if err := json.NewDecoder(body).Decode(&cfg); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			if _, err := js.CreateOrUpdateStream(ctx, cfg); err != nil {
				return fmt.Errorf("create stream %s: %w", cfg.Name, err)
			}
		case strings.HasPrefix(name, streamsDir) && strings.HasSuffix(name, ".msgs"):
			return republish(ctx, js, strings.TrimSuffix(strings.TrimPrefix(name, streamsDir), ".msgs"), body)
		}
		return nil
	})
	return m, err
}

// republish publishes a stream's messages again, waiting for each to be
// stored so that their order is kept.
func republish(ctx context.Context, js jetstream.JetStream, stream string, body io.Reader) error {
	dec := json.NewDecoder(bufio.NewReader(body))
	for n := 0; ; n++ {
		var msg message
		if err := dec.Decode(&msg); errors.Is(err, io.EOF) {
			return nil
		} else if err != nil {
			return fmt.Errorf("stream %s, message %d: %w", stream, n+1, err)
		}
		out := nats.NewMsg(msg.Subject)
		out.Data = msg.Data
		for k, v := range msg.Header {
			out.Header[k] = v
		}
		// Deduplication must not drop a message the backup holds once, and
		// the expectations the original write was checked against (a key's
		// last revision) do not hold for the new sequences.
		out.Header.Del(jetstream.MsgIDHeader)
		for k := range out.Header {
			if strings.HasPrefix(k, "Nats-Expected-") {
				out.Header.Del(k)
			}
		}
		if _, err := js.PublishMsg(ctx, out, jetstream.WithExpectStream(stream)); err != nil {
			return fmt.Errorf("stream %s, message %d (%s): %w", stream, n+1, msg.Subject, err)
		}
	}
}

// walk calls fn for every regular entry of a gzipped tar.
func walk(r io.Reader, fn func(name string, body io.Reader) error) error {
	zr, err := gzip.NewReader(r)
	if err != nil {
		return fmt.Errorf("not an FM backup: %w", err)
	}
	tr := tar.NewReader(zr)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read the backup: %w", err)
		}
		if hdr.Typeflag != tar.TypeReg {
			continue
		}
		if err := fn(hdr.Name, tr); err != nil {
			return err
		}
	}
}
