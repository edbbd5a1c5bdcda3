package protocol

import (
	"encoding/json"
	"fmt"
)

// Version is the protocol version this build speaks; see the package
// documentation for its history.
const Version = 1

// Header is embedded in every message type. V is the protocol version the
// message was written with; Encode sets it.
type Header struct {
	V int `json:"v"`
}

func (h *Header) header() *Header { return h }

// Message is implemented by every message type of this package.
type Message interface {
	header() *Header
	// Validate checks the rules of the type that JSON decoding cannot: required
	// fields, known enum values, valid subject tokens.
	Validate() error
}

// Encode validates m, stamps it with Version and returns its JSON encoding.
func Encode(m Message) ([]byte, error) {
	m.header().V = Version
	if err := m.Validate(); err != nil {
		return nil, fmt.Errorf("encode %T: %w", m, err)
	}
	return json.Marshal(m)
}

// Decode parses data into m, which must be a freshly allocated message. It
// rejects data that is not a JSON object of m's shape, that has no version or
// an unsupported one, or that fails m's Validate; the error wraps
// ErrMalformed or ErrUnsupportedVersion.
func Decode(data []byte, m Message) error {
	if err := json.Unmarshal(data, m); err != nil {
		if v, ok := probeVersion(data); ok && !supported(v) {
			return fmt.Errorf("%w: %d (this build speaks 1 to %d)", ErrUnsupportedVersion, v, Version)
		}
		return fmt.Errorf("%w: %T: %v", ErrMalformed, m, err)
	}
	v := m.header().V
	if v == 0 {
		return fmt.Errorf("%w: %T: no protocol version", ErrMalformed, m)
	}
	if !supported(v) {
		return fmt.Errorf("%w: %d (this build speaks 1 to %d)", ErrUnsupportedVersion, v, Version)
	}
	if err := m.Validate(); err != nil {
		return fmt.Errorf("%w: %T: %v", ErrMalformed, m, err)
	}
	return nil
}

func supported(v int) bool { return v >= 1 && v <= Version }

func probeVersion(data []byte) (int, bool) {
	var p struct {
		V *int `json:"v"`
	}
	if json.Unmarshal(data, &p) != nil || p.V == nil {
		return 0, false
	}
	return *p.V, true
}

// EncodeEvent encodes e within MaxEventBytes (less room for the
// headers): escaping in JSON may make 64 KiB of output six times as long.
// It cuts the output from the front (its end says most), then every other
// text to 1 KiB; an event that still does not fit goes as itself without
// its texts, failed, saying so, so that a result is never lost. Senders use it for every event.
func EncodeEvent(e Event) ([]byte, error) {
	const (
		room   = MaxEventBytes - 4<<10
		keep   = 1 << 10
		marker = "[…cut…]"
	)
	cut := func(s string) string {
		if len(s) <= keep+len(marker) {
			return s
		}
		return s[:keep] + marker
	}
	for {
		data, err := Encode(&e)
		if err != nil || len(data) <= room {
			return data, err
		}
		if len(e.Output) > 256 {
			e.Output = marker + "\n" + e.Output[len(e.Output)/2:]
			continue
		}
		short := e
		short.Output, short.Message, short.Step = cut(e.Output), cut(e.Message), cut(e.Step)
		if e.Error != nil {
			shortErr := *e.Error
			shortErr.Message = cut(shortErr.Message)
			short.Error = &shortErr
		}
		if data, err := Encode(&short); err != nil || len(data) <= room {
			return data, err
		}
		bare := Event{ID: e.ID, Instance: e.Instance, Kind: e.Kind, Time: e.Time, Source: e.Source, Generation: e.Generation,
			OpID: e.OpID, CommandID: e.CommandID, Snapshot: e.Snapshot, Step: cut(e.Step), Status: StatusFailed,
			Message: "the event was too large to send",
			Error:   Errorf(CodeResourceExhausted, "the event was %d bytes, over the %d FM_EVENTS takes", len(data), room)}
		return Encode(&bare)
	}
}
