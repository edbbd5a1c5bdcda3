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
