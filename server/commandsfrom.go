package server

import (
	"context"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
)

// An agent reads its commands from one consumer on FM_COMMANDS, which the
// server makes on the agent's request (protocol.CommandsFromRequest): an
// agent may not make consumers itself, since a consumer's delivery subject
// is the FM account's and one of its choosing could deliver into FM's keys.
// The consumer is the agent's by its subject, and everything else about it
// is fixed (bus.MakeCommandConsumer). No durable per-agent state exists on
// the bus.

// cmdFromInterval is how often an instance's command consumer may be made
// anew: an agent asks when it starts, after a bus outage and after a gap.
const cmdFromInterval = time.Second

// serveCommandsFrom makes agents' command consumers on request.
func (s *Server) serveCommandsFrom() (*nats.Subscription, error) {
	return serveAgentRequests(s, protocol.SubjectAllCmdFrom, "a command consumer", &s.cmdFroms,
		func(ctx context.Context, instance string, data []byte) (*protocol.CommandsFromResponse, error) {
			var req protocol.CommandsFromRequest
			if err := protocol.Decode(data, &req); err != nil {
				return nil, protocol.Errorf(protocol.CodeInvalidArgument, "the request does not decode: %v", err)
			}
			if !protocol.ValidToken(instance) {
				return nil, protocol.Errorf(protocol.CodeInvalidArgument, "%q is not an instance id", safeToken(instance))
			}
			if _, _, ok := s.st.instances.get(instance); !ok {
				return nil, protocol.Errorf(protocol.CodeNotFound, "instance %s is not known to FM", instance)
			}
			name, err := bus.MakeCommandConsumer(ctx, s.js, instance, req.After)
			if err != nil {
				return nil, protocol.Errorf(protocol.CodeUnavailable, "the command consumer could not be made: %v", err)
			}
			return &protocol.CommandsFromResponse{Consumer: name}, nil
		},
		func(perr *protocol.Error) *protocol.CommandsFromResponse {
			return &protocol.CommandsFromResponse{Error: perr}
		})
}
