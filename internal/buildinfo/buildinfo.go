// Package buildinfo says which build of fm is running: its version, and
// the commit it was built from with the commit's date, as make build (and
// the e2e harness) stamps them (-ldflags -X main.commit=… -X
// main.commitDate=…), else as the Go toolchain recorded them from the
// checkout (go build -buildvcs). cmd/fm and cmd/fm-agent import it for
// `version`; the agent and the server read another binary's `version`
// with VersionOf.
//
// The date is the commit's, not the build's: a build of one commit is then
// the same whenever it is made.
package buildinfo

import (
	"fmt"
	"runtime/debug"
	"strconv"
	"strings"
	"time"
)

// Describe is the line `version` prints: "fm 1.2.0 (commit 0123abc…,
// committed 2026-12-07T10:00:00Z, go1.26.8)", with "modified" for a build
// the toolchain saw made of a checkout with changes not committed, and
// "commit unknown" for one made without the checkout's history.
// commitDate is a time in Unix seconds (git's %ct) or RFC 3339; it is
// shown in UTC.
func Describe(name, version, commit, commitDate string) string {
	info, _ := debug.ReadBuildInfo()
	return describe(name, version, commit, commitDate, info)
}

func describe(name, version, commit, commitDate string, info *debug.BuildInfo) string {
	revision, when := commit, commitDate
	modified := false
	if info != nil && revision == "" {
		for _, s := range info.Settings {
			switch s.Key {
			case "vcs.revision":
				revision = s.Value
			case "vcs.time":
				when = s.Value
			case "vcs.modified":
				modified = s.Value == "true"
			}
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s (", name, version)
	if revision == "" {
		b.WriteString("commit unknown")
	} else {
		fmt.Fprintf(&b, "commit %s", revision)
		if when = utc(when); when != "" {
			fmt.Fprintf(&b, ", committed %s", when)
		}
		if modified {
			b.WriteString(", modified")
		}
	}
	if info != nil && info.GoVersion != "" {
		fmt.Fprintf(&b, ", %s", info.GoVersion)
	}
	b.WriteString(")")
	return b.String()
}

// utc writes a time given in Unix seconds or RFC 3339 as RFC 3339 in UTC;
// anything else is dropped.
func utc(when string) string {
	if secs, err := strconv.ParseInt(when, 10, 64); err == nil {
		return time.Unix(secs, 0).UTC().Format(time.RFC3339)
	}
	if t, err := time.Parse(time.RFC3339, when); err == nil {
		return t.UTC().Format(time.RFC3339)
	}
	return ""
}

// VersionOf reads the version in what Describe printed ("fm 1.2.0 (…)"),
// false when out is not that.
func VersionOf(out string) (string, bool) {
	f := strings.Fields(out)
	if len(f) < 2 || f[0] != "fm" {
		return "", false
	}
	return f[1], true
}
