package server

import (
	"net/http"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

// getFleet serves GET /fleet (api.Fleet; FM's own, Dataiku's FM has
// none): a summary of the instances /instances' filters keep, and the
// page's rows; rows=false leaves the rows out. It reads the server's
// copies only.
func (s *Server) getFleet(r *http.Request) (any, error) {
	q := r.URL.Query()
	p, err := pageOf(q)
	if err != nil {
		return nil, err
	}
	withRows, err := queryBool(r, "rows", true)
	if err != nil {
		return nil, err
	}
	all, _, err := s.instancesMatching(q)
	if err != nil {
		return nil, err
	}
	view := api.Fleet{Summary: api.FleetSummary{Instances: len(all),
		ByState: map[string]int{}, ByNodeType: map[string]int{}, ByDSSVersion: map[string]int{}}}
	inPage := map[string]bool{}
	if withRows {
		for _, in := range pageRows(p, all, func(in *api.Instance) string { return in.ID }) {
			inPage[in.ID] = true
		}
		view.Instances = []api.FleetRow{}
	}
	sum := &view.Summary
	snaps := s.lastSnapshotsByInstance()
	now := time.Now()
	for _, in := range all {
		st := s.statusOf(in.ID)
		h := s.healthOf(&in, st, snaps[in.ID])
		sum.ByState[st.State]++
		sum.ByNodeType[in.DSSNodeType]++
		row := api.FleetRow{ID: in.ID, Label: in.Label, State: st.State, PublicURL: st.PublicURL, AgentResponding: st.AgentResponding,
			LastSeen: st.LastSeen, Operation: st.Operation}
		if st.DSS != nil && st.DSS.State != protocol.DSSAbsent {
			// The agent's word, shown to operators' terminals: only plain
			// versions and states are passed on.
			row.DSSState, row.DSSVersion = string(st.DSS.State), st.DSS.Version
			if !labelSafe(row.DSSVersion) {
				row.DSSVersion = "(invalid)"
			}
			if !labelSafe(row.DSSState) {
				row.DSSState = "(invalid)"
			}
			sum.ByDSSVersion[row.DSSVersion]++
		}
		if h.agentNotResponding() {
			sum.AgentsNotResponding++
		}
		if h.dssDown() {
			sum.DSSDown++
		}
		if used, ok := h.volumeUsed(); ok {
			row.VolumeUsedRatio = &used
		}
		if h.volumeAbove80() {
			sum.VolumesAbove80Percent++
		}
		if st.Operation != nil && st.Operation.State == api.OpRunning {
			sum.OperationsRunning++
		}
		if st.State == stateFailed {
			sum.FailedInstances++
		}
		if h.snapshotOverdue(now) {
			sum.SnapshotsOverdue++
		}
		if h.snapshotNeverTaken() {
			sum.SnapshotsNeverTaken++
		}
		if h.snapshots.failed {
			sum.SnapshotsFailed++
		}
		if inPage[in.ID] {
			view.Instances = append(view.Instances, row)
		}
	}
	return view, nil
}
