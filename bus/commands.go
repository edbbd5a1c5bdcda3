package bus

import (
	"context"
	"errors"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// CommandConsumerIdle is how long the bus keeps an agent's command
// consumer that nobody pulls from.
const CommandConsumerIdle = 2 * time.Minute

// MakeCommandConsumer makes instance's command consumer on FM_COMMANDS
// (protocol.CommandConsumer) anew, delivering from stream sequence after+1
// (0: from the first) and returns its name. Everything about it is fixed:
// pulled, in memory, one replica, only that instance's commands, gone
// after CommandConsumerIdle. Where a consumer starts cannot be changed on
// one a previous run left, so that one goes first; made twice, it is made
// twice, from where the second asks.
func MakeCommandConsumer(ctx context.Context, js jetstream.JetStream, instance string, after uint64) (string, error) {
	name := protocol.CommandConsumer(instance)
	cfg := jetstream.ConsumerConfig{Name: name, FilterSubject: protocol.CommandFilter(instance),
		AckPolicy: jetstream.AckNonePolicy, MemoryStorage: true, Replicas: 1, InactiveThreshold: CommandConsumerIdle}
	if after > 0 {
		cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, after+1
	}
	if err := js.DeleteConsumer(ctx, protocol.StreamCommands, name); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
		return "", err
	}
	if _, err := js.CreateConsumer(ctx, protocol.StreamCommands, cfg); err != nil {
		return "", err
	}
	return name, nil
}
