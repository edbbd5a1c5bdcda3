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

// notifyAll tells the webhook what it was not told, in batches of alerts
// of one status, each alert's record updated once its batch is answered.
// A crash between the answer and the record's update tells it again: the
// webhook is told at least once, and each alert carries what a receiver
// needs to drop a repeat (its fingerprint, status and startsAt, and the
// request's Idempotency-Key). A failed request postpones the rest to the
// next look, so that a receiver that is down costs one timeout per look.
func (a *alerter) notifyAll(ctx context.Context, tenant string, now time.Time, held func() bool) {
	set := a.s.alertSettings()
	due := map[string][]keyedRow[alertRecord]{}
	for _, r := range a.s.st.alerts.rows() {
		rec := r.val
		if !strings.HasPrefix(r.key, tenant+".") || rec.Notified || rec.GaveUp || now.Before(rec.NextAttempt) {
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
		if now.Sub(rec.ChangedAt) >= a.s.cfg.AlertGiveUpAfter {
			a.s.log.Error().Str("alert", rec.Name).Str("status", rec.Status).Int("attempts", rec.Attempts).
				Str("lastError", rec.LastError).Msg("the alert webhook was not told; FM stopped trying")
			a.s.metrics.alertNotifications.WithLabelValues("given_up").Inc()
			a.settle(ctx, r, func(rec *alertRecord) { rec.GaveUp = true })
			continue
		}
		due[rec.Status] = append(due[rec.Status], r)
	}
	for _, status := range []string{api.AlertResolved, api.AlertFiring} {
		rows := due[status]
		for len(rows) > 0 && held() && ctx.Err() == nil {
			batch := rows[:min(len(rows), webhookBatch)]
			rows = rows[len(batch):]
			if err := a.send(ctx, set, status, batch); err != nil {
				a.s.log.Warn().Err(err).Int("alerts", len(batch)).Msg("the alert webhook did not take the alerts; tried again later")
				a.s.metrics.alertNotifications.WithLabelValues("failed").Inc()
				for _, r := range batch {
					a.settle(ctx, r, func(rec *alertRecord) {
						rec.Attempts++
						rec.LastError = err.Error()
						rec.NextAttempt = now.Add(min(5*time.Second<<min(rec.Attempts-1, 10), 5*time.Minute))
					})
				}
				return
			}
			a.s.metrics.alertNotifications.WithLabelValues("sent").Inc()
			a.s.crash.At("server/alert/sent")
			for _, r := range batch {
				a.settle(ctx, r, func(rec *alertRecord) {
					rec.Notified, rec.Told = true, rec.Told || rec.Status == api.AlertFiring
					rec.Attempts, rec.LastError, rec.NextAttempt = 0, "", time.Time{}
				})
			}
		}
	}
}

// settle records what became of an alert's notification: a resolved
// alert told, or one nobody is to be told, goes.
func (a *alerter) settle(ctx context.Context, r keyedRow[alertRecord], change func(*alertRecord)) {
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

// send posts one batch, signed with the webhook's secret if it has one.
func (a *alerter) send(ctx context.Context, set api.AlertSettings, status string, batch []keyedRow[alertRecord]) error {
	msg := webhookMessage{Version: "4", Status: status, Receiver: "fm-webhook", GroupLabels: map[string]string{},
		ExternalURL: strings.TrimSuffix(a.s.cfg.JoinURL, JoinPath)}
	key := sha256.New()
	for i, r := range batch {
		rec := r.val
		msg.Alerts = append(msg.Alerts, webhookAlert{Status: rec.Status, Labels: rec.Labels, Annotations: rec.Annotations,
			StartsAt: rec.StartsAt, EndsAt: rec.EndsAt, Fingerprint: rec.Fingerprint})
		if i == 0 {
			msg.CommonLabels, msg.CommonAnnotations = copyMap(rec.Labels), copyMap(rec.Annotations)
		} else {
			keepCommon(msg.CommonLabels, rec.Labels)
			keepCommon(msg.CommonAnnotations, rec.Annotations)
		}
		fmt.Fprintf(key, "%s/%s/%d\n", rec.Fingerprint, rec.Status, rec.StartsAt.UnixNano())
	}
	idem := hex.EncodeToString(key.Sum(nil))[:32]
	msg.GroupKey = "fm:" + idem
	body, err := json.Marshal(msg)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, set.WebhookURL, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("webhook request: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "fm-alerts")
	req.Header.Set("Idempotency-Key", idem)
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

func copyMap(m map[string]string) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// keepCommon drops from common what m does not share.
func keepCommon(common, m map[string]string) {
	for k, v := range common {
		if m[k] != v {
			delete(common, k)
		}
	}
}
