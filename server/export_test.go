package server

import "context"

// HoldTemplateReplays has s behave as if a template-wide replay were under
// way until the returned func is called.
func HoldTemplateReplays(s *Server) (release func()) {
	s.replayingTpl.Lock()
	return s.replayingTpl.Unlock
}

// EndNeverStarted has s do what the sweep does to an operation it found
// recorded and its target not claimed: a sweep that read the target before
// the claim ends the operation only after it.
func EndNeverStarted(s *Server, opID string) {
	op, _, err := s.st.ops.fetch(context.Background(), opID)
	if err != nil {
		panic(err)
	}
	s.endNeverStarted(context.Background(), op, op.Instance)
}

// HeartbeatKept says whether s keeps a last heartbeat for instance id.
func HeartbeatKept(s *Server, id string) bool {
	s.fold.mu.Lock()
	defer s.fold.mu.Unlock()
	_, ok := s.fold.beats[id]
	return ok
}

// MaxListedRevocations is maxListedRevocations.
const MaxListedRevocations = maxListedRevocations
