package protocol

import (
	"strings"
	"testing"
)

// TestAnEventFitsFMEvents: 64 KiB of output that JSON escapes six times
// over still makes an event FM_EVENTS takes, its end kept; one too large
// for another text is cut, or sent bare and failed, never in a loop.
func TestAnEventFitsFMEvents(t *testing.T) {
	output := strings.Repeat("<", 64<<10-len("the end")) + "the end"
	data, err := EncodeEvent(Event{ID: "ev-1", Instance: "in-x", Kind: EventCommand, Status: StatusFailed, Error: Errorf(CodeInternal, "failed"), Output: output})
	if err != nil || len(data) > MaxEventBytes || !strings.Contains(string(data), "the end") {
		t.Fatalf("an event with escaped output: %d bytes, %v", len(data), err)
	}
	if raw, _ := Encode(&Event{ID: "ev-1", Instance: "in-x", Kind: EventCommand, Status: StatusFailed, Error: Errorf(CodeInternal, "failed"), Output: output}); len(raw) <= MaxEventBytes {
		t.Fatalf("the output escapes to only %d bytes: the case tests nothing", len(raw))
	}
	// Too large by another text, twice over (a message and its error):
	// cut to fit, and what cannot be cut goes bare, failed, never in a
	// loop.
	long := strings.Repeat("m", 300<<10)
	for name, e := range map[string]Event{
		"a long error": {ID: "ev-2", Instance: "in-x", Kind: EventCommand, CommandID: "c-1", Status: StatusFailed,
			Message: long, Error: Errorf(CodeInternal, "%s", long)},
		"a long result": {ID: "ev-3", Instance: "in-x", Kind: EventCommand, CommandID: "c-2", Status: StatusOK,
			Result: []byte(`"` + long + `"`)},
	} {
		data, err := EncodeEvent(e)
		var got Event
		if err != nil || len(data) > MaxEventBytes || Decode(data, &got) != nil || got.ID != e.ID || got.CommandID != e.CommandID {
			t.Fatalf("%s: %d bytes, %v, %+v", name, len(data), err, got.ID)
		}
		if name == "a long result" && (got.Status != StatusFailed || got.Error == nil) {
			t.Fatalf("a result too large to send went as %+v", got)
		}
	}
}
