package provisioner

import (
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics count the provisioner's calls to its backend (a cloud API's
// calls, behind each), so that an operator sees which fail and how long
// they take.
type metrics struct {
	calls    *prometheus.CounterVec
	duration *prometheus.HistogramVec
	lease    prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fm_provisioner_backend_calls_total",
			Help: "Calls of the provisioner to its backend, by call and result (ok, transient_error, error).",
		}, []string{"backend", "call", "result"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "fm_provisioner_backend_call_duration_seconds",
			Help:    "Duration of the provisioner's calls to its backend, by call.",
			Buckets: []float64{0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 1800},
		}, []string{"backend", "call"}),
		lease: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "fm_provisioner_lease_held",
			Help: "1 while this provisioner holds the provisioner lease (the active one), 0 while it stands by.",
		}),
	}
	if reg == nil {
		return m, nil
	}
	// A second provisioner in the process (tests, a standby in fm dev)
	// counts into the collectors the first registered.
	var err error
	if m.calls, err = registered(reg, m.calls); err != nil {
		return nil, err
	}
	if m.duration, err = registered(reg, m.duration); err != nil {
		return nil, err
	}
	if m.lease, err = registered(reg, m.lease); err != nil {
		return nil, err
	}
	return m, nil
}

// registered registers c, or returns the collector registered before it.
func registered[C prometheus.Collector](reg prometheus.Registerer, c C) (C, error) {
	err := reg.Register(c)
	var are prometheus.AlreadyRegisteredError
	if errors.As(err, &are) {
		if existing, ok := are.ExistingCollector.(C); ok {
			return existing, nil
		}
	}
	return c, err
}

// observe counts one call of the backend that took since began.
func (m *metrics) observe(backend, call string, began time.Time, err error) {
	result := "ok"
	switch {
	case err != nil && isTransient(err):
		result = "transient_error"
	case err != nil:
		result = "error"
	}
	m.calls.WithLabelValues(backend, call, result).Inc()
	m.duration.WithLabelValues(backend, call).Observe(time.Since(began).Seconds())
}
