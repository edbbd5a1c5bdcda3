// Package transfer reports how far a long copy got (a kit's download, a
// snapshot archive's upload), every so often, for the progress an
// operation shows.
//
// The agent and the provisioner import it; it imports the standard library
// only.
package transfer

import (
	"fmt"
	"io"
	"time"
)

// Func is told how far a transfer got: done bytes of total (≤ 0: unknown).
type Func func(done, total int64)

// counter counts the bytes read and reports them at most every so often.
type counter struct {
	done, total int64
	every       time.Duration
	last        time.Time
	report      Func
}

func (c *counter) add(n int) {
	c.done += int64(n)
	if now := time.Now(); now.Sub(c.last) >= c.every {
		c.last = now
		c.report(c.done, c.total)
	}
}

// Reader reports what is read through r, at most every every, the first
// time after every: a transfer shorter than that says nothing. A nil
// report (or every ≤ 0) returns r itself.
func Reader(r io.Reader, total int64, every time.Duration, report Func) io.Reader {
	if report == nil || every <= 0 {
		return r
	}
	return &reader{r: r, c: counter{total: total, every: every, last: time.Now(), report: report}}
}

type reader struct {
	r io.Reader
	c counter
}

func (p *reader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.c.add(n)
	return n, err
}

// ReadSeeker is Reader for an io.ReadSeeker (an upload that may start
// again from the beginning): a seek moves the count to the new offset.
func ReadSeeker(r io.ReadSeeker, total int64, every time.Duration, report Func) io.ReadSeeker {
	if report == nil || every <= 0 {
		return r
	}
	return &readSeeker{reader: reader{r: r, c: counter{total: total, every: every, last: time.Now(), report: report}}, s: r}
}

type readSeeker struct {
	reader
	s io.Seeker
}

func (p *readSeeker) Seek(offset int64, whence int) (int64, error) {
	at, err := p.s.Seek(offset, whence)
	if err == nil {
		p.c.done = at
	}
	return at, err
}

// Describe says how far a transfer got, for a progress event:
// "kit: 120 MiB of 270 MiB (44%)".
func Describe(what string, done, total int64) string {
	const mib = 1 << 20
	if total <= 0 {
		return fmt.Sprintf("%s: %d MiB", what, done/mib)
	}
	return fmt.Sprintf("%s: %d MiB of %d MiB (%d%%)", what, done/mib, total/mib, done*100/total)
}
