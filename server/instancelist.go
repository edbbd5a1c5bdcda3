package server

import (
	"encoding/json"
	"sync"

	"github.com/fleetmanager/fm/api"
)

// preEncoded is a response body already encoded as JSON: writeJSON writes
// it as it is.
type preEncoded []byte

// instanceEncodings keeps every instance's JSON as the last list wrote it,
// so that a list of a big fleet encodes only the instances that changed:
// an encoding is reused while the instance's revision and the labels read
// into it are the same.
type instanceEncodings struct {
	mu   sync.Mutex
	byID map[string]instanceEncoding
	// wholes are the last lists of every instance, by what they were made
	// from: served again as they are while nothing they were made from
	// changed (a fleet of 10,000 is 8 MB of JSON).
	wholes map[wholeListKey]preEncoded
}

// wholeListKey is what a list of every instance is made from: the
// generations of the copies it reads (instances, and the networks' and
// templates' labels), and whether it was redacted for a viewer.
type wholeListKey struct {
	instances, networks, templates uint64
	viewer                         bool
}

// whole is the list kept for key, if any.
func (e *instanceEncodings) whole(key wholeListKey) (preEncoded, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	b, ok := e.wholes[key]
	return b, ok
}

// keepWhole keeps body as the list for key, in place of any older one of
// the same redaction.
func (e *instanceEncodings) keepWhole(key wholeListKey, body preEncoded) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for k := range e.wholes {
		if k.viewer == key.viewer {
			delete(e.wholes, k)
		}
	}
	if e.wholes == nil {
		e.wholes = map[wholeListKey]preEncoded{}
	}
	e.wholes[key] = body
}

type instanceEncoding struct {
	rev                    uint64
	networkLabel, tplLabel string
	data                   json.RawMessage
}

// list encodes instances (labels filled, redacted as the caller may see
// them) as a JSON array. The encoding of an instance redaction changed
// (redacted[i]) is neither taken from nor left in the kept ones. whole says
// all is every instance: only then are encodings of instances gone dropped.
func (e *instanceEncodings) list(all []api.Instance, redacted []bool, whole bool) (preEncoded, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.byID == nil {
		e.byID = map[string]instanceEncoding{}
	}
	size := 2
	parts := make([]json.RawMessage, len(all))
	for i := range all {
		in := &all[i]
		cached, ok := e.byID[in.ID]
		keep := !redacted[i]
		if ok && keep && cached.rev == in.Revision && cached.networkLabel == in.VirtualNetworkLabel && cached.tplLabel == in.InstanceSettingsTemplateLabel {
			parts[i] = cached.data
		} else {
			b, err := json.Marshal(in)
			if err != nil {
				return nil, err
			}
			parts[i] = b
			if keep {
				e.byID[in.ID] = instanceEncoding{rev: in.Revision, networkLabel: in.VirtualNetworkLabel,
					tplLabel: in.InstanceSettingsTemplateLabel, data: b}
			}
		}
		size += len(parts[i]) + 1
	}
	// Encodings of instances gone are dropped once they are many.
	if whole && len(e.byID) > len(all)+len(all)/4+64 {
		present := make(map[string]bool, len(all))
		for i := range all {
			present[all[i].ID] = true
		}
		for id := range e.byID {
			if !present[id] {
				delete(e.byID, id)
			}
		}
	}
	out := make([]byte, 0, size)
	out = append(out, '[')
	for i, p := range parts {
		if i > 0 {
			out = append(out, ',')
		}
		out = append(out, p...)
	}
	return append(out, ']'), nil
}
