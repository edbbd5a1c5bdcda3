package transfer

import (
	"bytes"
	"io"
	"strings"
	"testing"
	"time"
)

func TestDescribe(t *testing.T) {
	for _, tc := range []struct {
		done, total int64
		want        string
	}{
		{120 << 20, 270 << 20, "kit: 120 MiB of 270 MiB (44%)"},
		{5 << 20, -1, "kit: 5 MiB"},
		{0, 0, "kit: 0 MiB"},
		{3 << 20, 3 << 20, "kit: 3 MiB of 3 MiB (100%)"},
	} {
		if got := Describe("kit", tc.done, tc.total); got != tc.want {
			t.Errorf("Describe(%d, %d) = %q, want %q", tc.done, tc.total, got, tc.want)
		}
	}
}

// TestReaderReportsAtItsPace: nothing before the first period, the count
// after; a seek back starts the count again; no report func, no wrapper.
func TestReaderReportsAtItsPace(t *testing.T) {
	var got [][2]int64
	report := func(done, total int64) { got = append(got, [2]int64{done, total}) }
	r := Reader(strings.NewReader("abcdef"), 6, time.Hour, report)
	if _, err := io.ReadAll(r); err != nil || len(got) != 0 {
		t.Fatalf("a read shorter than the period reported %v (%v)", got, err)
	}
	rs := ReadSeeker(bytes.NewReader([]byte("abcdef")), 6, time.Nanosecond, report)
	buf := make([]byte, 4)
	if _, err := io.ReadFull(rs, buf); err != nil {
		t.Fatal(err)
	}
	if _, err := rs.Seek(0, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(rs, buf[:2]); err != nil {
		t.Fatal(err)
	}
	if n := len(got); n < 2 || got[0] != [2]int64{4, 6} || got[n-1] != [2]int64{2, 6} {
		t.Fatalf("reports %v, want {4 6} first and {2 6} after the seek back", got)
	}
	plain := strings.NewReader("x")
	if Reader(plain, 1, time.Second, nil) != io.Reader(plain) {
		t.Error("no report func: the reader itself")
	}
}
