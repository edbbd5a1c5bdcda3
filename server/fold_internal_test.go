package server

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// TestWhatIsFoldedAgain: an event whose folding met the bus away, slow or
// busy, or lost a race, is folded again; one that would fail the same way
// is not, so that it does not hold a place every instance shares.
func TestWhatIsFoldedAgain(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{nats.ErrTimeout, true},
		{fmt.Errorf("update op: %w", nats.ErrNoResponders), true},
		{jetstream.ErrNoStreamResponse, true},
		{context.DeadlineExceeded, true},
		{fmt.Errorf("change op: %w", errConflict), true},
		{&jetstream.APIError{Code: 503, ErrorCode: 10008, Description: "JetStream system temporarily unavailable"}, true},
		{&jetstream.APIError{Code: 500, ErrorCode: 10009, Description: "JetStream cluster can not handle request"}, true},
		{fmt.Errorf("put: %w", nats.ErrConnectionDraining), true},
		{&jetstream.APIError{Code: 400, ErrorCode: 10054, Description: "maximum payload exceeded"}, false},
		{jetstream.ErrInvalidKey, false},
		{errors.New("the result does not decode"), false},
	} {
		t.Run(fmt.Sprint(c.err), func(t *testing.T) {
			if got := foldAgain(c.err); got != c.want {
				t.Fatalf("foldAgain(%v) = %v, want %v", c.err, got, c.want)
			}
		})
	}
}
