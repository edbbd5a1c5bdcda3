package server

import (
	"context"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
)

// An agent receives each of its commands as FM_COMMANDS stores it,
// republished on its instance's live subject (protocol.CommandLiveSubject),
// and asks the server for those stored while it was away
// (protocol.CommandsAfterRequest): when it starts, after a reconnection,
// and now and then. Agents may not read FM_COMMANDS themselves: a read by
// subject is chosen in the request's body, which no permission can
// narrow to the agent's own instance. No per-agent state exists on the
// bus.

// cmdAfterInterval is how often an instance's agent may ask: a page of
// commands at most, each a lookup in FM_COMMANDS's subject index.
const cmdAfterInterval = protocol.CommandsAfterPace

// serveCommandsAfter answers agents' catch-ups.
func (s *Server) serveCommandsAfter() (*nats.Subscription, error) {
	return serveAgentRequests(s, protocol.SubjectAllCmdAfter, "commands", &s.cmdAfters,
		func(ctx context.Context, instance string, data []byte) (*protocol.CommandsAfterResponse, error) {
			var req protocol.CommandsAfterRequest
			if err := protocol.Decode(data, &req); err != nil {
				return nil, protocol.Errorf(protocol.CodeInvalidArgument, "the request does not decode: %v", err)
			}
			if !protocol.ValidToken(instance) {
				return nil, protocol.Errorf(protocol.CodeInvalidArgument, "%q is not an instance id", safeToken(instance))
			}
			if _, _, ok := s.st.instances.get(instance); !ok {
				return nil, protocol.Errorf(protocol.CodeNotFound, "instance %s is not known to FM", instance)
			}
			resp, err := s.commandReader.After(ctx, instance, req.After)
			if err != nil {
				return nil, protocol.Errorf(protocol.CodeUnavailable, "FM_COMMANDS could not be read: %v", err)
			}
			return &resp, nil
		},
		func(perr *protocol.Error) *protocol.CommandsAfterResponse {
			return &protocol.CommandsAfterResponse{Error: perr}
		})
}
