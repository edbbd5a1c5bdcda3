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

// KeepInProgress tells the bus, every interval until the returned cancel is
// called or ctx ends, that m is still being worked on, so that its ack wait
// does not hand it to another process meanwhile. The returned context ends
// with the work.
func KeepInProgress(ctx context.Context, m jetstream.Msg, every time.Duration) (context.Context, context.CancelFunc) {
	working, done := context.WithCancel(ctx)
	go func() {
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-working.Done():
				return
			case <-t.C:
				_ = m.InProgress()
			}
		}
	}()
	return working, done
}
