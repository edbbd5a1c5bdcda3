package agent

import (
	"context"
	"encoding/json"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fleetmanager/fm/internal/cmdline"
	"github.com/fleetmanager/fm/protocol"
	"github.com/rs/zerolog"
)

// TestMemorySettings: SETUP_MEMORY_SETTINGS sets the heaps it names in
// install.ini's [javaopts], keeps the others, has DSS regenerate its
// configuration, and DSS runs with them; the same settings again change
// nothing, and do not restart DSS.
func TestMemorySettings(t *testing.T) {
	r := newRig(t)
	mem := func(p string) protocol.SetupAction { return action(protocol.ActionSetupMemorySettings, p) }
	r.startAgent()
	heaps := func() map[string]string {
		t.Helper()
		code, body := r.get("/api/runtime", r.adminKey())
		var rt struct {
			JavaOpts map[string]string `json:"javaOpts"`
		}
		if code != 200 || json.Unmarshal(body, &rt) != nil {
			t.Fatalf("runtime: %d %s", code, body)
		}
		return rt.JavaOpts
	}
	steps := []struct {
		name, params string
		want         map[string]string
		unchanged    bool
		kill         string // the backend heap a killed agent left in install.ini alone
	}{
		{name: "two heaps", params: `{"backendXmx":"2g","jekXmx":"1g"}`, want: map[string]string{"backend.xmx": "2g", "jek.xmx": "1g"}},
		{name: "one changed, the other kept", params: `{"backendXmx":"3g"}`, want: map[string]string{"backend.xmx": "3g", "jek.xmx": "1g"}},
		{name: "the same again", params: `{"backendXmx":"3g"}`, want: map[string]string{"backend.xmx": "3g", "jek.xmx": "1g"}, unchanged: true},
		// A kill between install.ini and its regeneration: install.ini as
		// asked, DSS's configuration not regenerated. The replay finishes.
		{name: "after a kill", kill: "4g", params: `{"backendXmx":"4g"}`, want: map[string]string{"backend.xmx": "4g", "jek.xmx": "1g"}},
	}
	for _, st := range steps {
		if st.kill != "" {
			m := newMachine(r.cfg, zerolog.Nop())
			if err := m.setINI(context.Background(), "javaopts", map[string]string{"backend.xmx": st.kill}, true); err != nil {
				t.Fatal(err)
			}
		}
		ini, _ := os.ReadFile(filepath.Join(r.dssDir(), "install.ini"))
		dss := cmdline.Find(r.dssDir(), "serve")
		d := r.desire("14.0.0", mem(st.params))
		if got := r.waitReady(d.Generation); got.DSS.State != protocol.DSSRunning {
			t.Fatalf("%s: DSS %+v", st.name, got.DSS)
		}
		if got := heaps(); !maps.Equal(got, st.want) {
			t.Fatalf("%s: DSS runs with the heaps %v, want %v", st.name, got, st.want)
		}
		ev := r.events.wait(t, st.name, 10*time.Second, func(e protocol.Event) bool {
			return e.Generation == d.Generation && strings.HasPrefix(e.Step, "setup-action[0] SETUP_MEMORY_SETTINGS") && e.Status != protocol.StatusStarted
		})
		if ev.Status != protocol.StatusOK {
			t.Fatalf("%s: %+v", st.name, ev)
		}
		if st.unchanged {
			after, _ := os.ReadFile(filepath.Join(r.dssDir(), "install.ini"))
			if string(after) != string(ini) || !slices.Equal(cmdline.Find(r.dssDir(), "serve"), dss) || !strings.Contains(ev.Message, "already") {
				t.Fatalf("%s changed something: install.ini %v, DSS %v → %v, %q", st.name, string(after) != string(ini), dss, cmdline.Find(r.dssDir(), "serve"), ev.Message)
			}
		}
	}
	// Refused: an administrator's hand left install.ini a heap DSS cannot
	// take; the action sets another, DSS's regeneration refuses the file,
	// the action fails with DSS's words, install.ini is put back as it was
	// and DSS runs on as before.
	{
		m := newMachine(r.cfg, zerolog.Nop())
		if err := m.setINI(context.Background(), "javaopts", map[string]string{"fek.xmx": "lots"}, false); err != nil {
			t.Fatal(err)
		}
		ini, _ := os.ReadFile(filepath.Join(r.dssDir(), "install.ini"))
		dss := cmdline.Find(r.dssDir(), "serve")
		d := r.desire("14.0.0", mem(`{"backendXmx":"5g"}`))
		st := r.waitFailed(d.Generation)
		if st.Error == nil || !strings.Contains(st.Error.Message, "SETUP_MEMORY_SETTINGS") {
			t.Fatalf("a refused regeneration: %+v", st.Error)
		}
		ev := r.events.wait(t, "the refused action", 10*time.Second, func(e protocol.Event) bool {
			return e.Generation == d.Generation && strings.HasPrefix(e.Step, "setup-action[0] SETUP_MEMORY_SETTINGS") && e.Status == protocol.StatusFailed
		})
		if !strings.Contains(ev.Output, `fek.xmx = "lots"`) {
			t.Errorf("the step does not show DSS's output: %q", ev.Output)
		}
		if after, _ := os.ReadFile(filepath.Join(r.dssDir(), "install.ini")); string(after) != string(ini) {
			t.Errorf("install.ini not put back:\n%s\nwant:\n%s", after, ini)
		}
		if got := heaps(); got["backend.xmx"] != "4g" || !slices.Equal(cmdline.Find(r.dssDir(), "serve"), dss) {
			t.Errorf("DSS after the refusal: heaps %v, processes %v → %v", got, dss, cmdline.Find(r.dssDir(), "serve"))
		}
	}
}
