package agent

import (
	"context"
	"fmt"

	"github.com/fleetmanager/fm/protocol"
)

// simulateConverge is a simulated machine's convergence (Config.Simulated):
// the generation is reached at once, with DSS reported running at the
// desired version, through the same status and events a real convergence
// sends. The simulated DSS's credentials (an initial password, an admin API
// key) are made at random the first time and kept where a real machine's
// are, so that FM fetches them as from any machine.
func (a *Agent) simulateConverge(_ context.Context, d *protocol.DesiredState) error {
	a.converging(d)
	var s dssSecrets
	if _, err := loadJSON(a.m.secretsPath(), &s); err != nil {
		return a.fail(d, &stepError{step: "credentials", code: protocol.CodeInternal, err: err})
	}
	if s.InitialPassword == "" || s.AdminAPIKey == "" {
		s = dssSecrets{InitialPassword: randomPassword(20), AdminAPIKey: randomPassword(32), KeyLabel: "fleet-manager-simulated"}
		if err := saveJSON(a.m.secretsPath(), s, 0o600); err != nil {
			return a.fail(d, &stepError{step: "credentials", code: protocol.CodeInternal, err: err})
		}
	}
	a.rep.event(protocol.Event{Kind: protocol.EventStep, Generation: d.Generation, Step: "ready", Status: protocol.StatusOK,
		Message: "generation " + fmt.Sprint(d.Generation) + " reached (simulated machine)"})
	a.rep.updateStatus(func(s *protocol.AgentStatus) {
		s.Phase, s.Generation, s.Target, s.Step, s.Error = protocol.PhaseReady, d.Generation, d.Generation, "", nil
		s.DSS = protocol.DSSStatus{State: protocol.DSSRunning, Version: d.DSS.Version, NodeType: d.NodeType, Port: d.DSS.Port}
	})
	return nil
}

// simulateCommand is a simulated machine's command: what only changes
// DSS's run state succeeds at once (and is reflected in the status), the
// simulated DSS's credentials are answered as a real machine's are, and
// what needs a real DSS (a password reset, a diagnosis) fails as
// unimplemented rather than inventing an answer.
func (a *Agent) simulateCommand(_ context.Context, cmd protocol.Command) commandResult {
	setState := func(st protocol.DSSState) {
		a.rep.updateStatus(func(s *protocol.AgentStatus) { s.DSS.State = st })
	}
	switch cmd.Kind {
	case protocol.CommandRestartDSS, protocol.CommandStartDSS:
		setState(protocol.DSSRunning)
		return commandResult{message: "DSS started (simulated machine)"}
	case protocol.CommandStopDSS:
		setState(protocol.DSSStopped)
		return commandResult{message: "DSS stopped (simulated machine)"}
	case protocol.CommandReplaySetupActions, protocol.CommandGrowFilesystem:
		return commandResult{message: string(cmd.Kind) + " done (simulated machine)"}
	case protocol.CommandGetInitialPassword, protocol.CommandGetAdminAPIKey:
		return a.dssSecret(cmd.Kind)
	}
	return commandResult{err: protocol.Errorf(protocol.CodeUnimplemented, "%s needs a real DSS; this is a simulated machine", cmd.Kind)}
}
