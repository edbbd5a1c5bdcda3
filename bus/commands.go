package bus

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// maxCommandsAnswerBytes bounds the commands of one catch-up answer, so
// that it stays well within NATS's 1 MiB payload; one command larger than
// it goes alone.
const maxCommandsAnswerBytes = 256 << 10

// CommandReader answers agents' catch-ups (protocol.CommandsAfterRequest)
// from FM_COMMANDS, without a consumer per agent on the bus. It is safe for
// concurrent use.
type CommandReader struct {
	commands jetstream.Stream
	mu       sync.Mutex
	last     uint64    // FM_COMMANDS's last sequence
	lastAt   time.Time // when it was read
}

// NewCommandReader reads from commands, FM_COMMANDS's handle.
func NewCommandReader(commands jetstream.Stream) *CommandReader {
	return &CommandReader{commands: commands}
}

// streamLastTTL is how long FM_COMMANDS's last sequence is taken as read:
// it only tells a cursor beyond the stream's end (a bus restored or
// replaced, which restarts FM too) from one past an instance's last
// command, and an idle fleet's agents each ask every few minutes.
const streamLastTTL = 10 * time.Second

func (r *CommandReader) streamLast(ctx context.Context) (uint64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.lastAt.IsZero() && time.Since(r.lastAt) < streamLastTTL {
		return r.last, nil
	}
	info, err := r.commands.Info(ctx)
	if err != nil {
		return 0, err
	}
	r.last, r.lastAt = info.State.LastSeq, time.Now()
	return r.last, nil
}

// After reads instance's commands from FM_COMMANDS stored after stream
// sequence after, in order: at most
// protocol.MaxCommandsPerAnswer and about maxCommandsAnswerBytes, More
// saying that others follow, or Reset if after is beyond the stream's last
// sequence.
//
// Most catch-ups find nothing (an agent that reconnected, or checks now and
// then): one look-up of the instance's last command, which the stream's
// subject index answers, says so; only when there is something to read is
// it read, one look-up by subject each.
func (r *CommandReader) After(ctx context.Context, instance string, after uint64) (protocol.CommandsAfterResponse, error) {
	commands := r.commands
	var resp protocol.CommandsAfterResponse
	filter := protocol.CommandFilter(instance)
	var last uint64
	switch m, err := commands.GetLastMsgForSubject(ctx, filter); {
	case err == nil:
		last = m.Sequence
	case !errors.Is(err, jetstream.ErrMsgNotFound):
		return resp, err
	}
	if last <= after {
		if after > last {
			streamLast, err := r.streamLast(ctx)
			if err != nil {
				return resp, err
			}
			resp.Reset = after > streamLast
		}
		return resp, nil
	}
	size := 0
	for seq := after + 1; seq <= last; {
		msg, err := commands.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(filter))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return resp, nil
		}
		if err != nil {
			return protocol.CommandsAfterResponse{}, err
		}
		if len(resp.Commands) == protocol.MaxCommandsPerAnswer || (len(resp.Commands) > 0 && size+len(msg.Data) > maxCommandsAnswerBytes) {
			resp.More = true
			return resp, nil
		}
		c := protocol.StoredCommand{Seq: msg.Sequence}
		if json.Valid(msg.Data) {
			c.Command = json.RawMessage(msg.Data)
		}
		resp.Commands, size, seq = append(resp.Commands, c), size+len(msg.Data), msg.Sequence+1
	}
	// The last one read was the instance's last when the look-up was made;
	// any stored since is seen at the next catch-up, or live.
	return resp, nil
}
