package server

import (
	"fmt"
	"net/mail"
	"regexp"
	"sort"
	"strings"
	"unicode/utf8"
)

// checker collects every rule a request breaks, so that one answer names
// them all.
type checker struct {
	problems []string
}

func (c *checker) fail(field, format string, args ...any) {
	c.problems = append(c.problems, field+": "+fmt.Sprintf(format, args...))
}

func (c *checker) ok() bool { return len(c.problems) == 0 }

// err is nil when nothing failed, else an InvalidArgument naming the object
// kind and every problem.
func (c *checker) err(kind string) error {
	if c.ok() {
		return nil
	}
	return invalid("invalid %s: %s", kind, strings.Join(c.problems, "; "))
}

func (c *checker) required(field, v string) bool {
	if strings.TrimSpace(v) == "" {
		c.fail(field, "is required")
		return false
	}
	return true
}

// oneOf checks v against the allowed values (exact, case-sensitive, as on
// Dataiku's wire).
func (c *checker) oneOf(field, v string, allowed ...string) {
	if !oneOfStr(v, allowed...) {
		c.fail(field, "%q is not one of %s", v, strings.Join(allowed, ", "))
	}
}

func oneOfStr(v string, allowed ...string) bool {
	for _, a := range allowed {
		if v == a {
			return true
		}
	}
	return false
}

func (c *checker) maxLen(field, v string, n int) {
	if utf8.RuneCountInString(v) > n {
		c.fail(field, "is longer than %d characters", n)
	}
}

func (c *checker) match(field, v string, re *regexp.Regexp, what string) {
	if v != "" && !re.MatchString(v) {
		c.fail(field, "%q is not %s", v, what)
	}
}

func (c *checker) label(field, v string) {
	if c.required(field, v) {
		c.maxLen(field, v, 200)
		if strings.ContainsAny(v, "\n\r\t") {
			c.fail(field, "must not contain line breaks or tabs")
		}
	}
}

func (c *checker) rangeInt(field string, v *int, lo, hi int) {
	if v != nil && (*v < lo || *v > hi) {
		c.fail(field, "%d is out of range [%d, %d]", *v, lo, hi)
	}
}

func (c *checker) email(field, v string) {
	if v == "" {
		return
	}
	if a, err := mail.ParseAddress(v); err != nil || a.Address != v {
		c.fail(field, "%q is not an e-mail address", v)
	}
}

// fmTags checks FM's own tags (labels of an object, not cloud tags).
func (c *checker) fmTags(field string, tags []string) {
	if len(tags) > 50 {
		c.fail(field, "has %d tags; at most 50 are allowed", len(tags))
	}
	seen := map[string]bool{}
	for _, t := range tags {
		switch {
		case t == "":
			c.fail(field, "a tag is empty")
		case len(t) > 100:
			c.fail(field, "tag %q is longer than 100 characters", t)
		case seen[t]:
			c.fail(field, "tag %q is listed twice", t)
		}
		seen[t] = true
	}
}

// cloudTags applies AWS's tag rules: at most 50 tags (FM adds its own, so
// fewer are left), keys 1-128 characters not starting with "aws:", values
// up to 256 characters.
func (c *checker) cloudTags(field string, tags map[string]string) {
	if len(tags) > 40 {
		c.fail(field, "has %d tags; at most 40 are allowed (AWS allows 50 and FM adds its own)", len(tags))
	}
	keys := make([]string, 0, len(tags))
	for k := range tags {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		switch {
		case strings.TrimSpace(k) == "":
			c.fail(field, "a tag key is empty")
		case utf8.RuneCountInString(k) > 128:
			c.fail(field, "tag key %q is longer than 128 characters", k)
		case strings.HasPrefix(strings.ToLower(k), "aws:"):
			c.fail(field, "tag key %q uses the reserved prefix aws:", k)
		case strings.HasPrefix(strings.ToLower(k), "fm:"):
			c.fail(field, "tag key %q uses the prefix fm:, reserved for Fleet Manager's own tags", k)
		}
		if utf8.RuneCountInString(tags[k]) > 256 {
			c.fail(field, "the value of tag %q is longer than 256 characters", k)
		}
	}
}

var (
	reVpcID       = regexp.MustCompile(`^vpc-[0-9a-zA-Z]{1,32}$`)
	reSubnetID    = regexp.MustCompile(`^subnet-[0-9a-zA-Z]{1,32}$`)
	reSGID        = regexp.MustCompile(`^sg-[0-9a-zA-Z]{1,32}$`)
	reRegion      = regexp.MustCompile(`^[a-z]{2,}(-[a-z0-9]+)+$|^local$`)
	reZoneID      = regexp.MustCompile(`^(/hostedzone/)?Z[0-9A-Z]{1,32}$`)
	reProfileARN  = regexp.MustCompile(`^arn:aws[a-z-]*:iam::\d{12}:instance-profile/[\w+=,.@/-]{1,128}$`)
	reRoleARN     = regexp.MustCompile(`^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,128}$`)
	reKeyPair     = regexp.MustCompile(`^[\x20-\x7e]{1,255}$`)
	reAccessKeyID = regexp.MustCompile(`^[A-Z0-9]{16,128}$`)
	reKMSKey      = regexp.MustCompile(`^(arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:(key|alias)/[\w/-]+|alias/[\w/-]+|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32})$`)
	reInstanceTyp = regexp.MustCompile(`^[a-z][a-z0-9-]*\.[a-z0-9]+$`)
	reEIPAlloc    = regexp.MustCompile(`^eipalloc-[0-9a-zA-Z]{1,32}$`)
	reImageID     = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`)
	reVersion     = regexp.MustCompile(`^\d+\.\d+\.\d+([.-][0-9A-Za-z.-]+)?$`)
	reAMI         = regexp.MustCompile(`^ami-[0-9a-zA-Z]{1,32}$`)
)

func trim(s string) string { return strings.TrimSpace(s) }

func defaultString(v *string, def string) {
	if *v == "" {
		*v = def
	}
}
