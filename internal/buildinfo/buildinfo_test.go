package buildinfo

import (
	"runtime/debug"
	"testing"
)

func TestDescribe(t *testing.T) {
	vcs := func(kv ...string) *debug.BuildInfo {
		info := &debug.BuildInfo{GoVersion: "go1.26.8"}
		for i := 0; i < len(kv); i += 2 {
			info.Settings = append(info.Settings, debug.BuildSetting{Key: kv[i], Value: kv[i+1]})
		}
		return info
	}
	for _, c := range []struct {
		name, commit, date string
		info               *debug.BuildInfo
		want               string
	}{
		{"stamped", "0123456789abcdef0123456789abcdef01234567", "1796637600", vcs("vcs.revision", "ffff"),
			"fm 1.0.0 (commit 0123456789abcdef0123456789abcdef01234567, committed 2026-12-07T10:00:00Z, go1.26.8)"},
		{"stamped with a zone", "0123456789abcdef0123456789abcdef01234567", "2026-12-07T12:00:00+02:00", nil,
			"fm 1.0.0 (commit 0123456789abcdef0123456789abcdef01234567, committed 2026-12-07T10:00:00Z)"},
		{"a date that is none", "0123456789abcdef0123456789abcdef01234567", "Good signature", nil,
			"fm 1.0.0 (commit 0123456789abcdef0123456789abcdef01234567)"},
		{"a commit", "", "", vcs("vcs.revision", "0123456789abcdef0123456789abcdef01234567", "vcs.time", "2026-12-07T10:00:00Z", "vcs.modified", "false"),
			"fm 1.0.0 (commit 0123456789abcdef0123456789abcdef01234567, committed 2026-12-07T10:00:00Z, go1.26.8)"},
		{"changes not committed", "", "", vcs("vcs.revision", "0123456789abcdef0123456789abcdef01234567", "vcs.time", "2026-12-07T10:00:00Z", "vcs.modified", "true"),
			"fm 1.0.0 (commit 0123456789abcdef0123456789abcdef01234567, committed 2026-12-07T10:00:00Z, modified, go1.26.8)"},
		{"no history", "", "", vcs(), "fm 1.0.0 (commit unknown, go1.26.8)"},
		{"no build info", "", "", nil, "fm 1.0.0 (commit unknown)"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := describe("fm", "1.0.0", c.commit, c.date, c.info); got != c.want {
				t.Fatalf("%q, want %q", got, c.want)
			}
		})
	}
}

func TestVersionOf(t *testing.T) {
	tests := []struct {
		out, want string
		ok        bool
	}{
		{out: Describe("fm", "1.2.0", "abc", "1700000000") + "\n", want: "1.2.0", ok: true},
		{out: "fm dev (commit unknown) (agent build)\n", want: "dev", ok: true},
		{out: "", ok: false},
		{out: "fm", ok: false},
		{out: "bash: version: not found", ok: false},
	}
	for _, tc := range tests {
		t.Run(tc.out, func(t *testing.T) {
			if got, ok := VersionOf(tc.out); got != tc.want || ok != tc.ok {
				t.Fatalf("VersionOf(%q) = %q, %v", tc.out, got, ok)
			}
		})
	}
}
