package server

import (
	"fmt"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
)

// The names of the server's attempt limiters on the wire between replicas.
const (
	limiterAPIByAddr  = "api-by-addr"
	limiterAPIByKey   = "api-by-key"
	limiterJoinByAddr = "join-by-addr"
)

// The replicas of the server behind one load balancer share the failures
// their attempt limiters count: each failure is published on
// protocol.SubjectAttemptFailures (core NATS, not stored: a failure matters
// for a minute) and every other replica counts it too. A guess is so
// limited across the replicas as on one server, but for the attempts being
// checked at the same moment, which each replica reserves on its own: a
// guesser sending many at once to every replica may have up to the limit
// checked on each before the failures are known everywhere, once per
// window. A failure whose message is lost is counted by its replica only.

// limiters are the server's attempt limiters by their name on the wire.
func (s *Server) limiters() map[string]*attemptLimiter {
	return map[string]*attemptLimiter{limiterAPIByAddr: s.apiByAddr, limiterAPIByKey: s.apiByKey, limiterJoinByAddr: s.joinByAddr}
}

// publishFailure tells the other replicas of a failure a limiter counted.
func (s *Server) publishFailure(limiter, key string, at time.Time) {
	data, err := protocol.Encode(&protocol.AttemptFailure{Replica: s.replica, Limiter: limiter, Key: []byte(key), At: at})
	if err == nil {
		err = s.cfg.Conn.Publish(protocol.SubjectAttemptFailures, data)
	}
	if err != nil {
		// Debug: a guesser's failures during a bus outage would flood the log.
		s.log.Debug().Err(err).Str("limiter", limiter).Msg("a failed attempt was not told to the other replicas")
	}
}

// followFailures counts the failures the other replicas publish, until the
// subscription it returns ends. A replica starting (or away from the bus)
// misses the failures told meanwhile: it counts from when it follows.
func (s *Server) followFailures() (*nats.Subscription, error) {
	limiters := s.limiters()
	sub, err := s.cfg.Conn.Subscribe(protocol.SubjectAttemptFailures, func(m *nats.Msg) {
		var f protocol.AttemptFailure
		if err := protocol.Decode(m.Data, &f); err != nil {
			s.log.Warn().Err(err).Msg("attempt failure from a replica rejected")
			return
		}
		if l := limiters[f.Limiter]; l != nil && f.Replica != s.replica {
			l.learn(string(f.Key), f.At)
		}
	})
	if err == nil {
		err = s.cfg.Conn.Flush() // the bus has the subscription
	}
	if err != nil {
		return nil, fmt.Errorf("other replicas' attempt failures: %w", err)
	}
	return sub, nil
}
