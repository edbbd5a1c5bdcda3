package server

import (
	"strings"
	"testing"
)

func TestPlainToken(t *testing.T) {
	for _, tc := range []struct {
		s, extra string
		want     bool
	}{
		{"14.0.0+build_1-a", ".-_+", true},
		{"14.0.0+build", "._-", false},
		{"ci-run-42.step_1", "._-", true},
		{"", "._-", false},
		{strings.Repeat("x", 64), "", true},
		{strings.Repeat("x", 65), "", false},
		{"a b", "._-", false},
		{"é", "._-", false},
		{"a\x1b[2J", ".-_+", false},
	} {
		if got := plainToken(tc.s, tc.extra); got != tc.want {
			t.Errorf("plainToken(%q, %q) = %v, want %v", tc.s, tc.extra, got, tc.want)
		}
	}
}
