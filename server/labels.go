package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// labelClaims keeps labels unique per kind of object across every server
// replica. A label is claimed (a KV create, which only one writer can win)
// before the object that bears it is written, and released after the object
// stops bearing it. Labels compare case-insensitively, ignoring surrounding
// space.
type labelClaims struct {
	kv  jetstream.KeyValue
	log zerolog.Logger
	// inFlight is how long a claim whose object does not exist yet is
	// respected: the claimer may be about to write it. After that, the claim
	// is stale (its claimer crashed) and may be taken over.
	inFlight time.Duration
}

// errLabelTaken is returned (wrapped, with the owner) when another object
// bears the label.
var errLabelTaken = errors.New("label taken")

func claimKey(kind, label string) string {
	sum := sha256.Sum256([]byte(strings.ToLower(strings.TrimSpace(label))))
	return kind + "." + hex.EncodeToString(sum[:20])
}

// claim gives label to id. bears reports, from an authoritative read, whether
// the object owner currently bears the label. It is tried again while the
// bus does not answer (untilAnswered): a claim the bus took, its answer
// lost, is then found to be id's own.
func (l *labelClaims) claim(ctx context.Context, kind, label, id string, bears func(ctx context.Context, owner string) (bool, error)) error {
	return untilAnswered(ctx, l.log.With().Str("label_claim", kind).Logger(), func(bool) error {
		return l.claimOnce(ctx, kind, label, id, bears)
	})
}

func (l *labelClaims) claimOnce(ctx context.Context, kind, label, id string, bears func(ctx context.Context, owner string) (bool, error)) error {
	key := claimKey(kind, label)
	for attempt := 0; attempt < 3; attempt++ {
		_, err := l.kv.Create(ctx, key, []byte(id))
		if err == nil {
			return nil
		}
		if !errors.Is(err, jetstream.ErrKeyExists) {
			return fmt.Errorf("claim label: %w", err)
		}
		e, err := l.kv.Get(ctx, key)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue // released meanwhile
		}
		if err != nil {
			return fmt.Errorf("claim label: %w", err)
		}
		owner := string(e.Value())
		if owner == id {
			return nil
		}
		held, err := bears(ctx, owner)
		if err != nil {
			return fmt.Errorf("claim label: %w", err)
		}
		if held || time.Since(e.Created()) < l.inFlight {
			return fmt.Errorf("%w by %s", errLabelTaken, owner)
		}
		// Stale: take it over, unless someone else just did.
		if _, err := l.kv.Update(ctx, key, []byte(id), e.Revision()); err == nil {
			return nil
		} else if !isRevisionMismatch(err) {
			return fmt.Errorf("claim label: %w", err)
		}
	}
	return fmt.Errorf("%w: contended", errLabelTaken)
}

// release drops id's claim on label. A claim held by someone else is left
// alone; a failure only leaves a stale claim, which claim recovers from.
func (l *labelClaims) release(ctx context.Context, kind, label, id string) error {
	return untilAnswered(ctx, l.log.With().Str("label_claim", kind).Logger(), func(bool) error {
		return l.releaseOnce(ctx, kind, label, id)
	})
}

func (l *labelClaims) releaseOnce(ctx context.Context, kind, label, id string) error {
	key := claimKey(kind, label)
	e, err := l.kv.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("release label: %w", err)
	}
	if string(e.Value()) != id {
		return nil
	}
	if err := l.kv.Delete(ctx, key, jetstream.LastRevision(e.Revision())); err != nil && !isRevisionMismatch(err) {
		return fmt.Errorf("release label: %w", err)
	}
	return nil
}
