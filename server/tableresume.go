package server

import (
	"context"
	"errors"
	"maps"
	"slices"
	"time"
)

// What a copy does when its watcher starts again (watchOnce): its snapshot
// may come from a bus node that lags, the bucket may have lost keys without
// a marker, or have been made again.

// resumed is the copy a watcher started again makes (resumeCopy), asking
// the stream's leader what the snapshot cannot tell: whether the bucket was
// made again since (its stream's creation time changed, or its last
// revision is below the copy's: the snapshot replaces the copy, reset), where the stream now begins (a key of the
// copy's below it is gone: it expired, or the stream was purged), and,
// for each key the snapshot lacks that is newer than it, whether the key
// is still there. Without an answer it keeps what it cannot tell.
func (t *table[T]) resumed(ctx context.Context, floor uint64, snap map[string]row[T], deleted map[string]uint64, snapRev uint64) (next map[string]row[T], reset bool) {
	// The leader may be electing (a restart follows a reconnect): the whole
	// look takes a few seconds at most, and what it could not tell stays.
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var first uint64
	if info, err := t.streamInfo(ctx); err == nil {
		remade := !t.created.IsZero() && !info.Created.Equal(t.created)
		t.created = info.Created
		if remade || info.State.LastSeq < floor {
			t.log.Warn().Uint64("last", info.State.LastSeq).Uint64("copy", floor).Msg("the bucket was made again: the copy is loaded anew")
			return snap, true
		}
		first = info.State.FirstSeq
	}
	next, unsure := resumeCopy(t.items, floor, snap, deleted, snapRev, first)
	const maxAsked = 10000 // bounds the calls; what is left over stays
	for i, k := range unsure {
		if i == maxAsked || ctx.Err() != nil {
			break
		}
		_, _, err := t.readLeader(ctx, k)
		if errors.Is(err, errNotFound) {
			delete(next, k)
		} else if err != nil {
			break // unanswered: the rest stays too
		}
	}
	return next, false
}

// resumeCopy is the copy a watcher started again makes from the copy it
// replaces (the bucket up to revision floor) and its initial snapshot
// (keys, the delete markers among them, and its highest revision snapRev).
// The watcher's consumer may be served by a bus node still catching up (one
// just restarted), whose snapshot is older than the copy: per key the later
// revision wins, so that a copy never goes back. A key the snapshot lacks
// went without a marker (it expired, or was purged) if it is older than
// the stream's first revision first or than the snapshot; otherwise the
// snapshot may not have it yet: it stays, and is among unsure.
func resumeCopy[T any](copied map[string]row[T], floor uint64, snap map[string]row[T], deleted map[string]uint64, snapRev, first uint64) (next map[string]row[T], unsure []string) {
	next = maps.Clone(copied)
	for k, r := range copied {
		_, kept := snap[k]
		_, marked := deleted[k]
		switch {
		case marked:
		case kept && r.rev < first:
			// Gone from the stream, yet in a lagging snapshot: the key may
			// have been written since floor. The leader decides.
			unsure = append(unsure, k)
		case kept:
		case r.rev < first || r.rev <= snapRev:
			// Gone from the stream (below its first revision), or from a
			// snapshot newer than it: expired or purged.
			delete(next, k)
		default:
			unsure = append(unsure, k)
		}
	}
	for k, r := range snap {
		if r.rev > floor {
			next[k] = r
		}
	}
	for k, rev := range deleted {
		if rev > floor {
			delete(next, k)
		}
	}
	slices.Sort(unsure)
	return next, unsure
}

// changedKeys are the keys whose revision differs between two copies, or
// that are in one only.
func changedKeys[T any](before, after map[string]row[T]) []string {
	var keys []string
	for k, r := range after {
		if b, ok := before[k]; !ok || b.rev != r.rev {
			keys = append(keys, k)
		}
	}
	for k := range before {
		if _, ok := after[k]; !ok {
			keys = append(keys, k)
		}
	}
	return keys
}
