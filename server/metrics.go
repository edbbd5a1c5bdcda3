package server

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics are the server's Prometheus metrics, on a registry of its own so
// that several servers can run in one process (tests).
type metrics struct {
	reg        *prometheus.Registry
	requests   *prometheus.CounterVec
	latency    *prometheus.HistogramVec
	ops        *prometheus.CounterVec
	opDuration *prometheus.HistogramVec
}

func newMetrics(s *Server) *metrics {
	st := s.st
	m := &metrics{
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fm_http_requests_total", Help: "REST API requests by method and status code.",
		}, []string{"method", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "fm_http_request_duration_seconds", Help: "REST API request latency.",
			Buckets: prometheus.DefBuckets,
		}, []string{"method"}),
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fm_operations_total", Help: "Finished operations (futures) by kind and result.",
		}, []string{"kind", "result"}),
		opDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "fm_operation_duration_seconds", Help: "Duration of finished operations by kind.",
			Buckets: []float64{0.1, 1, 5, 15, 30, 60, 120, 300, 600, 1800},
		}, []string{"kind"}),
	}
	m.reg.MustRegister(m.requests, m.latency, m.ops, m.opDuration,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		objectsCollector{st}, fleetCollector{s})
	return m
}

// handler serves the metrics in Prometheus's text format.
func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// metricsHandler serves /metrics alone, for Config.MetricsAddr: no API key,
// nothing else.
func (s *Server) metricsHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", s.metrics.handler())
	mux.Handle("/", routeHandler{s: s, methods: unknownPath()})
	return cleanPath(s.recoverPanics(mux))
}

func (m *metrics) observeRequest(method string, status int, took time.Duration) {
	m.requests.WithLabelValues(method, strconv.Itoa(status)).Inc()
	m.latency.WithLabelValues(method).Observe(took.Seconds())
}

func (m *metrics) observeOp(kind, result string, took time.Duration) {
	m.ops.WithLabelValues(kind, result).Inc()
	m.opDuration.WithLabelValues(kind).Observe(took.Seconds())
}

// objectsCollector reports how many objects of each kind exist, read from the
// server's copies at scrape time.
type objectsCollector struct{ st *stores }

var objectsDesc = prometheus.NewDesc("fm_objects", "Fleet objects by kind.", []string{"kind"}, nil)

func (c objectsCollector) Describe(ch chan<- *prometheus.Desc) { ch <- objectsDesc }

func (c objectsCollector) Collect(ch chan<- prometheus.Metric) {
	for kind, n := range map[string]int{
		"virtual_network": c.st.networks.size(),
		"template":        c.st.templates.size(),
		"instance":        c.st.instances.size(),
		"image":           c.st.images.size(),
		"snapshot":        c.st.snapshots.size(),
	} {
		ch <- prometheus.MustNewConstMetric(objectsDesc, prometheus.GaugeValue, float64(n), kind)
	}
}

// fleetCollector reports each instance's state and what its agent measures.
type fleetCollector struct{ s *Server }

var (
	instancesDesc = prometheus.NewDesc("fm_instances", "Instances by lifecycle state and DSS node type.",
		[]string{"state", "node_type"}, nil)
	heartbeatAgeDesc = prometheus.NewDesc("fm_instance_heartbeat_age_seconds",
		"Seconds since the instance's agent was last heard from (running machines only).", []string{"instance"}, nil)
	volumeUsedDesc = prometheus.NewDesc("fm_instance_data_volume_used_ratio",
		"Used fraction of the instance's data volume, as its agent last measured it.", []string{"instance"}, nil)
)

func (c fleetCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- instancesDesc
	ch <- heartbeatAgeDesc
	ch <- volumeUsedDesc
}

func (c fleetCollector) Collect(ch chan<- prometheus.Metric) {
	type key struct{ state, node string }
	counts := map[key]int{}
	for _, in := range c.s.st.instances.list() {
		st := c.s.statusOf(in.ID)
		counts[key{st.State, in.DSSNodeType}]++
		if st.LastSeen != nil {
			ch <- prometheus.MustNewConstMetric(heartbeatAgeDesc, prometheus.GaugeValue, time.Since(*st.LastSeen).Seconds(), in.ID)
		}
		if st.DataVolume != nil && st.DataVolume.SizeBytes > 0 {
			ch <- prometheus.MustNewConstMetric(volumeUsedDesc, prometheus.GaugeValue,
				float64(st.DataVolume.UsedBytes)/float64(st.DataVolume.SizeBytes), in.ID)
		}
	}
	for k, n := range counts {
		ch <- prometheus.MustNewConstMetric(instancesDesc, prometheus.GaugeValue, float64(n), k.state, k.node)
	}
}
