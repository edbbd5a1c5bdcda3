package crashtest

import (
	"fmt"
	"testing"
)

// TestSelectPointsCoversBothSidesOverTheTable: in the short mode, the
// points kept shift from one operation to the next, so that over the
// operations every place of an operation's points is run (both sides of
// each :before/:after pair), and each operation still runs its first and
// last point and one in stride.
func TestSelectPointsCoversBothSidesOverTheTable(t *testing.T) {
	for _, tc := range []struct{ n, stride int }{{9, 2}, {10, 2}, {10, 3}, {14, 3}, {2, 3}, {1, 2}, {7, 1}} {
		t.Run(fmt.Sprintf("%d-points-stride-%d", tc.n, tc.stride), func(t *testing.T) {
			seen := map[int]bool{}
			for op := range tc.stride {
				got := selectPoints(tc.n, tc.stride, op)
				if len(got) == 0 || got[0] != 1 || got[len(got)-1] != tc.n {
					t.Fatalf("offset %d: %v does not keep the first and the last point", op, got)
				}
				if max := tc.n/tc.stride + 2; len(got) > max {
					t.Fatalf("offset %d: %d points kept of %d, more than one in %d", op, len(got), tc.n, tc.stride)
				}
				for i, p := range got {
					if p < 1 || p > tc.n || (i > 0 && p <= got[i-1]) {
						t.Fatalf("offset %d: %v", op, got)
					}
					seen[p] = true
				}
			}
			if len(seen) != tc.n {
				t.Fatalf("over %d operations, %d of the %d points ran: %v", tc.stride, len(seen), tc.n, seen)
			}
		})
	}
}
