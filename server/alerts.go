package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// alertLease is the fm_leases key of the server that raises alerts and
// tells the webhook: one server of the fleet at a time, so that a
// replica more does not mean a notification more.
const alertLease = "alerter"

// alertRule is an alert FM raises itself, for operators without
// Prometheus. Name, labels and hold time are those of the Prometheus rule
// of the same name (deploy/prometheus/rules/fm.rules.yml), so that the two
// say the same thing; TestAlertRulesMatchPrometheus keeps them equal.
// Three rules of that file have no counterpart here: FMReplicaDown,
// FMProvisionerDown and FMBusDisconnected are seen from outside only (what
// is down cannot tell).
type alertRule struct {
	name     string
	severity string
	holdFor  time.Duration // the rule's "for"
}

var (
	ruleInstanceFailed     = alertRule{"FMInstanceFailed", "critical", time.Minute}
	ruleMachineDown        = alertRule{"FMMachineDown", "critical", time.Minute}
	ruleAgentNotResponding = alertRule{"FMAgentNotResponding", "warning", time.Minute}
	ruleDSSDown            = alertRule{"FMDSSDown", "critical", 2 * time.Minute}
	ruleVolumeAbove80      = alertRule{"FMDataVolumeAbove80Percent", "warning", 15 * time.Minute}
	ruleVolumeAtMax        = alertRule{"FMDataVolumeAtMaximum", "critical", 5 * time.Minute}
	ruleOperationsFailing  = alertRule{"FMOperationsFailing", "warning", 0}
	ruleSnapshotOverdue    = alertRule{"FMAutomatedSnapshotOverdue", "warning", 0}
	ruleSnapshotNeverTaken = alertRule{"FMAutomatedSnapshotNeverTaken", "warning", 2 * time.Hour}
	ruleNoProvisioner      = alertRule{"FMNoActiveProvisioner", "critical", 2 * time.Minute}
	ruleBusStorage         = alertRule{"FMBusStorageNearLimit", "warning", 10 * time.Minute}
	ruleWorkBacklog        = alertRule{"FMWorkBacklog", "warning", 10 * time.Minute}
)

// serverAlertRules are every rule above, for the test that compares them
// with Prometheus's.
var serverAlertRules = []alertRule{ruleInstanceFailed, ruleMachineDown, ruleAgentNotResponding, ruleDSSDown, ruleVolumeAbove80,
	ruleVolumeAtMax, ruleOperationsFailing, ruleSnapshotOverdue, ruleSnapshotNeverTaken, ruleNoProvisioner,
	ruleBusStorage, ruleWorkBacklog}

// Thresholds of the rules, as fm.rules.yml writes them.
const (
	failedOpsWindow     = 15 * time.Minute
	busStorageRatio     = 0.85
	workBacklogMessages = 1000
)

// activeAlert is a rule's condition holding now for one set of labels.
type activeAlert struct {
	rule        alertRule
	labels      map[string]string
	annotations map[string]string
}

// fingerprint names an alert by its rule and labels: the same trouble
// keeps the same fingerprint for as long as it lasts.
func fingerprint(name string, labels map[string]string) string {
	keys := make([]string, 0, len(labels))
	for k := range labels {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	h := sha256.New()
	h.Write([]byte(name))
	for _, k := range keys {
		fmt.Fprintf(h, "\x00%s=%s", k, labels[k])
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}

// alertKey is an alert's key in fm_alerts.
func alertKey(tenant, fp string) string { return tenant + "." + fp }

// alertRecord is what fm_alerts keeps of an alert: what GET /alerts shows,
// and where its notification stands.
type alertRecord struct {
	api.Alert
	// Tried says a request carrying the alert firing was sent (or about to
	// be: it is recorded first), so the webhook may know it fires: its end
	// is told too. An alert never tried ends without a word.
	Tried bool `json:"tried,omitempty"`
	// FirstTriedAt is the first request for the current status: the
	// webhook is tried until Config.AlertGiveUpAfter from then.
	FirstTriedAt time.Time `json:"firstTriedAt,omitzero"`
	NextAttempt  time.Time `json:"nextAttempt,omitzero"`
	// Batch is the request (its Idempotency-Key) that carries the alert
	// until the webhook took it: sent again as it was.
	Batch string `json:"batch,omitempty"`
}

// activeAlerts evaluates every rule on the server's copies and the bus
// sampler's last sample. unsure names the rules whose inputs could not be
// read this time: their alerts stay as they are.
func (a *alerter) activeAlerts(ctx context.Context, now time.Time) (active map[string]activeAlert, unsure map[string]bool) {
	s := a.s
	active, unsure = map[string]activeAlert{}, map[string]bool{}
	add := func(r alertRule, labels map[string]string, summary, description string) {
		labels["alertname"], labels["severity"] = r.name, r.severity
		ann := map[string]string{"summary": summary}
		if description != "" {
			ann["description"] = description
		}
		active[fingerprint(r.name, labels)] = activeAlert{rule: r, labels: labels, annotations: ann}
	}
	snaps := s.lastSnapshotsByInstance()
	for _, in := range s.st.instances.list() {
		st := s.statusOf(in.ID)
		h := s.healthOf(&in, st, snaps[in.ID])
		of := func() map[string]string { return map[string]string{"instance_id": in.ID} }
		// The id only, as the Prometheus rules say it: a label is an
		// operator's text, and goes to an admin's chat and logs.
		name := in.ID
		if h.failed {
			add(ruleInstanceFailed, of(), "FM instance "+name+" is in state failed",
				"Its last operation failed, or its machine was lost (terminated or gone outside FM). See `fm instance status "+in.ID+"`; start or reprovision it.")
		}
		if isFalse(h.machineUp) {
			add(ruleMachineDown, of(), "The machine of FM instance "+name+" is not running",
				"FM says the instance runs, but its machine was found stopped or gone (outside FM: a console, a spot reclaim). Start or reprovision it.")
		}
		if h.agentNotResponding() {
			add(ruleAgentNotResponding, of(), "The agent of FM instance "+name+" is not responding",
				"Its machine runs, but its agent has missed three heartbeats: the machine may be down or cut off from the bus. See `fm instance status "+in.ID+"`.")
		}
		if h.dssDown() {
			add(ruleDSSDown, of(), "DSS is down on FM instance "+name,
				"Its agent answers, but DSS does not answer on its port; the agent's watchdog restarts it three times in 15 minutes, then gives up.")
		}
		if used, _ := h.volumeUsed(); h.volumeAbove80() {
			add(ruleVolumeAbove80, of(), fmt.Sprintf("The data volume of FM instance %s is %.0f%% full", name, used*100),
				"FM grows a volume above 80% up to its dataVolumeSizeMaxGB; one that stays above 80% did not grow.")
		}
		if h.volumeFullAtMax() {
			add(ruleVolumeAtMax, of(), "The data volume of FM instance "+name+" is at its maximum size and above 80% full",
				"FM cannot grow it further: raise dataVolumeSizeMaxGB or free space.")
		}
		if h.snapshotOverdue(now) {
			add(ruleSnapshotOverdue, of(), "FM instance "+name+" has no snapshot within 1.5 automated-snapshot periods", "")
		}
		if h.snapshotNeverTaken() {
			add(ruleSnapshotNeverTaken, of(), "FM instance "+name+" has automated snapshots on, and no snapshot succeeded in 2 hours", "")
		}
	}
	failedKinds := map[string]bool{}
	for _, state := range []string{api.OpFailed, api.OpAborted} {
		for _, r := range s.st.ops.rowsOf(state) {
			if r.val.EndedAt != nil && now.Sub(*r.val.EndedAt) < failedOpsWindow {
				failedKinds[r.val.Kind] = true
			}
		}
	}
	for kind := range failedKinds {
		add(ruleOperationsFailing, map[string]string{"kind": kind},
			"FM "+kind+" operations failed or were aborted in the last 15 minutes",
			"See `fm op list --state failed` (and `--state aborted`) and each operation's error.")
	}
	if held, err := a.provisionerLeaseHeld(ctx); err != nil {
		unsure[ruleNoProvisioner.name] = true
	} else if !held {
		add(ruleNoProvisioner, map[string]string{}, "No FM provisioner holds the lease: no machine operation is carried out", "")
	}
	storage, backlog, fresh := s.metrics.bus.pressure(now)
	if !fresh {
		// The bus's figures are old (its sampling fails): its alerts stay.
		unsure[ruleBusStorage.name], unsure[ruleWorkBacklog.name] = true, true
		return active, unsure
	}
	for _, st := range storage {
		if st.limit > 0 && st.used/st.limit > busStorageRatio {
			where := "the FM account"
			labels := map[string]string{}
			if st.name != "" {
				where, labels["server"] = "node "+st.name, st.name
			}
			add(ruleBusStorage, labels, fmt.Sprintf("FM's bus (%s) uses %.0f%% of its JetStream storage limit", where, st.used/st.limit*100), "")
		}
	}
	for _, c := range backlog {
		if c.pending > workBacklogMessages {
			add(ruleWorkBacklog, map[string]string{"stream": c.stream, "consumer": c.name},
				fmt.Sprintf("FM's consumer %s on %s is %.0f messages behind", c.name, c.stream, c.pending), "")
		}
	}
	return active, unsure
}

// provisionerLeaseHeld says whether a provisioner holds its lease: one
// read of fm_leases per look, by the server that raises alerts only (the
// bucket is looked up once per holding, not at every look).
func (a *alerter) provisionerLeaseHeld(ctx context.Context) (bool, error) {
	if a.leases == nil {
		kv, err := a.s.js.KeyValue(ctx, protocol.BucketLeases)
		if err != nil {
			return false, err
		}
		a.leases = kv
	}
	_, err := a.leases.Get(ctx, protocol.LeaseProvisioner)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return false, nil
	}
	return err == nil, err
}

// alerter raises and resolves alerts while its server holds alertLease,
// and tells the tenant's webhook. What it has raised lives in fm_alerts,
// written with revision checks: a server that takes the lease over goes
// on from there, and never raises an alert already raised. Only how long
// each condition has held is its own (a new holder starts counting
// again, as a restarted Prometheus does).
type alerter struct {
	s       *Server
	pending map[string]time.Time // fingerprint → since when its condition holds
	client  *http.Client
	leases  jetstream.KeyValue // fm_leases, once looked up
}

// newAlerter is made at each taking of the lease: how long conditions
// have held is counted again from then (what held before, in another
// holding, may have ended meanwhile).
func newAlerter(s *Server) *alerter {
	return &alerter{s: s, pending: map[string]time.Time{}, client: webhookClient()}
}

// holdFor is how long a rule's condition must hold before its alert fires.
func (a *alerter) holdFor(r alertRule) time.Duration {
	if a.s.cfg.AlertHoldFor > 0 {
		return min(a.s.cfg.AlertHoldFor, r.holdFor)
	}
	return r.holdFor
}

// tick evaluates the rules, records what fires and what is resolved, and
// tells the webhook what it was not told yet. held is asked before each
// write: a holder deposed meanwhile stops; one frozen and resumed has its
// writes refused by revision where its successor wrote first.
func (a *alerter) tick(ctx context.Context, now time.Time, held func() bool) {
	tenant := api.DefaultTenant
	active, unsure := a.activeAlerts(ctx, now)
	for fp := range a.pending {
		if _, ok := active[fp]; !ok {
			delete(a.pending, fp)
		}
	}
	for fp, al := range active {
		since, ok := a.pending[fp]
		if !ok {
			since, a.pending[fp] = now, now
		}
		// An alert on record fires already, or its resolution is still to
		// be told (the webhook hears it end before it fires again).
		if _, _, ok := a.s.st.alerts.get(alertKey(tenant, fp)); ok || now.Sub(since) < a.holdFor(al.rule) || !held() {
			continue
		}
		fire := alertRecord{Alert: api.Alert{Fingerprint: fp, Name: al.rule.name, Status: api.AlertFiring,
			Labels: al.labels, Annotations: al.annotations, StartsAt: since}}
		if _, err := a.s.st.alerts.create(ctx, alertKey(tenant, fp), fire); errors.Is(err, errExists) {
			continue // raised already (a successor, or a copy behind)
		} else if err != nil {
			a.s.log.Warn().Err(err).Str("alert", al.rule.name).Msg("alert not raised; tried again at the next look")
			continue
		}
		a.s.log.Warn().Str("alert", al.rule.name).Interface("labels", al.labels).Msg(al.annotations["summary"])
	}
	for _, r := range a.s.st.alerts.rows() {
		rec, key := r.val, r.key
		if !strings.HasPrefix(key, tenant+".") || rec.Status != api.AlertFiring {
			continue
		}
		if _, ok := active[rec.Fingerprint]; ok || unsure[rec.Name] || !held() {
			continue
		}
		if !rec.Tried {
			// Nobody was told it fired: nobody needs to hear it ended.
			if err := a.s.st.alerts.remove(ctx, key, r.rev); err != nil && !errors.Is(err, errConflict) {
				a.s.log.Warn().Err(err).Str("alert", rec.Name).Msg("alert not dropped")
			}
			continue
		}
		res := rec
		res.Status, res.EndsAt, res.Notified = api.AlertResolved, now, false
		res.restartNotification()
		if _, err := a.s.st.alerts.update(ctx, key, res, r.rev); err != nil {
			a.s.log.Warn().Err(err).Str("alert", rec.Name).Msg("alert not resolved; tried again at the next look")
			continue
		}
		a.s.log.Info().Str("alert", rec.Name).Interface("labels", rec.Labels).Msg("resolved: " + rec.Annotations["summary"])
	}
	a.notifyAll(ctx, tenant, now, held)
}

// restartNotification forgets where telling the webhook stood: the
// alert's status changed, or the webhook did.
func (r *alertRecord) restartNotification() {
	r.Attempts, r.LastError, r.NextAttempt, r.FirstTriedAt = 0, "", time.Time{}, time.Time{}
	r.GaveUp, r.Batch = false, ""
}

// listAlerts serves GET /alerts: the alerts firing, and those resolved
// whose webhook is still to be told, oldest first.
func (s *Server) listAlerts(r *http.Request) (any, error) {
	prefix := api.DefaultTenant + "."
	out := []api.Alert{}
	for _, row := range s.st.alerts.rows() {
		if strings.HasPrefix(row.key, prefix) {
			out = append(out, row.val.Alert)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].StartsAt.Before(out[j].StartsAt) })
	return out, nil
}
