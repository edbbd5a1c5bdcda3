package server

import (
	"context"
	"sync"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// busSampleEvery is how often the bus sampler asks JetStream about FM's
// streams: a scrape shows the last sample, so that no scrape costs a bus
// call.
const busSampleEvery = 15 * time.Second

// busSampler keeps the last look at the bus: FM's streams, the consumers
// that do FM's work, and the account's JetStream use.
type busSampler struct {
	js  jetstream.JetStream
	nc  *nats.Conn
	log zerolog.Logger

	mu      sync.Mutex
	sampled time.Time
	streams []streamSample
	cons    []consumerSample
	account *jetstream.AccountInfo
}

type streamSample struct {
	name                  string
	msgs, bytes, maxBytes float64 // maxBytes < 0: no limit
}

type consumerSample struct {
	stream, name        string
	pending, ackPending float64
}

// workConsumers are the durable consumers whose lag says FM is behind: the
// server folding events and the provisioner taking requests.
var workConsumers = []struct{ stream, name string }{
	{protocol.StreamEvents, protocol.ConsumerEvents},
	{protocol.StreamProvision, protocol.ConsumerProvisioner},
}

func newBusSampler(js jetstream.JetStream, nc *nats.Conn, log zerolog.Logger) *busSampler {
	return &busSampler{js: js, nc: nc, log: log}
}

// run samples the bus every busSampleEvery until ctx ends.
func (b *busSampler) run(ctx context.Context) {
	for {
		b.sample(ctx)
		select {
		case <-ctx.Done():
			return
		case <-time.After(busSampleEvery):
		}
	}
}

func (b *busSampler) sample(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var streams []streamSample
	list := b.js.ListStreams(ctx)
	for info := range list.Info() {
		streams = append(streams, streamSample{name: info.Config.Name, msgs: float64(info.State.Msgs),
			bytes: float64(info.State.Bytes), maxBytes: float64(info.Config.MaxBytes)})
	}
	if err := list.Err(); err != nil {
		b.log.Debug().Err(err).Msg("bus streams not sampled")
		return // the last sample stays, and its age says so
	}
	var cons []consumerSample
	for _, w := range workConsumers {
		c, err := b.js.Consumer(ctx, w.stream, w.name)
		if err != nil {
			continue // not made yet (no provisioner ever ran)
		}
		info := c.CachedInfo()
		if fresh, err := c.Info(ctx); err == nil {
			info = fresh
		}
		cons = append(cons, consumerSample{stream: w.stream, name: w.name,
			pending: float64(info.NumPending), ackPending: float64(info.NumAckPending)})
	}
	account, err := b.js.AccountInfo(ctx)
	if err != nil {
		account = nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.sampled, b.streams, b.cons = time.Now(), streams, cons
	if account != nil {
		b.account = account
	}
}

var (
	busConnectedDesc  = prometheus.NewDesc("fm_bus_connected", "1 while the server is connected to the bus.", nil, nil)
	busReconnectsDesc = prometheus.NewDesc("fm_bus_reconnects_total",
		"Times the server's bus connection was made again after a loss.", nil, nil)
	busSampledDesc = prometheus.NewDesc("fm_bus_sample_timestamp_seconds",
		"When the bus's streams and consumers were last sampled (every 15 s).", nil, nil)
	streamMsgsDesc = prometheus.NewDesc("fm_bus_stream_messages", "Messages in a JetStream stream.",
		[]string{"stream"}, nil)
	streamBytesDesc = prometheus.NewDesc("fm_bus_stream_bytes", "Bytes stored in a JetStream stream.",
		[]string{"stream"}, nil)
	streamMaxBytesDesc = prometheus.NewDesc("fm_bus_stream_max_bytes", "The stream's byte limit (streams with one).",
		[]string{"stream"}, nil)
	consumerPendingDesc = prometheus.NewDesc("fm_bus_consumer_pending_messages",
		"Messages FM's work consumer has not been delivered yet: its lag.", []string{"stream", "consumer"}, nil)
	consumerAckPendingDesc = prometheus.NewDesc("fm_bus_consumer_ack_pending_messages",
		"Messages FM's work consumer was delivered and has not acknowledged yet.", []string{"stream", "consumer"}, nil)
	jsStorageDesc = prometheus.NewDesc("fm_bus_jetstream_storage_bytes",
		"JetStream file storage the FM account uses.", nil, nil)
	jsStorageLimitDesc = prometheus.NewDesc("fm_bus_jetstream_storage_limit_bytes",
		"JetStream file storage the FM account may use (accounts with a limit).", nil, nil)
)

func (b *busSampler) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{busConnectedDesc, busReconnectsDesc, busSampledDesc, streamMsgsDesc, streamBytesDesc,
		streamMaxBytesDesc, consumerPendingDesc, consumerAckPendingDesc, jsStorageDesc, jsStorageLimitDesc} {
		ch <- d
	}
}

func (b *busSampler) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	gauge(busConnectedDesc, boolValue(b.nc.IsConnected()))
	ch <- prometheus.MustNewConstMetric(busReconnectsDesc, prometheus.CounterValue, float64(b.nc.Stats().Reconnects))
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.sampled.IsZero() {
		return
	}
	gauge(busSampledDesc, float64(b.sampled.UnixMilli())/1000)
	for _, st := range b.streams {
		gauge(streamMsgsDesc, st.msgs, st.name)
		gauge(streamBytesDesc, st.bytes, st.name)
		if st.maxBytes > 0 {
			gauge(streamMaxBytesDesc, st.maxBytes, st.name)
		}
	}
	for _, c := range b.cons {
		gauge(consumerPendingDesc, c.pending, c.stream, c.name)
		gauge(consumerAckPendingDesc, c.ackPending, c.stream, c.name)
	}
	if a := b.account; a != nil {
		gauge(jsStorageDesc, float64(a.Store))
		if a.Limits.MaxStore > 0 {
			gauge(jsStorageLimitDesc, float64(a.Limits.MaxStore))
		}
	}
}
