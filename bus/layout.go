package bus

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strconv"

	"github.com/nats-io/nats.go/jetstream"
)

// LayoutVersion is the version of what FM keeps on the bus: its streams',
// buckets' and object stores' settings and the records in them. Declare
// stamps it on every stream it declares (the stream's metadata, under
// LayoutKey), and an FM whose LayoutVersion is lower than a stamp on the
// bus refuses to start (ErrNewerLayout). CHANGELOG.md gives each release's.
//
// A release that changes what is stored in a way an older FM would undo or
// misread raises it, and its migration stamps the new version on one
// stream first, then migrates, idempotently: an FM killed half-way leaves a
// bus older FMs refuse and the next start of a new one finishes. FMs built
// before stamps (before layout 1) neither check nor keep the stamp: one
// started on a stamped bus removes the stamps of the streams it declares.
//
// History:
//
//	1: the first stamped layout. A bus an FM stamped nothing on (before
//	   this one) is layout 1: nothing to migrate.
const LayoutVersion = 1

// LayoutKey is the stream metadata key of the layout version.
const LayoutKey = "fm.layout"

// ErrNewerLayout is a bus whose layout a newer FM stamped: this FM would
// undo its changes (a downgrade). A LayoutError says which.
var ErrNewerLayout = errors.New("the bus holds a newer FM's layout")

// LayoutError is a stream stamped with a layout this FM does not know.
type LayoutError struct {
	Stream string
	// Stamp is the stamp as found; Version its number, 0 if unreadable.
	Stamp   string
	Version int
}

func (e *LayoutError) Error() string {
	if e.Version == 0 {
		return fmt.Sprintf("stream %s holds the layout stamp %q, which this FM cannot read: it was not declared by FM", e.Stream, e.Stamp)
	}
	return fmt.Sprintf("stream %s is in FM's bus layout %d; this FM knows layout %d and would undo a newer FM's changes: "+
		"downgrades are refused, run the newer FM again (CHANGELOG.md)", e.Stream, e.Version, LayoutVersion)
}

func (e *LayoutError) Is(target error) bool { return target == ErrNewerLayout && e.Version != 0 }

// CheckStamp refuses a stream whose metadata holds a layout stamp newer
// than this FM's, or one no FM writes (a LayoutError); an unstamped stream
// passes. A backup's streams are checked with it before a restore.
func CheckStamp(stream string, metadata map[string]string) error {
	stamp, ok := metadata[LayoutKey]
	if !ok {
		return nil
	}
	v, err := strconv.Atoi(stamp)
	if err != nil || v < 1 {
		return &LayoutError{Stream: stream, Stamp: stamp}
	}
	if v > LayoutVersion {
		return &LayoutError{Stream: stream, Stamp: stamp, Version: v}
	}
	return nil
}

// CheckLayout refuses a bus with any stream stamped with a newer layout
// than this FM's (or an unreadable stamp): the server before it declares
// anything (a refused start changes nothing), the provisioner before it
// consumes.
func CheckLayout(ctx context.Context, js jetstream.JetStream) error {
	streams := js.ListStreams(ctx)
	for info := range streams.Info() {
		if err := CheckStamp(info.Config.Name, info.Config.Metadata); err != nil {
			return err
		}
	}
	if err := streams.Err(); err != nil {
		return fmt.Errorf("list the bus's streams: %w", err)
	}
	return nil
}

// stamped is metadata with this FM's layout stamp, what else it held
// kept (NATS adds keys of its own).
func stamped(metadata map[string]string) map[string]string {
	m := maps.Clone(metadata)
	if m == nil {
		m = map[string]string{}
	}
	m[LayoutKey] = strconv.Itoa(LayoutVersion)
	return m
}
