package server

import (
	"net/url"
	"slices"
	"strconv"
	"strings"
)

// maxPageSize bounds FM's pages.
const maxPageSize = 10000

// page is FM's own paging of a list: at most limit rows after the row whose
// id is after, in id order. Dataiku's clients never ask for it and get
// every row, in Dataiku's shape (a JSON array); a page is an array too, and
// the next one starts after its last id (a page shorter than limit is the
// last).
type page struct {
	limit int    // 0: every row
	after string // "": from the first row
}

func pageOf(q url.Values) (page, error) {
	var p page
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > maxPageSize {
			return p, invalid("query parameter limit: %q is not a number from 1 to %d", v, maxPageSize)
		}
		p.limit = n
	}
	p.after = q.Get("after")
	return p, nil
}

// pageRows returns the page of rows, which are ordered by id.
func pageRows[T any](p page, rows []T, id func(*T) string) []T {
	if p.after != "" {
		i, _ := slices.BinarySearchFunc(rows, p.after, func(row T, after string) int {
			return strings.Compare(id(&row), after)
		})
		for i < len(rows) && id(&rows[i]) <= p.after {
			i++
		}
		rows = rows[i:]
	}
	if p.limit > 0 && len(rows) > p.limit {
		rows = rows[:p.limit]
	}
	return rows
}
