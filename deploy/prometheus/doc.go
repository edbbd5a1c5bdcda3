// Package prometheus holds what an operator needs to watch FM with
// Prometheus and Grafana: a scrape configuration (prometheus.yml), alert
// rules with their unit tests (rules/), and a dashboard (grafana/). It has
// no code; its tests check the files with promtool and against the metrics
// FM serves. Nothing imports it.
package prometheus
