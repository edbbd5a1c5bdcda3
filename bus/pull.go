package bus

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Pull hands the messages of a durable consumer to handle, fetched in
// batches of n, until ctx ends (it then returns nil) or a fetch fails.
//
// It fetches rather than letting the client pull ahead (Consume): a process
// that stops must receive every message the bus delivered to it, to hand
// back what it will not handle, or the next process waits for the whole
// ack wait; a message sent to a subscription already closed is lost until
// then. What a batch still brings once ctx ended is handed back (Nak); the
// caller flushes its connection before closing it.
func Pull(ctx context.Context, cons jetstream.Consumer, n int, handle func(jetstream.Msg)) error {
	for ctx.Err() == nil {
		batch, err := cons.Fetch(n, jetstream.FetchMaxWait(time.Second))
		if err != nil {
			return err
		}
		for m := range batch.Messages() {
			if ctx.Err() != nil {
				_ = m.Nak()
				continue
			}
			handle(m)
		}
		if err := batch.Error(); err != nil && ctx.Err() == nil &&
			!errors.Is(err, nats.ErrTimeout) && !errors.Is(err, jetstream.ErrNoMessages) {
			return err
		}
	}
	return nil
}
