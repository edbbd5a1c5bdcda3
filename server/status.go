package server

import (
	"net/http"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
)

// instanceStatus is GET /instances/{id}/status: the seven fields consumers
// of Dataiku's API read, and FM's own view.
type instanceStatus struct {
	PublicURL           string `json:"publicURL"`
	HasPhysicalInstance bool   `json:"hasPhysicalInstance"`
	CloudMachineIsUp    bool   `json:"cloudMachineIsUp"`
	PublicIP            string `json:"publicIP"`
	PrivateIP           string `json:"privateIP"`
	PublicDNS           string `json:"publicDNS"`
	PrivateDNS          string `json:"privateDNS"`

	State             string                 `json:"state"`
	Since             time.Time              `json:"since,omitzero"`
	Generation        uint64                 `json:"generation"`
	ReachedGeneration uint64                 `json:"reachedGeneration"`
	AgentResponding   bool                   `json:"agentResponding"`
	LastSeen          *time.Time             `json:"lastSeen,omitempty"`
	MachineStatus     protocol.MachineStatus `json:"machineStatus,omitempty"`
	Backend           string                 `json:"backend,omitempty"`
	DSS               *protocol.DSSStatus    `json:"dss,omitempty"`
	// DSSVersion is the DSS version the data volume holds as FM recorded
	// it (the last successful reprovision): what a change of image is
	// compared with (a snapshot first, a downgrade refused), whether the
	// machine runs or not.
	DSSVersion string            `json:"dssVersion,omitempty"`
	DataVolume *volumeStatus     `json:"dataVolume,omitempty"`
	Operation  *api.OperationRef `json:"operation,omitempty"`
	LastError  *api.Error        `json:"lastError,omitempty"`
	Agent      *agentInfo        `json:"agent,omitempty"`
}

// agentInfo is the agent a running machine reported.
type agentInfo struct {
	Version string `json:"version"`
	SHA256  string `json:"sha256,omitempty"`
	// Current says whether it runs the binary FM serves (absent when FM
	// serves none): upgrade-agent brings it there. An agent that reports
	// no digest (older than upgrades) is not.
	Current *bool `json:"current,omitempty"`
}

type volumeStatus struct {
	SizeBytes uint64 `json:"sizeBytes"`
	UsedBytes uint64 `json:"usedBytes"`
}

// silentBeats is how many heartbeats an agent may miss before it is shown
// as not responding.
const silentBeats = 3

func (s *Server) instanceStatus(r *http.Request) (any, error) {
	id := r.PathValue("id")
	if _, _, ok := s.st.instances.get(id); !ok {
		return nil, notFound(kindInstance, id)
	}
	return s.statusOf(id), nil
}

func (s *Server) statusOf(id string) instanceStatus {
	lc, _, ok := s.st.lifecycle.get(id)
	if !ok {
		lc = lifecycle{State: stateCreated}
	}
	var opRef *api.OperationRef
	if lc.OpID != "" {
		if op, _, ok := s.st.ops.get(lc.OpID); ok {
			opRef = &api.OperationRef{JobID: op.JobID, Kind: op.Kind, State: op.State}
			if op.State != api.OpRunning && op.EndedAt != nil {
				lc = settled(lc, op, true, *op.EndedAt)
			}
		}
	}
	m, _, _ := s.st.machines.get(id)
	st := instanceStatus{Operation: opRef, State: lc.State, Since: lc.Since, Generation: lc.Generation, LastError: lc.Error, DSSVersion: lc.DSSVersion,
		MachineStatus: m.Status, Backend: m.Backend, HasPhysicalInstance: m.HasMachine(),
		CloudMachineIsUp: m.Status == protocol.MachineRunning,
		PublicIP:         m.PublicIP, PrivateIP: m.PrivateIP, PublicDNS: m.PublicDNS, PrivateDNS: m.PrivateDNS}
	if !st.CloudMachineIsUp {
		return st
	}
	// What the agent reports is only meaningful while the machine runs.
	ag, _, ok := s.st.agents.get(id)
	if ok {
		dss := ag.DSS
		st.DSS, st.ReachedGeneration = &dss, ag.Generation
		st.DataVolume = &volumeStatus{SizeBytes: ag.Machine.DataVolumeBytes, UsedBytes: ag.Machine.DataVolumeUsedBytes}
		st.Agent = &agentInfo{Version: ag.AgentVersion, SHA256: ag.AgentSHA256}
		if s.agent != nil {
			st.Agent.Current = ptr(ag.AgentSHA256 == s.agent.sha256)
		}
	}
	last := s.lastBeat(id)
	seen := last.at
	if ok && ag.Time.After(seen) {
		seen = ag.Time
	}
	// An agent is judged by the interval it beats at, when longer than
	// FM's: it learns a shorter one with its next desired state.
	silence := silentBeats*max(time.Duration(s.cfg.HeartbeatSeconds)*time.Second, last.every) + 2*time.Second
	if last.machine != nil && st.DataVolume != nil && time.Since(last.at) < silence {
		// A recent heartbeat's measurement is exact; the status's use is
		// rounded (it is rewritten on a change only).
		st.DataVolume = &volumeStatus{SizeBytes: last.machine.DataVolumeBytes, UsedBytes: last.machine.DataVolumeUsedBytes}
	}
	if !seen.IsZero() {
		st.LastSeen = &seen
		st.AgentResponding = time.Since(seen) < silence
	}
	port := lc.BasePort
	if st.DSS != nil && st.DSS.Port != 0 {
		port = st.DSS.Port
	}
	host := firstNonEmpty(m.PublicDNS, m.PublicIP, m.PrivateDNS, m.PrivateIP)
	if host != "" && port != 0 && st.DSS != nil && st.DSS.State != protocol.DSSAbsent {
		st.PublicURL = publicURL(host, st.DSS, port)
	}
	return st
}

func firstNonEmpty(v ...string) string {
	for _, s := range v {
		if s != "" {
			return s
		}
	}
	return ""
}
