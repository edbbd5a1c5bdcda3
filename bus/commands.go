package bus

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"slices"
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
	// indexed, if set (tests), runs between readIndexed's look at the
	// subject index and its reads.
	indexed func()
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
// subject index answers, says so. When there is something to read, each
// command being on a subject of its own, the subject index lists the
// instance's commands and each is read by its subject (readIndexed); a
// look-up of the next message matching the instance's subjects from a
// sequence, which the bus answers by reading through every message stored
// since, is the way only when the index cannot serve (readScanned).
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
	if resp, ok, err := r.readIndexed(ctx, filter, after, last); ok || err != nil {
		return resp, err
	}
	return r.readScanned(ctx, filter, after, last)
}

// maxIndexedCommands is the most commands an instance may have in the
// stream for a catch-up to read them through the subject index: one
// look-up each, every one at most one page.
const maxIndexedCommands = protocol.MaxCommandsPerAnswer

// readIndexed reads the commands of filter after sequence after, up to
// last, through the stream's subject index: the subjects of the instance's
// commands and how many messages each holds (one STREAM.INFO, answered
// from the index), then the last message of each subject. It does not
// serve (false) when the instance has more than maxIndexedCommands
// commands stored, a subject holds more than one message, or one was
// stored after last (a command published again since: its first copy, or
// a command stored between, would be skipped): readScanned reads those.
func (r *CommandReader) readIndexed(ctx context.Context, filter string, after, last uint64) (protocol.CommandsAfterResponse, bool, error) {
	var resp protocol.CommandsAfterResponse
	info, err := r.commands.Info(ctx, jetstream.WithSubjectFilter(filter))
	if err != nil {
		return resp, false, err
	}
	if r.indexed != nil {
		r.indexed()
	}
	subjects := info.State.Subjects
	if len(subjects) > maxIndexedCommands {
		return resp, false, nil
	}
	for _, n := range subjects {
		if n != 1 {
			return resp, false, nil
		}
	}
	var found []*jetstream.RawStreamMsg
	for subject := range subjects {
		m, err := r.commands.GetLastMsgForSubject(ctx, subject)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue // gone since the look-up (its age)
		}
		if err != nil {
			return resp, false, err
		}
		if m.Sequence > last {
			return resp, false, nil
		}
		if m.Sequence > after {
			found = append(found, m)
		}
	}
	slices.SortFunc(found, func(a, b *jetstream.RawStreamMsg) int { return cmp.Compare(a.Sequence, b.Sequence) })
	size := 0
	for _, m := range found {
		if !addCommand(&resp, m, &size) {
			break
		}
	}
	return resp, true, nil
}

// addCommand adds m to the answer, or says More and false when the answer
// is full (by count, or by size unless it is empty).
func addCommand(resp *protocol.CommandsAfterResponse, m *jetstream.RawStreamMsg, size *int) bool {
	if len(resp.Commands) == protocol.MaxCommandsPerAnswer || (len(resp.Commands) > 0 && *size+len(m.Data) > maxCommandsAnswerBytes) {
		resp.More = true
		return false
	}
	c := protocol.StoredCommand{Seq: m.Sequence}
	if json.Valid(m.Data) {
		c.Command = json.RawMessage(m.Data)
	}
	resp.Commands, *size = append(resp.Commands, c), *size+len(m.Data)
	return true
}

// readScanned reads the commands of filter after sequence after, up to
// last, one look-up of the next message matching filter each.
func (r *CommandReader) readScanned(ctx context.Context, filter string, after, last uint64) (protocol.CommandsAfterResponse, error) {
	commands := r.commands
	var resp protocol.CommandsAfterResponse
	size := 0
	for seq := after + 1; seq <= last; {
		msg, err := commands.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(filter))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return resp, nil
		}
		if err != nil {
			return protocol.CommandsAfterResponse{}, err
		}
		if !addCommand(&resp, msg, &size) {
			return resp, nil
		}
		seq = msg.Sequence + 1
	}
	// The last one read was the instance's last when the look-up was made;
	// any stored since is seen at the next catch-up, or live.
	return resp, nil
}
