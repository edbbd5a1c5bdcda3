package server

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// secretCommandPrefix marks the commands by which the server fetches the
// DSS credentials an agent created; their results go to fm_secrets, not to
// an operation.
const secretCommandPrefix = "sec-"

// requestSecrets asks an instance's agent for the credentials FM keeps
// (DSS's initial admin password and an admin API key) until FM has them, at
// most every three RepublishAfter (30 seconds).
func (s *Server) requestSecrets(ctx context.Context, id string) {
	sec, rev, _ := s.st.secrets.get(id)
	if s.hasSecrets(id) || time.Since(sec.Requested) < 3*s.cfg.RepublishAfter {
		return
	}
	sec.Requested = time.Now().UTC()
	var err error
	if rev == 0 {
		_, err = s.st.secrets.create(ctx, id, sec)
	} else {
		_, err = s.st.secrets.update(ctx, id, sec, rev)
	}
	if err != nil {
		return // another replica asks
	}
	for _, kind := range []protocol.CommandKind{protocol.CommandGetInitialPassword, protocol.CommandGetAdminAPIKey} {
		c := protocol.Command{ID: protocol.NewID(strings.TrimSuffix(secretCommandPrefix, "-")), Instance: id, Kind: kind,
			Issued: time.Now().UTC(), Expires: time.Now().Add(5 * time.Minute)}
		data, err := protocol.Encode(&c)
		if err != nil {
			continue
		}
		if _, err := s.js.Publish(ctx, protocol.CommandSubject(id, c.ID), data, jetstream.WithMsgID(c.ID)); err != nil {
			s.log.Warn().Err(err).Str("instance", id).Msg("credentials not requested yet")
		}
	}
}

// storeSecret keeps a credential an agent answered with. An error means
// it may be kept if tried again.
func (s *Server) storeSecret(ctx context.Context, e protocol.Event) error {
	if e.Status != protocol.StatusOK {
		return nil
	}
	for attempt := 0; ; attempt++ {
		sec, rev, err := s.st.secrets.fetch(ctx, e.Instance)
		if err != nil && !errors.Is(err, errNotFound) {
			return err
		}
		result := []byte(e.Result)
		box := boxOf(sec.InstanceKey)
		if box != nil && e.SealedResult == "" {
			// An agent that holds the instance key seals what it sends:
			// a credential in clear is not its machine's.
			s.log.Warn().Str("instance", e.Instance).Msg("a credential from an agent in clear, but the instance has a key; ignored")
			return nil
		}
		if e.SealedResult != "" {
			if box == nil {
				s.log.Warn().Str("instance", e.Instance).Msg("a sealed credential from an agent, but the instance has no key; ignored")
				return nil
			}
			plain, err := box.Open(e.SealedResult, protocol.SealedResultPlace(e.Instance, e.CommandID))
			if err != nil {
				s.log.Warn().Err(err).Str("instance", e.Instance).Msg("a credential from an agent does not open with the instance key; ignored")
				return nil
			}
			result = []byte(plain)
		}
		var pw protocol.InitialPasswordResult
		var key protocol.AdminAPIKeyResult
		switch e.Step {
		case string(protocol.CommandGetInitialPassword):
			if json.Unmarshal(result, &pw) != nil || pw.Password == "" {
				return nil
			}
			sec.InitialPassword = pw.Password
		case string(protocol.CommandGetAdminAPIKey):
			if json.Unmarshal(result, &key) != nil || key.AdminAPIKey == "" {
				return nil
			}
			sec.AdminAPIKey = key.AdminAPIKey
		default:
			return nil
		}
		if rev == 0 {
			_, err = s.st.secrets.create(ctx, e.Instance, sec)
		} else {
			_, err = s.st.secrets.update(ctx, e.Instance, sec, rev)
		}
		if err == nil || (!errors.Is(err, errConflict) && !errors.Is(err, errExists)) || attempt >= 5 {
			return err
		}
	}
}

// getInitialPassword serves GET /instances/{id}/actions/get-initial-password:
// the password the agent gave DSS's admin user, answered once.
func (s *Server) getInitialPassword(r *http.Request) (any, error) {
	id := r.PathValue("id")
	if _, _, ok := s.st.instances.get(id); !ok {
		return nil, notFound(kindInstance, id)
	}
	sec, _, _ := s.st.secrets.get(id)
	if sec.InitialPassword == "" {
		return nil, precondition("instance %s has no initial password yet: it appears once DSS is set up (reprovision it first)", id)
	}
	for attempt := 0; attempt < 5; attempt++ {
		lc, rev, err := s.lifecycleOf(r.Context(), id)
		if err != nil {
			return nil, unavailable(err, "the instance's state could not be read")
		}
		if lc.PasswordRetrieved {
			return nil, precondition("the initial password of instance %s was already retrieved; set a new one with reset-user-password", id)
		}
		lc.PasswordRetrieved, lc.UpdatedAt = true, time.Now().UTC()
		if _, err = s.st.lifecycle.update(r.Context(), id, lc, rev); err == nil {
			return map[string]string{"userName": "admin", "password": sec.InitialPassword}, nil
		}
		if !errors.Is(err, errConflict) {
			return nil, unavailable(err, "the instance's state could not be written")
		}
	}
	return nil, conflict("instance %s is being changed; retry", id)
}

// getAdminAPIKey serves GET /instances/{id}/admin-api-key.
func (s *Server) getAdminAPIKey(r *http.Request) (any, error) {
	id := r.PathValue("id")
	if _, _, ok := s.st.instances.get(id); !ok {
		return nil, notFound(kindInstance, id)
	}
	sec, _, _ := s.st.secrets.get(id)
	if sec.AdminAPIKey == "" {
		return nil, precondition("instance %s has no admin API key yet: it appears once DSS is set up", id)
	}
	return map[string]string{"adminAPIKey": sec.AdminAPIKey}, nil
}
