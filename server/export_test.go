package server

// HoldTemplateReplays has s behave as if a template-wide replay were under
// way until the returned func is called.
func HoldTemplateReplays(s *Server) (release func()) {
	s.replayingTpl.Lock()
	return s.replayingTpl.Unlock
}
