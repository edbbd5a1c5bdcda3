package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// stores are the server's views of the fleet's buckets.
type stores struct {
	accounts  *repo[api.CloudAccount]
	networks  *repo[api.VirtualNetwork]
	templates *repo[api.InstanceSettingsTemplate]
	instances *repo[api.Instance]
	images    *repo[api.Image]
	snapshots *table[api.Snapshot]
	ops       *table[opRecord]
	settings  *table[settingsDoc]
	keys      *table[apiKey]
	lifecycle *table[lifecycle]
	machines  *table[protocol.MachineState]
	agents    *table[protocol.AgentStatus]
	secrets   *table[instanceSecrets]
	joins     *table[joinRecord]
	alerts    *table[alertRecord]
	lbs       *table[api.LoadBalancer]
	balancers *table[protocol.BalancerState]
	desired   jetstream.KeyValue
	sessions  jetstream.KeyValue
	claims    *labelClaims
}

// settingsDoc is one tenant setting in fm_settings; only one of its fields is
// set, according to the key.
type settingsDoc struct {
	CloudTags   map[string]string     `json:"cloudTags,omitempty"`
	Credentials *api.CloudCredentials `json:"credentials,omitempty"`
	// Expiring are the NATS users revoked, under revocationsKey (public
	// key → when their last JWT expires, unix): revoked as of then, dropped
	// after (revocations.go). A document from an FM before agents had an
	// account of their own also holds "revocations", of users minted
	// without an expiry: no longer read (their account no longer names the
	// key that signed them), gone at the next write.
	Expiring map[string]int64 `json:"expiring,omitempty"`
	// RevokedBefore, when set, revokes every agent user issued at or
	// before then (unix): the list folded (revocations.go). Kept for good:
	// one entry, and no JWT is issued before it again.
	RevokedBefore int64 `json:"revokedBefore,omitempty"`
	// Alerting is where the server sends its alerts (alertwebhook.go).
	Alerting *api.AlertSettings `json:"alerting,omitempty"`
	// IAM is an IAM setting as it was saved, but its secret, kept sealed
	// in IAMSecret (iam.go).
	IAM       map[string]json.RawMessage `json:"iam,omitempty"`
	IAMSecret string                     `json:"iamSecret,omitempty"`
	// AgentUpgrade is the tenant's last agent rollout (agentrollout.go).
	AgentUpgrade *api.AgentUpgrade `json:"agentUpgrade,omitempty"`
}

func openStores(ctx context.Context, js jetstream.JetStream, box *seal.Box, log zerolog.Logger) (*stores, error) {
	kv := map[string]jetstream.KeyValue{}
	for _, name := range []string{
		protocol.BucketNetworks, protocol.BucketTemplates, protocol.BucketInstances, protocol.BucketImages,
		protocol.BucketSnapshots, protocol.BucketOps, protocol.BucketSettings, protocol.BucketAPIKeys,
		protocol.BucketLabels, protocol.BucketLifecycle, protocol.BucketMachines, protocol.BucketAgents,
		protocol.BucketSecrets, protocol.BucketDesired, protocol.BucketJoins, protocol.BucketAlerts, protocol.BucketAccounts,
		protocol.BucketLBs, protocol.BucketBalancers, protocol.BucketSessions,
	} {
		b, err := js.KeyValue(ctx, name)
		if err != nil {
			return nil, fmt.Errorf("open bucket %s (is the topology declared?): %w", name, err)
		}
		kv[name] = b
	}
	claims := &labelClaims{kv: kv[protocol.BucketLabels], log: log.With().Str("bucket", protocol.BucketLabels).Logger(), inFlight: time.Minute}
	st := &stores{
		accounts: newRepo(kv[protocol.BucketAccounts], "cloud account", "account", claims, log,
			func(v *api.CloudAccount) *api.Meta { return &v.Meta },
			func(v *api.CloudAccount) string { return v.Label }),
		networks: newRepo(kv[protocol.BucketNetworks], "virtual network", "network", claims, log,
			func(v *api.VirtualNetwork) *api.Meta { return &v.Meta },
			func(v *api.VirtualNetwork) string { return v.Label }),
		templates: newRepo(kv[protocol.BucketTemplates], "instance settings template", "template", claims, log,
			func(v *api.InstanceSettingsTemplate) *api.Meta { return &v.Meta },
			func(v *api.InstanceSettingsTemplate) string { return v.Label }),
		instances: newRepo(kv[protocol.BucketInstances], "instance", "instance", claims, log,
			func(v *api.Instance) *api.Meta { return &v.Meta },
			func(v *api.Instance) string { return v.Label }),
		images: newRepo(kv[protocol.BucketImages], "image", "image", claims, log,
			func(v *api.Image) *api.Meta { return &v.Meta },
			func(v *api.Image) string { return v.Label }),
		snapshots: newTable[api.Snapshot](kv[protocol.BucketSnapshots], "snapshot", log),
		ops:       newTable[opRecord](kv[protocol.BucketOps], "operation", log),
		settings:  newTable[settingsDoc](kv[protocol.BucketSettings], "setting", log),
		keys:      newTable[apiKey](kv[protocol.BucketAPIKeys], "API key", log),
		lifecycle: newTable[lifecycle](kv[protocol.BucketLifecycle], "lifecycle", log),
		machines:  newMessageTable[protocol.MachineState](kv[protocol.BucketMachines], "machine", log),
		agents:    newMessageTable[protocol.AgentStatus](kv[protocol.BucketAgents], "agent status", log),
		secrets:   newTable[instanceSecrets](kv[protocol.BucketSecrets], "instance secrets", log),
		joins:     newTable[joinRecord](kv[protocol.BucketJoins], "join token", log),
		alerts:    newTable[alertRecord](kv[protocol.BucketAlerts], "alert", log),
		lbs:       newTable[api.LoadBalancer](kv[protocol.BucketLBs], "load balancer", log),
		balancers: newMessageTable[protocol.BalancerState](kv[protocol.BucketBalancers], "load balancer state", log),
		desired:   kv[protocol.BucketDesired],
		sessions:  kv[protocol.BucketSessions],
		claims:    claims,
	}
	// A join withdraws the other tokens of its instance: found by instance,
	// not among every token of the fleet.
	st.joins.groupsOf = func(r joinRecord) []string { return []string{r.Instance} }
	// The sweep looks at running operations every 2 s: found by state, not
	// among every operation of the last week.
	st.ops.groupsOf = func(op opRecord) []string { return []string{op.State} }
	// The snapshot scheduler looks at each instance's snapshots every tick,
	// and the sweep at the snapshots being taken or deleted every 2 s: found
	// by instance and by state, not among every snapshot of the fleet.
	st.snapshots.groupsOf = func(sn api.Snapshot) []string {
		return []string{snapshotsOfInstance + sn.InstanceID, snapshotsInState + sn.State}
	}
	st.lifecycle.groupsOf = func(lc lifecycle) []string {
		if lc.OpID != "" {
			return []string{lifecycleBusy}
		}
		return []string{lc.State}
	}
	// Secrets FM keeps are sealed at rest with the server's key.
	sealFields(st.accounts.table, box, func(a *api.CloudAccount) map[string]*string {
		return map[string]*string{"awsSecretAccessKey": &a.AWSSecretAccessKey}
	})
	sealFields(st.templates.table, box, func(t *api.InstanceSettingsTemplate) map[string]*string {
		return map[string]*string{"dataikuAwsSecretAccessKey": &t.DataikuAWSSecretAccessKey, "license": &t.License}
	})
	sealFields(st.instances.table, box, func(in *api.Instance) map[string]*string {
		return map[string]*string{"sslCertificatePEM": &in.SSLCertificatePEM}
	})
	sealFields(st.settings, box, func(d *settingsDoc) map[string]*string {
		secrets := map[string]*string{}
		if d.Credentials != nil {
			secrets["credentials.awsSecretAccessKey"] = &d.Credentials.AWSSecretAccessKey
			secrets["credentials.licenseToken"] = &d.Credentials.LicenseToken
			secrets["credentials.license"] = &d.Credentials.License
		}
		secrets["iamSecret"] = &d.IAMSecret
		// A chat webhook's URL is its credential.
		if d.Alerting != nil {
			secrets["alerting.webhookURL"] = &d.Alerting.WebhookURL
			secrets["alerting.webhookSecret"] = &d.Alerting.WebhookSecret
		}
		return secrets
	})
	sealFields(st.secrets, box, func(s *instanceSecrets) map[string]*string {
		return map[string]*string{"initialPassword": &s.InitialPassword, "adminAPIKey": &s.AdminAPIKey, "instanceKey": &s.InstanceKey}
	})
	for _, w := range st.all() {
		if err := w.useBus(ctx, js); err != nil {
			return nil, err
		}
	}
	return st, nil
}

// watched is a table as the stores run it.
type watched interface {
	useBus(ctx context.Context, js writeBus) error
	run(ctx context.Context)
	waitSynced(ctx context.Context) error
	rewatch()
}

func (st *stores) all() []watched {
	return []watched{st.accounts, st.networks, st.templates, st.instances, st.images, st.snapshots, st.ops, st.settings, st.keys,
		st.lifecycle, st.machines, st.agents, st.secrets, st.joins, st.alerts, st.lbs, st.balancers}
}

// run keeps every view current until ctx ends.
func (st *stores) run(ctx context.Context) {
	for _, w := range st.all() {
		go w.run(ctx)
	}
}

func (st *stores) waitSynced(ctx context.Context) error {
	for _, w := range st.all() {
		if err := w.waitSynced(ctx); err != nil {
			return err
		}
	}
	return nil
}

// rewatchOnReconnect starts every watcher again each time the connection
// comes back after a loss, until ctx ends: their consumers may have gone
// with the bus node the connection was on.
func rewatchOnReconnect(ctx context.Context, nc *nats.Conn, st *stores) {
	ch := nc.StatusChanged(nats.CONNECTED)
	defer nc.RemoveStatusListener(ch)
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-ch:
			if !ok {
				return
			}
			st.rewatch()
		}
	}
}

// rewatch starts every watcher again (table.rewatch).
func (st *stores) rewatch() {
	for _, w := range st.all() {
		w.rewatch()
	}
}

// repo is a table of labelled objects: labels are unique, and the object's
// Meta is maintained here.
type repo[T any] struct {
	*table[T]
	claims    *labelClaims
	claimKind string
	meta      func(*T) *api.Meta
	label     func(*T) string
}

func newRepo[T any](kv jetstream.KeyValue, kind, claimKind string, claims *labelClaims, log zerolog.Logger,
	meta func(*T) *api.Meta, label func(*T) string) *repo[T] {
	return &repo[T]{table: newTable[T](kv, kind, log), claims: claims, claimKind: claimKind, meta: meta, label: label}
}

// view returns id's value with its Revision set.
func (r *repo[T]) view(id string) (T, bool) {
	v, rev, ok := r.get(id)
	if ok {
		r.meta(&v).Revision = rev
	}
	return v, ok
}

// all returns every value with its Revision set, ordered by id.
func (r *repo[T]) all() []T {
	rows := r.rows()
	out := make([]T, len(rows))
	for i, row := range rows {
		out[i] = row.val
		r.meta(&out[i]).Revision = row.rev
	}
	return out
}

// insert stores a new object under a fresh id made from prefix, claiming its
// label first. It sets the object's id (through setID) and Meta.
func (r *repo[T]) insert(ctx context.Context, prefix string, v *T, setID func(*T, string)) error {
	for attempt := 0; attempt < 5; attempt++ {
		id := newID(prefix)
		setID(v, id)
		err := r.insertAs(ctx, id, v)
		if !errors.Is(err, errExists) {
			return err
		}
		// An id collision: draw again.
	}
	return internal(errors.New("id collisions"), "no free id could be drawn for the %s", r.kind)
}

// insertAs stores a new object under id, claiming its label first; errExists
// if id is taken.
func (r *repo[T]) insertAs(ctx context.Context, id string, v *T) error {
	now := time.Now().UTC()
	m := r.meta(v)
	m.CreatedAt, m.UpdatedAt, m.Revision, m.Deleting = now, now, 0, false
	label := r.label(v)
	if err := r.claims.claim(ctx, r.claimKind, label, id, r.bears(label)); err != nil {
		return r.claimError(err, label)
	}
	rev, err := r.create(ctx, id, *v)
	if err != nil {
		_ = r.claims.release(ctx, r.claimKind, label, id)
		if errors.Is(err, errExists) {
			return err
		}
		return unavailable(err, "the %s could not be stored", r.kind)
	}
	m.Revision = rev
	return nil
}

// replace stores v as the new value of id if id is still at revision rev.
// old is the value being replaced (its label is released if it changed).
func (r *repo[T]) replace(ctx context.Context, id string, old T, v *T, rev uint64) error {
	oldLabel, newLabel := r.label(&old), r.label(v)
	relabel := claimKey(r.claimKind, oldLabel) != claimKey(r.claimKind, newLabel)
	if relabel {
		if err := r.claims.claim(ctx, r.claimKind, newLabel, id, r.bears(newLabel)); err != nil {
			return r.claimError(err, newLabel)
		}
	}
	m := r.meta(v)
	om := r.meta(&old)
	m.CreatedAt, m.UpdatedAt, m.Deleting, m.Revision = om.CreatedAt, time.Now().UTC(), om.Deleting, 0
	newRev, err := r.update(ctx, id, *v, rev)
	if err != nil {
		if relabel {
			_ = r.claims.release(ctx, r.claimKind, newLabel, id)
		}
		if errors.Is(err, errConflict) {
			return r.conflict(id, rev)
		}
		return unavailable(err, "the %s could not be stored", r.kind)
	}
	m.Revision = newRev
	if relabel {
		if err := r.claims.release(ctx, r.claimKind, oldLabel, id); err != nil {
			r.log.Warn().Err(err).Str("id", id).Msg("old label claim not released; it will be reclaimed when needed")
		}
	}
	return nil
}

// erase deletes id if it is still at revision rev, then releases its label.
func (r *repo[T]) erase(ctx context.Context, id string, v T, rev uint64) error {
	if err := r.remove(ctx, id, rev); err != nil {
		if errors.Is(err, errConflict) {
			return r.conflict(id, rev)
		}
		return unavailable(err, "the %s could not be deleted", r.kind)
	}
	if err := r.claims.release(ctx, r.claimKind, r.label(&v), id); err != nil {
		r.log.Warn().Err(err).Str("id", id).Msg("label claim not released; it will be reclaimed when needed")
	}
	return nil
}

func (r *repo[T]) conflict(id string, rev uint64) error {
	return conflict("%s %s was changed by someone else since revision %d; read it again and retry", r.kind, id, rev)
}

// bears reports, from the bucket itself, whether owner bears label.
func (r *repo[T]) bears(label string) func(ctx context.Context, owner string) (bool, error) {
	return func(ctx context.Context, owner string) (bool, error) {
		v, _, err := r.fetch(ctx, owner)
		if errors.Is(err, errNotFound) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		return claimKey(r.claimKind, r.label(&v)) == claimKey(r.claimKind, label), nil
	}
}

func (r *repo[T]) claimError(err error, label string) error {
	if errors.Is(err, errLabelTaken) {
		owner := strings.TrimPrefix(err.Error(), errLabelTaken.Error()+" by ")
		return newAPIError(protocol.CodeAlreadyExists, "Label already used",
			"label: another %s is already labelled %q (%s); labels are unique, ignoring case", r.kind, label, owner)
	}
	return unavailable(err, "the label of the %s could not be reserved", r.kind)
}

// newID returns prefix-<10 random characters> (50 bits): object ids are
// shown to people, and a collision is caught by the create.
func newID(prefix string) string {
	return protocol.NewID(prefix)[:len(prefix)+11]
}
