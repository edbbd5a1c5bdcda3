package server

import (
	"context"
	"encoding/json"
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
	sys *nats.Conn // the system account's, if the server has it: every node's storage
	log zerolog.Logger

	mu      sync.Mutex
	sampled time.Time
	streams []streamSample
	cons    []consumerSample
	account *jetstream.AccountInfo
	servers []serverSample
}

// serverSample is one bus node's JetStream file storage and its limit
// (max_file_store): where an account has no limit of its own (FM's has
// none), the node's is the one that is reached.
type serverSample struct {
	name        string
	used, limit float64
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

func newBusSampler(js jetstream.JetStream, nc, sys *nats.Conn, log zerolog.Logger) *busSampler {
	return &busSampler{js: js, nc: nc, sys: sys, log: log}
}

// sampleServers asks every bus node for its JetStream use (JSZ), through
// the system account, and takes the answers that come within a second.
func (b *busSampler) sampleServers(ctx context.Context) []serverSample {
	if b.sys == nil {
		return nil
	}
	inbox := b.sys.NewRespInbox()
	sub, err := b.sys.SubscribeSync(inbox)
	if err != nil {
		return nil
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := b.sys.PublishRequest("$SYS.REQ.SERVER.PING.JSZ", inbox, []byte("{}")); err != nil {
		return nil
	}
	var out []serverSample
	deadline := time.Now().Add(time.Second)
	for len(out) < 64 {
		wait := time.Until(deadline)
		if wait <= 0 || ctx.Err() != nil {
			break
		}
		m, err := sub.NextMsg(wait)
		if err != nil {
			break
		}
		var answer struct {
			Server struct {
				Name string `json:"name"`
			} `json:"server"`
			Data *struct {
				Storage uint64 `json:"storage"`
				Config  struct {
					MaxStorage int64 `json:"max_storage"`
				} `json:"config"`
			} `json:"data"`
		}
		if json.Unmarshal(m.Data, &answer) != nil || answer.Data == nil || answer.Server.Name == "" {
			continue
		}
		out = append(out, serverSample{name: answer.Server.Name, used: float64(answer.Data.Storage),
			limit: float64(answer.Data.Config.MaxStorage)})
	}
	return out
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
		info := c.CachedInfo() // as the look-up just fetched it
		cons = append(cons, consumerSample{stream: w.stream, name: w.name,
			pending: float64(info.NumPending), ackPending: float64(info.NumAckPending)})
	}
	account, err := b.js.AccountInfo(ctx)
	if err != nil {
		account = nil // not shown: an old figure would say nothing of now
	}
	servers := b.sampleServers(ctx)
	b.mu.Lock()
	defer b.mu.Unlock()
	b.sampled, b.streams, b.cons, b.account, b.servers = time.Now(), streams, cons, account, servers
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
	serverStorageDesc = prometheus.NewDesc("fm_bus_server_storage_bytes",
		"JetStream file storage a bus node uses, all accounts (servers with the system account's credentials).", []string{"server"}, nil)
	serverStorageLimitDesc = prometheus.NewDesc("fm_bus_server_storage_limit_bytes",
		"JetStream file storage a bus node may use (its max_file_store).", []string{"server"}, nil)
)

func (b *busSampler) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{busConnectedDesc, busReconnectsDesc, busSampledDesc, streamMsgsDesc, streamBytesDesc,
		streamMaxBytesDesc, consumerPendingDesc, consumerAckPendingDesc, jsStorageDesc, jsStorageLimitDesc,
		serverStorageDesc, serverStorageLimitDesc} {
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
	for _, sv := range b.servers {
		gauge(serverStorageDesc, sv.used, sv.name)
		if sv.limit > 0 {
			gauge(serverStorageLimitDesc, sv.limit, sv.name)
		}
	}
}

// pressure is the last sample's storage use (each node's, and the FM
// account's under the name "") and its work consumers' lag, for the
// alerts; fresh says the sample is recent enough to judge by.
func (b *busSampler) pressure(now time.Time) (storage []serverSample, backlog []consumerSample, fresh bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.sampled.IsZero() || now.Sub(b.sampled) > 4*busSampleEvery {
		return nil, nil, false
	}
	storage = append(storage, b.servers...)
	if a := b.account; a != nil && a.Limits.MaxStore > 0 {
		storage = append(storage, serverSample{used: float64(a.Store), limit: float64(a.Limits.MaxStore)})
	}
	return storage, append(backlog, b.cons...), true
}
