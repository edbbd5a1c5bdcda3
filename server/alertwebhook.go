package server

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/fleetmanager/fm/api"
)

const settingAlerting = "alerting"

// getAlerting serves GET /alerting (admins: a chat webhook's URL is its
// credential). The secret is never shown.
func (s *Server) getAlerting(r *http.Request) (any, error) {
	as := s.alertSettings()
	as.HasWebhookSecret, as.WebhookSecret = as.WebhookSecret != "", ""
	return as, nil
}

// alertSettings returns the tenant's alerting settings, secrets included.
func (s *Server) alertSettings() api.AlertSettings {
	doc, _, ok := s.st.settings.get(settingsKey(api.DefaultTenant, settingAlerting))
	if !ok || doc.Alerting == nil {
		return api.AlertSettings{}
	}
	return *doc.Alerting
}

// putAlerting serves PUT /alerting.
func (s *Server) putAlerting(r *http.Request) (any, error) {
	var as api.AlertSettings
	if err := readJSON(r, &as); err != nil {
		return nil, err
	}
	// The secret is write-only: a save that echoes what GET showed keeps it.
	if as.WebhookSecret == "" && !as.ClearWebhookSecret {
		as.WebhookSecret = s.alertSettings().WebhookSecret
	}
	as.ClearWebhookSecret, as.HasWebhookSecret = false, false
	var c checker
	if as.WebhookURL != "" {
		if err := checkWebhookURL(as.WebhookURL); err != nil {
			c.fail("webhookURL", "%v", err)
		}
	}
	if len(as.WebhookSecret) > 1024 {
		c.fail("webhookSecret", "must be at most 1024 bytes")
	}
	if err := c.err("alerting settings"); err != nil {
		return nil, err
	}
	as.UpdatedAt = time.Now().UTC()
	if err := s.storeSetting(r, settingsKey(api.DefaultTenant, settingAlerting), settingsDoc{Alerting: &as}); err != nil {
		return nil, err
	}
	as.HasWebhookSecret, as.WebhookSecret = as.WebhookSecret != "", ""
	return as, nil
}

// checkWebhookURL accepts an absolute http(s) URL without credentials in
// it (they would reach logs; the secret signs instead).
func checkWebhookURL(raw string) error {
	if len(raw) > 2048 {
		return errors.New("must be at most 2048 characters")
	}
	u, err := url.Parse(raw)
	if err != nil {
		return errors.New("must be a URL")
	}
	if u.Scheme != "http" && u.Scheme != "https" || u.Host == "" {
		return errors.New("must be an http:// or https:// URL with a host")
	}
	if u.User != nil {
		return errors.New("must not carry a user or password; set webhookSecret to sign the requests instead")
	}
	return nil
}

// webhookClient sends the alerts: bounded in time, and not following
// redirects (the receiver is who the admin named, nobody else).
func webhookClient() *http.Client {
	return &http.Client{Timeout: 10 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

// webhookBatch is how many alerts one request carries at most: a fleet
// losing its bus raises one alert per instance, and a chat should get a
// few messages, not thousands.
const webhookBatch = 100

// maxWebhookBackoff is the longest wait between two tries of a request.
const maxWebhookBackoff = 5 * time.Minute

// notifyAll tells the webhook what it was not told. Alerts go in requests
// of one status and one rule (Alertmanager's default grouping), at most
// webhookBatch each. Each request is recorded in its alerts (Batch,
// Tried, the next attempt) before it is sent, and each alert is marked
// told once the webhook answered: a server killed in between sends the
// same request again (same alerts, same Idempotency-Key), and an alert
// whose request may have arrived is resolved aloud, never dropped. So the
// webhook hears each change at least once, and a receiver drops repeats by
// Idempotency-Key, or by each alert's fingerprint, status and startsAt. A
// failed request postpones the rest to the next look: a receiver that is
// down costs one timeout per look.
func (a *alerter) notifyAll(ctx context.Context, tenant string, now time.Time, held func() bool) {
	set := a.s.alertSettings()
	type group struct{ status, name string }
	var order []string
	batches := map[string][]keyedRow[alertRecord]{} // by Batch: requests sent before, to send again as they were
	fresh := map[group][]keyedRow[alertRecord]{}
	var freshOrder []group
	for _, r := range a.s.st.alerts.rows() {
		rec := r.val
		if !strings.HasPrefix(r.key, tenant+".") || rec.Notified || !held() {
			continue
		}
		if set.WebhookURL == "" {
			// Nobody to tell: a resolved alert goes; a firing one waits for
			// a webhook to be set, and is told then if it still fires.
			if rec.Status == api.AlertResolved {
				a.settle(ctx, r, func(rec *alertRecord) { rec.GaveUp = true })
			}
			continue
		}
		if !rec.FirstTriedAt.IsZero() && set.UpdatedAt.After(rec.FirstTriedAt) {
			// The webhook was saved since it was first tried (given up
			// or not): a new day of tries, from the next look.
			a.settle(ctx, r, func(rec *alertRecord) { rec.restartNotification() })
			continue
		}
		if rec.GaveUp {
			continue
		}
		// Another replica's clock set the next attempt: one far ahead of
		// this one's waits no longer than the longest backoff.
		if now.Before(rec.NextAttempt) && rec.NextAttempt.Sub(now) <= maxWebhookBackoff {
			continue
		}
		// A day of tries from the first with this webhook.
		if !rec.FirstTriedAt.IsZero() && now.Sub(rec.FirstTriedAt) >= a.s.cfg.AlertGiveUpAfter {
			if a.settle(ctx, r, func(rec *alertRecord) { rec.GaveUp, rec.Batch = true, "" }) {
				a.s.log.Error().Str("alert", rec.Name).Str("status", rec.Status).Int("attempts", rec.Attempts).
					Str("lastError", rec.LastError).Msg("the alert webhook was not told; FM stopped trying")
				a.s.metrics.alertsGivenUp.Inc()
			}
			continue
		}
		if rec.Batch != "" {
			if _, ok := batches[rec.Batch]; !ok {
				order = append(order, rec.Batch)
			}
			batches[rec.Batch] = append(batches[rec.Batch], r)
			continue
		}
		g := group{rec.Status, rec.Name}
		if _, ok := fresh[g]; !ok {
			freshOrder = append(freshOrder, g)
		}
		fresh[g] = append(fresh[g], r)
	}
	for _, g := range freshOrder {
		for rows := fresh[g]; len(rows) > 0; {
			batch := rows[:min(len(rows), webhookBatch)]
			rows = rows[len(batch):]
			id := batchID(batch)
			order, batches[id] = append(order, id), batch
		}
	}
	for _, id := range order {
		if !held() || ctx.Err() != nil {
			return
		}
		if err := a.sendBatch(ctx, set, id, batches[id], now, held); err != nil {
			a.s.log.Warn().Err(err).Int("alerts", len(batches[id])).Msg("the alert webhook did not take the alerts; tried again later")
			return
		}
	}
}

// batchID names a new request by the alerts it carries.
func batchID(batch []keyedRow[alertRecord]) string {
	h := sha256.New()
	for _, r := range batch {
		fmt.Fprintf(h, "%s/%s/%d\n", r.val.Fingerprint, r.val.Status, r.val.StartsAt.UnixNano())
	}
	return hex.EncodeToString(h.Sum(nil))[:32]
}

// sendBatch records the request in its alerts, sends it, and records the
// outcome.
func (a *alerter) sendBatch(ctx context.Context, set api.AlertSettings, id string, batch []keyedRow[alertRecord], now time.Time, held func() bool) error {
	var sent []keyedRow[alertRecord]
	for _, r := range batch {
		rec := r.val
		rec.Batch, rec.Tried = id, rec.Tried || rec.Status == api.AlertFiring
		if rec.FirstTriedAt.IsZero() {
			rec.FirstTriedAt = now
		}
		rec.Attempts++
		rec.NextAttempt = now.Add(min(5*time.Second<<min(rec.Attempts-1, 10), maxWebhookBackoff))
		rev, err := a.s.st.alerts.update(ctx, r.key, rec, r.rev)
		if err != nil {
			// Changed meanwhile (resolved, a successor): not in this request.
			if !errors.Is(err, errConflict) {
				a.s.log.Warn().Err(err).Str("alert", rec.Name).Msg("alert record not updated")
			}
			continue
		}
		sent = append(sent, keyedRow[alertRecord]{key: r.key, val: rec, rev: rev})
	}
	if len(sent) == 0 || !held() {
		return nil // a deposed holder sends nothing: its successor will
	}
	err := a.send(ctx, set, id, sent)
	if err != nil {
		a.s.metrics.alertNotifications.WithLabelValues("failed").Inc()
		for _, r := range sent {
			a.settle(ctx, r, func(rec *alertRecord) { rec.LastError = err.Error() })
		}
		return err
	}
	a.s.metrics.alertNotifications.WithLabelValues("sent").Inc()
	a.s.crash.At("server/alert/sent")
	for _, r := range sent {
		a.settle(ctx, r, func(rec *alertRecord) {
			rec.Notified, rec.Batch, rec.LastError, rec.NextAttempt = true, "", "", time.Time{}
		})
	}
	return nil
}

// settle records what became of an alert's notification: a resolved
// alert told (or that nobody is to be told) goes. It says whether the
// record was changed (not changed meanwhile by another holder).
func (a *alerter) settle(ctx context.Context, r keyedRow[alertRecord], change func(*alertRecord)) bool {
	rec := r.val
	change(&rec)
	var err error
	if rec.Status == api.AlertResolved && (rec.Notified || rec.GaveUp) {
		err = a.s.st.alerts.remove(ctx, r.key, r.rev)
	} else {
		_, err = a.s.st.alerts.update(ctx, r.key, rec, r.rev)
	}
	if err != nil && !errors.Is(err, errConflict) {
		a.s.log.Warn().Err(err).Str("alert", rec.Name).Msg("alert record not updated")
	}
	return err == nil
}

// webhookMessage is Alertmanager's webhook payload (version 4), so that
// the bridges written for it (chat, mail, paging) take FM's alerts as
// they are.
type webhookMessage struct {
	Version           string            `json:"version"`
	GroupKey          string            `json:"groupKey"`
	TruncatedAlerts   int               `json:"truncatedAlerts"`
	Status            string            `json:"status"`
	Receiver          string            `json:"receiver"`
	GroupLabels       map[string]string `json:"groupLabels"`
	CommonLabels      map[string]string `json:"commonLabels"`
	CommonAnnotations map[string]string `json:"commonAnnotations"`
	ExternalURL       string            `json:"externalURL"`
	Alerts            []webhookAlert    `json:"alerts"`
}

type webhookAlert struct {
	Status       string            `json:"status"`
	Labels       map[string]string `json:"labels"`
	Annotations  map[string]string `json:"annotations"`
	StartsAt     time.Time         `json:"startsAt"`
	EndsAt       time.Time         `json:"endsAt"`
	GeneratorURL string            `json:"generatorURL"`
	Fingerprint  string            `json:"fingerprint"`
}

// send posts one request, signed with the webhook's secret if it has one.
// Its alerts share a status and a rule: the group Alertmanager would make
// (groupKey), the same for an alert's firing and its resolution.
func (a *alerter) send(ctx context.Context, set api.AlertSettings, id string, batch []keyedRow[alertRecord]) error {
	first := batch[0].val
	msg := webhookMessage{Version: "4", Status: first.Status, Receiver: "fm-webhook",
		GroupKey:    fmt.Sprintf("{}:{alertname=%q}", first.Name),
		GroupLabels: map[string]string{"alertname": first.Name}, ExternalURL: strings.TrimSuffix(a.s.cfg.JoinURL, JoinPath)}
	for i, r := range batch {
		rec := r.val
		msg.Alerts = append(msg.Alerts, webhookAlert{Status: rec.Status, Labels: rec.Labels, Annotations: rec.Annotations,
			StartsAt: rec.StartsAt, EndsAt: rec.EndsAt, Fingerprint: rec.Fingerprint})
		if i == 0 {
			msg.CommonLabels, msg.CommonAnnotations = maps.Clone(rec.Labels), maps.Clone(rec.Annotations)
		} else {
			keepCommon(msg.CommonLabels, rec.Labels)
			keepCommon(msg.CommonAnnotations, rec.Annotations)
		}
	}
	body, err := json.Marshal(msg)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, set.WebhookURL, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("webhook request to %s: not made", hostOf(set.WebhookURL))
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "fm-alerts")
	req.Header.Set("Idempotency-Key", id)
	if set.WebhookSecret != "" {
		mac := hmac.New(sha256.New, []byte(set.WebhookSecret))
		mac.Write(body)
		req.Header.Set("X-FM-Signature", "sha256="+hex.EncodeToString(mac.Sum(nil)))
	}
	resp, err := a.client.Do(req)
	if err != nil {
		// The URL may hold a token (chat webhooks do): the error names the
		// host only.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return fmt.Errorf("POST to %s: %w", hostOf(set.WebhookURL), err)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("POST to %s: HTTP %d", hostOf(set.WebhookURL), resp.StatusCode)
	}
	return nil
}

func hostOf(raw string) string {
	if u, err := url.Parse(raw); err == nil {
		return u.Host
	}
	return "the webhook"
}

// keepCommon drops from common what m does not share.
func keepCommon(common, m map[string]string) {
	for k, v := range common {
		if m[k] != v {
			delete(common, k)
		}
	}
}
