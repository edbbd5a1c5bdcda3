package bus

import (
	"context"
	"errors"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// errCodeDuplicateInProcess is a replicated stream's answer to a publish
// whose message id an earlier publish, still being agreed on, carries
// (nats-server's JSStreamDuplicateMessageConflict, 409): not yet answered.
const errCodeDuplicateInProcess = 10158

// Unanswered reports whether err says the bus did not answer a request,
// or could not yet: the connection away or reconnecting, no responder, no
// answer in time, a JetStream API error of status 5xx (a stream with no
// leader yet, as for seconds after a cluster node is lost), 408 or 429, or
// a message id still being agreed on (errCodeDuplicateInProcess).
// Such a request may still have taken effect, and asking again may
// succeed: a caller tries again until a deadline, and tells its own write
// acknowledged too late from another's.
func Unanswered(err error) bool {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		return apiErr.Code >= 500 || apiErr.Code == 408 || apiErr.Code == 429 ||
			apiErr.ErrorCode == errCodeDuplicateInProcess
	}
	return errors.Is(err, nats.ErrTimeout) || errors.Is(err, nats.ErrNoResponders) || errors.Is(err, nats.ErrConnectionClosed) ||
		errors.Is(err, nats.ErrDisconnected) || errors.Is(err, nats.ErrConnectionReconnecting) ||
		errors.Is(err, nats.ErrConnectionDraining) || errors.Is(err, nats.ErrInvalidConnection) ||
		errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, context.DeadlineExceeded)
}
