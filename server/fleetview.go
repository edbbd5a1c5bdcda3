package server

import (
	"net/http"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

// fleetView is GET /fleet, FM's own (Dataiku's FM has none): the fleet at
// a glance, as `fm status` summarises it and `fm instance list` shows each
// instance. It takes /instances' filters and page (the summary counts every
// instance the filters keep, the rows are the page); rows=false leaves the
// rows out. It reads the server's copies only.
type fleetView struct {
	Summary   fleetSummary `json:"summary"`
	Instances []fleetRow   `json:"instances"` // null with rows=false
}

type fleetSummary struct {
	Instances    int            `json:"instances"`
	ByState      map[string]int `json:"byState"`
	ByNodeType   map[string]int `json:"byNodeType"`
	ByDSSVersion map[string]int `json:"byDSSVersion"`
	// AgentsNotResponding counts running instances, no operation under
	// way, whose agent missed three heartbeats; DSSDown those whose agent
	// answers and DSS does not (the alerts' conditions).
	AgentsNotResponding int `json:"agentsNotResponding"`
	DSSDown             int `json:"dssDown"`
	// VolumesAbove80Percent counts data volumes more than 80% full.
	VolumesAbove80Percent int `json:"volumesAbove80Percent"`
	OperationsRunning     int `json:"operationsRunning"`
	// FailedInstances are in state failed (their last operation failed).
	FailedInstances int `json:"failedInstances"`
}

// fleetRow is one instance's state, as its status says it.
type fleetRow struct {
	ID              string        `json:"id"`
	State           string        `json:"state"`
	DSSState        string        `json:"dssState,omitempty"`
	DSSVersion      string        `json:"dssVersion,omitempty"`
	PublicURL       string        `json:"publicURL,omitempty"`
	AgentResponding bool          `json:"agentResponding"`
	LastSeen        *time.Time    `json:"lastSeen,omitempty"`
	VolumeUsedRatio *float64      `json:"volumeUsedRatio,omitempty"`
	Operation       *operationRef `json:"operation,omitempty"`
}

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
	view := fleetView{Summary: fleetSummary{Instances: len(all),
		ByState: map[string]int{}, ByNodeType: map[string]int{}, ByDSSVersion: map[string]int{}}}
	inPage := map[string]bool{}
	if withRows {
		for _, in := range pageRows(p, all, func(in *api.Instance) string { return in.ID }) {
			inPage[in.ID] = true
		}
		view.Instances = []fleetRow{}
	}
	sum := &view.Summary
	for _, in := range all {
		st := s.statusOf(in.ID)
		sum.ByState[st.State]++
		sum.ByNodeType[in.DSSNodeType]++
		row := fleetRow{ID: in.ID, State: st.State, PublicURL: st.PublicURL, AgentResponding: st.AgentResponding,
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
		if agentExpected(st) && !st.AgentResponding {
			sum.AgentsNotResponding++
		}
		if st.AgentResponding && settledRunning(st) && st.DSS != nil && st.DSS.State != protocol.DSSRunning {
			sum.DSSDown++
		}
		if v := st.DataVolume; v != nil && v.SizeBytes > 0 {
			used := float64(v.UsedBytes) / float64(v.SizeBytes)
			row.VolumeUsedRatio = &used
			if used > 0.8 {
				sum.VolumesAbove80Percent++
			}
		}
		if st.Operation != nil && st.Operation.State == api.OpRunning {
			sum.OperationsRunning++
		}
		if st.State == stateFailed {
			sum.FailedInstances++
		}
		if inPage[in.ID] {
			view.Instances = append(view.Instances, row)
		}
	}
	return view, nil
}
