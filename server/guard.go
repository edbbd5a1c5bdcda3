package server

import (
	"context"
	"errors"
	"fmt"
	"strings"
)

// deleteGuarded deletes id from r unless something uses it. While it checks,
// the object is marked Deleting so that nothing new starts using it: a
// creator that reads the mark backs off (see ensureUsable), and one that read
// before the mark wrote its reference before the check, which then sees it.
func deleteGuarded[T any](ctx context.Context, r *repo[T], id string, users func(ctx context.Context) ([]string, error)) (T, error) {
	cur, rev, err := r.fetch(ctx, id)
	if errors.Is(err, errNotFound) {
		return cur, notFound(r.kind, id)
	}
	if err != nil {
		return cur, unavailable(err, "the %s could not be read", r.kind)
	}
	marked := cur
	r.meta(&marked).Deleting = true
	if !r.meta(&cur).Deleting {
		newRev, err := r.update(ctx, id, marked, rev)
		if errors.Is(err, errConflict) {
			return cur, r.conflict(id, rev)
		}
		if err != nil {
			return cur, unavailable(err, "the %s could not be marked for deletion", r.kind)
		}
		rev = newRev
	}
	using, err := users(ctx)
	if err == nil && len(using) > 0 {
		err = precondition("%s %s is used by %s; delete or move them first", r.kind, id, describeUsers(using))
	}
	if err != nil {
		unmarked := marked
		r.meta(&unmarked).Deleting = false
		if _, uerr := r.update(ctx, id, unmarked, rev); uerr != nil {
			r.log.Warn().Err(uerr).Str("id", id).Msg("deletion mark not cleared; deleting again clears it")
		}
		return cur, err
	}
	return cur, r.erase(ctx, id, marked, rev)
}

func describeUsers(ids []string) string {
	const shown = 5
	if len(ids) <= shown {
		return strings.Join(ids, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(ids[:shown], ", "), len(ids)-shown)
}

// ensureUsable checks, from the bucket itself, that id exists and is not
// being deleted, for a creator that has just written a reference to it.
func ensureUsable[T any](ctx context.Context, r *repo[T], id string) error {
	v, _, err := r.fetch(ctx, id)
	if errors.Is(err, errNotFound) {
		return notFound(r.kind, id)
	}
	if err != nil {
		return unavailable(err, "the %s could not be read", r.kind)
	}
	if r.meta(&v).Deleting {
		return precondition("%s %s is being deleted", r.kind, id)
	}
	return nil
}
