package server

import (
	"errors"
	"net/http"
	"time"
)

// keyView is an API key as the API shows it: never its secret or hash.
type keyView struct {
	ID        string     `json:"id"`
	Label     string     `json:"label"`
	Role      string     `json:"role"`
	CreatedAt time.Time  `json:"createdAt"`
	CreatedBy string     `json:"createdBy"`
	RevokedAt *time.Time `json:"revokedAt,omitempty"`
}

func viewOf(k apiKey) keyView {
	return keyView{ID: k.ID, Label: k.Label, Role: k.Role, CreatedAt: k.CreatedAt, CreatedBy: k.CreatedBy, RevokedAt: k.RevokedAt}
}

// listKeys serves GET /api-keys (FM; admin).
func (s *Server) listKeys(r *http.Request) (any, error) {
	out := []keyView{}
	for _, k := range s.st.keys.list() {
		out = append(out, viewOf(k))
	}
	return out, nil
}

// createKeyHandler serves POST /api-keys {label, role} (FM; admin): the
// answer holds the secret, shown this once.
func (s *Server) createKeyHandler(r *http.Request) (any, error) {
	var req struct {
		Label string `json:"label"`
		Role  string `json:"role"`
	}
	if err := readJSON(r, &req); err != nil {
		return nil, err
	}
	var c checker
	c.label("label", req.Label)
	c.oneOf("role", req.Role, RoleAdmin, RoleOperator, RoleViewer)
	if err := c.err("API key"); err != nil {
		return nil, err
	}
	kf, err := s.createKey(r.Context(), trim(req.Label), req.Role, principalID(r.Context()))
	if err != nil {
		return nil, unavailable(err, "the key could not be stored")
	}
	k, _, _ := s.st.keys.get(kf.ID)
	return struct {
		keyView
		Secret string `json:"secret"`
	}{viewOf(k), kf.Secret}, nil
}

// revokeKey serves DELETE /api-keys/{id} (FM; admin). A revoked key stays
// listed, with when it was revoked; it authenticates nothing.
func (s *Server) revokeKey(r *http.Request) (any, error) {
	id := r.PathValue("id")
	for attempt := 0; attempt < 5; attempt++ {
		k, rev, err := s.st.keys.fetch(r.Context(), id)
		if errors.Is(err, errNotFound) {
			return nil, notFound("API key", id)
		}
		if err != nil {
			return nil, unavailable(err, "the key could not be read")
		}
		if k.RevokedAt != nil {
			return viewOf(k), nil
		}
		if p := principalFrom(r.Context()); p != nil && p.KeyID == id {
			return nil, precondition("a key cannot revoke itself; use another admin key")
		}
		now := time.Now().UTC()
		k.RevokedAt = &now
		if _, err := s.st.keys.update(r.Context(), id, k, rev); err == nil {
			return viewOf(k), nil
		} else if !errors.Is(err, errConflict) {
			return nil, unavailable(err, "the key could not be revoked")
		}
	}
	return nil, conflict("API key %s is being changed; retry", id)
}
