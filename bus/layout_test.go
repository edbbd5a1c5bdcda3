package bus_test

import (
	"errors"
	"strconv"
	"testing"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/bus/bustest"
	"github.com/fleetmanager/fm/protocol"
)

// TestDeclareStampsTheLayout: every stream, bucket and object store FM
// declares carries this FM's layout version, a bus stamped by nobody (an
// FM before stamps) is taken as it is and stamped, and a bus a newer FM
// stamped, or stamped with something unreadable, is refused before
// anything is changed.
func TestDeclareStampsTheLayout(t *testing.T) {
	srv := bustest.RunBare(t)
	js := srv.JetStream(t)
	topo := bus.DefaultTopology()
	if err := topo.Declare(ctx(t), js); err != nil {
		t.Fatal(err)
	}
	names := topo.StreamNames()
	stampOf := func(name string) string {
		t.Helper()
		st, err := js.Stream(ctx(t), name)
		if err != nil {
			t.Fatal(err)
		}
		return st.CachedInfo().Config.Metadata[bus.LayoutKey]
	}
	for _, name := range names {
		if got := stampOf(name); got != strconv.Itoa(bus.LayoutVersion) {
			t.Errorf("stream %s: layout stamp %q, want %d", name, got, bus.LayoutVersion)
		}
	}
	restamp := func(name string, stamp string) {
		t.Helper()
		st, err := js.Stream(ctx(t), name)
		if err != nil {
			t.Fatal(err)
		}
		cfg := st.CachedInfo().Config
		if stamp == "" {
			delete(cfg.Metadata, bus.LayoutKey)
		} else {
			cfg.Metadata[bus.LayoutKey] = stamp
		}
		if _, err := js.UpdateStream(ctx(t), cfg); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("a bus before stamps", func(t *testing.T) {
		for _, name := range names {
			restamp(name, "")
		}
		if err := topo.Declare(ctx(t), js); err != nil {
			t.Fatal(err)
		}
		for _, name := range names {
			if got := stampOf(name); got != strconv.Itoa(bus.LayoutVersion) {
				t.Errorf("stream %s: layout stamp %q after declaring, want %d", name, got, bus.LayoutVersion)
			}
		}
	})

	for _, tc := range []struct {
		name, stamp string
		newer       bool
	}{
		{"a newer layout", strconv.Itoa(bus.LayoutVersion + 1), true},
		{"an unreadable stamp", "two", false},
		{"a zero stamp", "0", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// One stamp on the last stream declared, and a change the
			// declaration would undo on the first: a refusal leaves it.
			restamp(protocol.StreamAudit, tc.stamp)
			defer restamp(protocol.StreamAudit, strconv.Itoa(bus.LayoutVersion))
			changed := topo
			changed.LogsMaxAge = 3 * time.Hour
			err := changed.Declare(ctx(t), js)
			var le *bus.LayoutError
			if !errors.As(err, &le) || le.Stream != protocol.StreamAudit || errors.Is(err, bus.ErrNewerLayout) != tc.newer {
				t.Fatalf("declare on a bus stamped %q: %v", tc.stamp, err)
			}
			t.Log(err)
			st, err := js.Stream(ctx(t), protocol.StreamLogs)
			if err != nil {
				t.Fatal(err)
			}
			if st.CachedInfo().Config.MaxAge == 3*time.Hour {
				t.Fatal("a refused declaration changed the bus")
			}
		})
	}
}
