// Package crashtable runs the cases of a crash-point harness (one operation
// killed at one crash point each) as subtests, a few at a time, and renders
// their outcomes as the table docs/lifecycle.md summarises. The harnesses
// (provisioner/crashtest, the agent's) import it; it is test support, kept
// apart from internal/crashpoint so that no role links the testing package.
package crashtable

import (
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
)

// Case is one operation killed at one crash point.
type Case struct {
	// Operation and N name the case ("<operation>/<n>" as a subtest);
	// Point is the crash point's name, for the table.
	Operation string
	N         int
	Point     string
	// Run kills, restarts and checks; a failure fails t.
	Run func(t *testing.T)
}

// Row is one line of the table.
type Row struct {
	Role, Operation string
	N               int
	Point           string
	Outcome         string
}

// Run runs the cases as subtests of t, parallel at a time, from goroutines
// of t (most of a case is waiting for a redelivery or a process, not
// working), and returns their rows in the cases' order.
func Run(t *testing.T, role string, parallel int, cases []Case) []Row {
	if parallel < 1 {
		parallel = 1
	}
	rows := make([]Row, len(cases))
	next := make(chan int)
	var wg sync.WaitGroup
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				c := cases[i]
				outcome := "ok"
				if !t.Run(fmt.Sprintf("%s/%d", c.Operation, c.N), c.Run) {
					outcome = "FAILED"
				}
				rows[i] = Row{Role: role, Operation: c.Operation, N: c.N, Point: c.Point, Outcome: outcome}
			}
		}()
	}
	for i := range cases {
		next <- i
	}
	close(next)
	wg.Wait()
	return rows
}

// Select keeps one point in stride of an operation's points (1..n),
// always the first and the last.
func Select(n, stride int) []int {
	if stride < 1 {
		stride = 1
	}
	var out []int
	for i := 1; i <= n; i++ {
		if (i-1)%stride == 0 || i == n {
			out = append(out, i)
		}
	}
	return out
}

// Occurrence names the n-th point of points: "name" if it is the first
// time the name is passed, "name #k" for the k-th time.
func Occurrence(points []string, n int) string {
	k := 0
	for _, p := range points[:n] {
		if p == points[n-1] {
			k++
		}
	}
	if k == 1 {
		return points[n-1]
	}
	return fmt.Sprintf("%s #%d", points[n-1], k)
}

// Table renders rows as a Markdown table.
func Table(rows []Row) string {
	var b strings.Builder
	b.WriteString("| role | operation | # | crash point | outcome |\n|---|---|---|---|---|\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %s | %d | `%s` | %s |\n", r.Role, r.Operation, r.N, r.Point, r.Outcome)
	}
	return b.String()
}

// Summary counts the rows by role and operation: "operation: cases".
func Summary(rows []Row) string {
	count := map[string]int{}
	failed := map[string]int{}
	var keys []string
	for _, r := range rows {
		k := r.Role + " " + r.Operation
		if count[k] == 0 {
			keys = append(keys, k)
		}
		count[k]++
		if r.Outcome != "ok" {
			failed[k]++
		}
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s: %d crash points, %d failed\n", k, count[k], failed[k])
	}
	return b.String()
}

// Full reports whether FM_CRASH_FULL asks for every crash point rather
// than the sample CI runs.
func Full() bool {
	v := os.Getenv("FM_CRASH_FULL")
	return v == "1" || v == "true" || v == "yes"
}

// Report logs the table and, if FM_CRASH_TABLE names a folder, writes it
// there as <role>.md.
func Report(t *testing.T, role string, rows []Row) {
	t.Logf("crash-point table (%d cases):\n%s\n%s", len(rows), Summary(rows), Table(rows))
	if dir := os.Getenv("FM_CRASH_TABLE"); dir != "" {
		if err := os.WriteFile(dir+"/"+role+".md", []byte(Table(rows)), 0o644); err != nil {
			t.Errorf("crash table: %v", err)
		}
	}
}
