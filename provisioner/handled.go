package provisioner

import (
	"context"
	"maps"
	"slices"
	"strings"

	"github.com/fleetmanager/fm/protocol"
)

// The requests beside the lifecycle (snapshot, delete-snapshot,
// grow-volume) leave the machine record's RequestID alone, so the last
// ones handled are listed in the record's Details under detailHandled
// (ids separated by commas, the oldest first), at most keptHandled of
// them: enough to cover every such request that can still be delivered
// again (they are acknowledged one after the other, per instance).
const (
	detailHandled = "handledRequests"
	keptHandled   = 32
)

// handled reports whether the record lists request id as handled.
func handled(st protocol.MachineState, id string) bool {
	return slices.Contains(handledIDs(st.Details), id)
}

func handledIDs(details map[string]string) []string {
	if v := details[detailHandled]; v != "" {
		return strings.Split(v, ",")
	}
	return nil
}

// recordHandled adds request id to the instance's list of handled
// requests beside the lifecycle, dropping the oldest beyond keptHandled.
func (p *Provisioner) recordHandled(ctx context.Context, instance, id string) error {
	return p.changeState(ctx, instance, func(st *protocol.MachineState) {
		ids := handledIDs(st.Details)
		if slices.Contains(ids, id) {
			return
		}
		ids = append(ids, id)
		if len(ids) > keptHandled {
			ids = ids[len(ids)-keptHandled:]
		}
		st.Details = maps.Clone(st.Details)
		if st.Details == nil {
			st.Details = map[string]string{}
		}
		st.Details[detailHandled] = strings.Join(ids, ",")
	})
}

// keepHandled carries the list of handled requests of the record before a
// machine operation into the details the backend gave the record after it
// (which describe the machine and know nothing of the list).
func keepHandled(next, cur map[string]string) map[string]string {
	v := cur[detailHandled]
	if v == "" || next[detailHandled] == v {
		return next
	}
	next = maps.Clone(next)
	if next == nil {
		next = map[string]string{}
	}
	next[detailHandled] = v
	return next
}
