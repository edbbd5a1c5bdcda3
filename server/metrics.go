package server

import (
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics are the server's Prometheus metrics, on a registry of its own
// (Config.Metrics, or one made here), so that several servers can run in
// one process (tests). A scrape reads the server's copies and the bus
// sampler's last sample: it costs no bus call, whatever the fleet's size.
type metrics struct {
	reg        *prometheus.Registry
	requests   *prometheus.CounterVec
	latency    *prometheus.HistogramVec
	ops        *prometheus.CounterVec
	opDuration *prometheus.HistogramVec
	// alertNotifications counts the alert webhook's requests by result
	// (sent, failed); alertsGivenUp the alerts it was never told of.
	alertNotifications *prometheus.CounterVec
	alertsGivenUp      prometheus.Counter
	bus                *busSampler
}

func newMetrics(s *Server) (*metrics, error) {
	reg := s.cfg.Metrics
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	m := &metrics{
		reg: reg,
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
		alertNotifications: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fm_alert_webhook_requests_total", Help: "Requests to the alert webhook by result (sent, failed).",
		}, []string{"result"}),
		alertsGivenUp: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fm_alert_notifications_given_up_total", Help: "Alert changes (fired, resolved) the webhook was never told: FM stopped trying (after a day by default).",
		}),
		bus: newBusSampler(s.js, s.cfg.Conn, s.cfg.SystemConn, s.log),
	}
	for _, result := range []string{"sent", "failed"} {
		m.alertNotifications.WithLabelValues(result)
	}
	for _, kind := range instanceOpKinds {
		for _, result := range []string{api.OpSucceeded, api.OpFailed, api.OpAborted} {
			m.ops.WithLabelValues(kind, result)
		}
	}
	consoleStreams := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "fm_console_streams", Help: "The web console's open event streams (pages) on this replica; at most 1000.",
	}, func() float64 { return float64(s.live.count()) })
	for _, c := range []prometheus.Collector{m.requests, m.latency, m.ops, m.opDuration, m.alertNotifications, m.alertsGivenUp,
		objectsCollector{s.st}, fleetCollector{s}, m.bus, consoleStreams} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	// The process's own: registered once, whoever shares the registry.
	for _, c := range []prometheus.Collector{collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})} {
		var are prometheus.AlreadyRegisteredError
		if err := reg.Register(c); err != nil && !errors.As(err, &are) {
			return nil, err
		}
	}
	return m, nil
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

// A took of 0 counts the request without timing it (a console event
// stream, which lasts as long as its page).
func (m *metrics) observeRequest(method string, status int, took time.Duration) {
	switch method {
	case http.MethodGet, http.MethodPost, http.MethodPut, http.MethodDelete, http.MethodHead, http.MethodOptions, http.MethodPatch:
	default:
		method = "other" // anyone can send any method: one series, not one each
	}
	m.requests.WithLabelValues(method, strconv.Itoa(status)).Inc()
	if took > 0 {
		m.latency.WithLabelValues(method).Observe(took.Seconds())
	}
}

// observeOp counts an operation that ended; took is 0 for one answered at
// once (no duration: it would drag the percentiles down).
func (m *metrics) observeOp(kind, result string, took time.Duration) {
	m.ops.WithLabelValues(kind, result).Inc()
	if took > 0 {
		m.opDuration.WithLabelValues(kind).Observe(took.Seconds())
	}
}

// instanceOpKinds are the operations on an instance, whose counts start at
// 0 for every result: a counter born at 1 on its first failure shows no
// increase, and an alert on failures would miss it.
var instanceOpKinds = []string{opReprovision, opDeprovision, opStart, opStop, opDelete, opRestartDSS, opReplayActions,
	opResetPassword, opDiagnosis, opSnapshot, opDeleteSnapshot, opGrowVolume}

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

// fleetCollector reports the instances by state, each instance's health as
// its agent reports it, its snapshots, and the operations under way. The
// series that name an instance are one per instance: that is their point.
type fleetCollector struct{ s *Server }

// instanceDesc describes a series per instance, named by instance_id:
// "instance" is Prometheus's own label for the target scraped, and every
// FM replica serves the same fleet.
func instanceDesc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, append([]string{"instance_id"}, labels...), nil)
}

var (
	instancesDesc = prometheus.NewDesc("fm_instances", "Instances by lifecycle state and DSS node type.",
		[]string{"state", "node_type"}, nil)
	opsInFlightDesc = prometheus.NewDesc("fm_operations_in_flight", "Operations (futures) running, by kind.",
		[]string{"kind"}, nil)
	heartbeatAgeDesc = instanceDesc("fm_instance_heartbeat_age_seconds",
		"Seconds since the instance's agent was last heard from (running machines only).")
	instanceFailedDesc = instanceDesc("fm_instance_failed",
		"1 while the instance is in state failed (its last operation failed, or its machine was lost); absent otherwise.")
	machineUpDesc = instanceDesc("fm_instance_machine_up",
		"1 if the machine of a running instance (no operation under way) runs, 0 if it was found stopped or gone (outside FM).")
	agentUpDesc = instanceDesc("fm_instance_agent_up",
		"1 if the instance's agent is responding (heard from within three heartbeats), 0 if not (running instances with no operation under way).")
	dssUpDesc = instanceDesc("fm_instance_dss_up",
		"1 if DSS answers on its port as the instance's agent last checked, 0 if not (running instances with no operation under way, whose agent reported).")
	dssInfoDesc = instanceDesc("fm_instance_dss_info",
		"The DSS version installed on the instance, as its agent reports it, and the instance's node type (always 1).", "version", "node_type")
	volumeSizeDesc = instanceDesc("fm_instance_data_volume_size_bytes",
		"Size of the instance's data volume's file system, as its agent last measured it.")
	volumeUsedBytesDesc = instanceDesc("fm_instance_data_volume_used_bytes",
		"Used bytes of the instance's data volume, as its agent last measured it.")
	volumeUsedDesc = instanceDesc("fm_instance_data_volume_used_ratio",
		"Used fraction of the instance's data volume, as its agent last measured it.")
	volumeMaxDesc = instanceDesc("fm_instance_data_volume_max_size_bytes",
		"The size the instance's data volume may grow to (dataVolumeSizeMaxGB), for instances that set one.")
	volumeAtMaxDesc = instanceDesc("fm_instance_data_volume_at_max",
		"1 if the instance's data volume has reached the size it may grow to, 0 if not (instances that set one).")
	snapshotSuccessDesc = instanceDesc("fm_instance_snapshot_last_success_timestamp_seconds",
		"When the instance's last snapshot that succeeded was taken (instances with one).")
	snapshotFailedDesc = instanceDesc("fm_instance_snapshot_last_failed",
		"1 if the instance's last finished snapshot failed, 0 if it succeeded (instances with one).")
	snapshotPeriodDesc = instanceDesc("fm_instance_automated_snapshot_period_seconds",
		"The period of the instance's automated snapshots (instances that have them on).")
)

func (c fleetCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{instancesDesc, opsInFlightDesc, heartbeatAgeDesc, instanceFailedDesc, machineUpDesc, agentUpDesc, dssUpDesc, dssInfoDesc,
		volumeSizeDesc, volumeUsedBytesDesc, volumeUsedDesc, volumeMaxDesc, volumeAtMaxDesc,
		snapshotSuccessDesc, snapshotFailedDesc, snapshotPeriodDesc} {
		ch <- d
	}
}

func (c fleetCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.s
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	gaugeIf := func(d *prometheus.Desc, b *bool, id string) {
		if b != nil {
			gauge(d, boolValue(*b), id)
		}
	}
	snaps := s.lastSnapshotsByInstance()
	type key struct{ state, node string }
	counts := map[key]int{}
	for _, in := range s.st.instances.list() {
		st := s.statusOf(in.ID)
		h := s.healthOf(&in, st, snaps[in.ID])
		counts[key{st.State, in.DSSNodeType}]++
		if h.failed {
			gauge(instanceFailedDesc, 1, in.ID)
		}
		gaugeIf(machineUpDesc, h.machineUp, in.ID)
		gaugeIf(agentUpDesc, h.agentUp, in.ID)
		gaugeIf(dssUpDesc, h.dssUp, in.ID)
		if st.LastSeen != nil {
			gauge(heartbeatAgeDesc, time.Since(*st.LastSeen).Seconds(), in.ID)
		}
		// The version is the agent's word: one that could flood Prometheus
		// with series (long, odd, changing) is left out.
		if st.DSS != nil && labelSafe(st.DSS.Version) {
			gauge(dssInfoDesc, 1, in.ID, st.DSS.Version, in.DSSNodeType)
		}
		if used, ok := h.volumeUsed(); ok {
			gauge(volumeSizeDesc, float64(h.volume.SizeBytes), in.ID)
			gauge(volumeUsedBytesDesc, float64(h.volume.UsedBytes), in.ID)
			gauge(volumeUsedDesc, used, in.ID)
		}
		if h.volumeMaxBytes > 0 {
			gauge(volumeMaxDesc, float64(h.volumeMaxBytes), in.ID)
		}
		gaugeIf(volumeAtMaxDesc, h.volumeAtMax, in.ID)
		if l := h.snapshots; !l.success.IsZero() {
			gauge(snapshotSuccessDesc, float64(l.success.UnixMilli())/1000, in.ID)
		}
		if l := h.snapshots; !l.finished.IsZero() {
			gauge(snapshotFailedDesc, boolValue(l.failed), in.ID)
		}
		if h.snapshotPeriod > 0 {
			gauge(snapshotPeriodDesc, h.snapshotPeriod.Seconds(), in.ID)
		}
	}
	for k, n := range counts {
		gauge(instancesDesc, float64(n), k.state, k.node)
	}
	running := map[string]int{}
	for _, r := range s.st.ops.rowsOf(api.OpRunning) {
		running[r.val.Kind]++
	}
	for kind, n := range running {
		gauge(opsInFlightDesc, float64(n), kind)
	}
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// agentExpected says whether an instance's agent should answer: the
// instance is settled and running, and its machine runs (one stopped
// outside FM is the machine's news, not the agent's).
func agentExpected(st instanceStatus) bool { return settledRunning(st) && st.CloudMachineIsUp }

// settledRunning says whether an instance's agent and DSS should answer:
// it runs, and no operation is under way (a new machine's agent has not
// reported yet; an install, an upgrade or a restart of DSS takes it down
// on purpose).
func settledRunning(st instanceStatus) bool {
	return st.State == stateRunning && (st.Operation == nil || st.Operation.State != api.OpRunning)
}

// labelSafe says whether what an agent reports (a DSS version) may be
// shown: a label value, a cell of the CLI's table.
func labelSafe(v string) bool { return plainToken(v, ".-_+") }
