package bus

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"time"

	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
)

// Topology is the JetStream layout FM runs on. Its zero value is not useful;
// start from DefaultTopology.
type Topology struct {
	// Replicas is the replication factor of every stream and bucket: 1 on an
	// embedded bus, 3 (or 5) on a cluster.
	Replicas int
	// OpsRetention is how long an operation (future) is kept after its last
	// change, so that clients polling a finished future keep getting its
	// outcome.
	OpsRetention time.Duration
	// AgentStatusTTL is how long an agent's status stays in fm_agents after
	// its last write; agents rewrite it well within this.
	AgentStatusTTL time.Duration
	// CommandsMaxAge bounds how long a command waits for an offline agent.
	CommandsMaxAge time.Duration
	// ProvisionMaxAge bounds how long a provision request waits for a
	// provisioner.
	ProvisionMaxAge time.Duration
	EventsMaxAge    time.Duration
	EventsMaxBytes  int64
	LogsMaxAge      time.Duration
	LogsMaxBytes    int64
	// AuditMaxAge bounds the audit trail; 0 keeps it forever.
	AuditMaxAge time.Duration
	// LeaseTTL is how long a lease lives without renewal: a provisioner that
	// dies is replaced within it.
	LeaseTTL time.Duration
	// JoinTokenTTL is how long a new machine's join token is valid.
	JoinTokenTTL time.Duration
	// SessionLifetime is how long a web console sign-in lasts.
	SessionLifetime time.Duration
	// DiagnosisRetention is how long a diagnosis bundle is kept.
	DiagnosisRetention time.Duration
	// DuplicateWindow is how long JetStream remembers a Nats-Msg-Id to drop a
	// duplicate publish.
	DuplicateWindow time.Duration
}

// DefaultTopology is the layout of a single-machine FM.
func DefaultTopology() Topology {
	return Topology{
		Replicas:           1,
		OpsRetention:       7 * 24 * time.Hour,
		AgentStatusTTL:     time.Hour,
		CommandsMaxAge:     7 * 24 * time.Hour,
		ProvisionMaxAge:    7 * 24 * time.Hour,
		EventsMaxAge:       30 * 24 * time.Hour,
		EventsMaxBytes:     1 << 30,
		LogsMaxAge:         7 * 24 * time.Hour,
		LogsMaxBytes:       1 << 30,
		AuditMaxAge:        0,
		DiagnosisRetention: 7 * 24 * time.Hour,
		LeaseTTL:           15 * time.Second,
		JoinTokenTTL:       time.Hour,
		SessionLifetime:    12 * time.Hour,
		DuplicateWindow:    10 * time.Minute,
	}
}

// objectHistory is how many past revisions of a fleet object are kept, so that
// an operator can read what a setting was (nats kv history).
const objectHistory = 10

// KeyValues declares every key-value bucket.
func (t Topology) KeyValues() []jetstream.KeyValueConfig {
	object := func(name, desc string) jetstream.KeyValueConfig {
		return jetstream.KeyValueConfig{Bucket: name, Description: desc, History: objectHistory,
			MaxValueSize: 1 << 20, Storage: jetstream.FileStorage, Replicas: t.Replicas}
	}
	state := func(name, desc string) jetstream.KeyValueConfig {
		return jetstream.KeyValueConfig{Bucket: name, Description: desc, History: 1,
			MaxValueSize: 1 << 20, Storage: jetstream.FileStorage, Replicas: t.Replicas}
	}
	desired := state(protocol.BucketDesired, "desired state per instance, read by that instance's agent")
	desired.RePublish = &jetstream.RePublish{
		Source:      "$KV." + protocol.BucketDesired + ".*",
		Destination: protocol.DesiredSubject("{{wildcard(1)}}"),
	}
	ops := state(protocol.BucketOps, "operations (futures)")
	ops.TTL = t.OpsRetention
	joins := state(protocol.BucketJoins, "single-use join tokens of new machines")
	joins.TTL = t.JoinTokenTTL
	leases := state(protocol.BucketLeases, "leases that elect one active provisioner")
	leases.TTL = t.LeaseTTL
	// A console session lasts at most SessionLifetime: the bucket forgets
	// it then, whatever a server did or did not do.
	sessions := state(protocol.BucketSessions, "web console sessions, key the SHA-256 of the cookie (never the cookie)")
	sessions.TTL = t.SessionLifetime
	agents := state(protocol.BucketAgents, "last status per instance (phase, generation, DSS, slow machine facts), written by its agent on a change")
	agents.TTL = t.AgentStatusTTL
	// No delete markers when a status ages out: NATS allows roll-ups on a
	// stream that leaves them, and every agent writes here
	// (declareWithoutRollups).
	return []jetstream.KeyValueConfig{
		object(protocol.BucketAccounts, "cloud accounts (identities virtual networks name), secrets sealed"),
		object(protocol.BucketLBs, "load balancers' settings and FM's state of them"),
		object(protocol.BucketNetworks, "virtual networks"),
		object(protocol.BucketTemplates, "instance settings templates"),
		object(protocol.BucketInstances, "instances"),
		object(protocol.BucketImages, "deployable DSS images"),
		object(protocol.BucketSnapshots, "snapshots of instance data volumes"),
		object(protocol.BucketAPIKeys, "REST API keys (secrets hashed)"),
		object(protocol.BucketSettings, "tenant settings, key <tenant>.<setting>"),
		object(protocol.BucketLifecycle, "FM's lifecycle state per instance"),
		state(protocol.BucketSecrets, "credentials FM keeps per instance"),
		leases,
		joins,
		state(protocol.BucketLabels, "label claims that keep labels unique, key <kind>.<digest>"),
		ops,
		desired,
		state(protocol.BucketMachines, "machine state per instance, written by the provisioner"),
		state(protocol.BucketBalancers, "load balancers as the provisioner made them"),
		agents,
		sessions,
		state(protocol.BucketAlerts, "alerts the server raised and what the tenant's webhook was told, key <tenant>.<fingerprint>"),
	}
}

// What one instance may hold of the streams every instance shares, whatever
// it sends: each of its subjects keeps at most so many messages of at most
// so many bytes (what it sends beyond drops its own oldest, and larger
// messages are refused), so that one noisy or hostile machine holds at most
// an eighth of each stream (SharePerInstance) and cannot push the others'
// records out beyond that. The provisioner's events count per subject too.
const (
	eventsPerSubject = 512 // per instance and event kind: room for those a server away has not folded
	maxEventSize     = protocol.MaxEventBytes
	logsPerSubject   = 512       // per instance and log source
	maxLogSize       = 128 << 10 // the agent sends at most 64 KiB at once
	// A diagnosis chunk (256 KiB) and its headers.
	maxDiagChunkSize = 256<<10 + 4<<10
)

// SharePerInstance is the most of FM_EVENTS and FM_LOGS (of the default
// size) one instance holds: events of the kinds an agent sends, logs of
// every source.
func SharePerInstance() (events, logs int64) {
	return int64(len(protocol.AgentEventKinds)) * eventsPerSubject * maxEventSize,
		int64(len(protocol.LogSources)) * logsPerSubject * maxLogSize
}

// diagChunksMaxAge is how long a diagnosis chunk that was never filed
// stays.
const diagChunksMaxAge = 24 * time.Hour

// idleConsumerLimit is the longest a consumer of a stream agents read may
// stay idle.
const idleConsumerLimit = 10 * time.Minute

// Streams declares every stream.
func (t Topology) Streams() []jetstream.StreamConfig {
	return []jetstream.StreamConfig{
		{
			Name: protocol.StreamProvision, Description: "machine operations for the provisioner",
			Subjects: []string{protocol.SubjectAllProvision}, Retention: jetstream.WorkQueuePolicy,
			MaxAge: t.ProvisionMaxAge, Duplicates: t.DuplicateWindow,
			Storage: jetstream.FileStorage, Replicas: t.Replicas,
		},
		{
			Name: protocol.StreamCommands, Description: "commands for agents",
			Subjects: []string{protocol.SubjectAllCommands}, Retention: jetstream.LimitsPolicy,
			MaxAge: t.CommandsMaxAge, Duplicates: t.DuplicateWindow,
			Storage: jetstream.FileStorage, Replicas: t.Replicas,
			// Every consumer, durable ones too, goes once idle.
			ConsumerLimits: jetstream.StreamConsumerLimits{InactiveThreshold: idleConsumerLimit},
			// Agents have no consumer: each receives its commands as they
			// are stored, on its instance's live subject, and asks FM for
			// those stored while it was away (CommandsAfter).
			RePublish: &jetstream.RePublish{
				Source:      protocol.SubjectAllCommands,
				Destination: protocol.CommandLiveSubject("{{wildcard(1)}}"),
			},
		},
		{
			Name: protocol.StreamEvents, Description: "progress and results from agents and the provisioner",
			Subjects: []string{protocol.SubjectAllEvents}, Retention: jetstream.LimitsPolicy,
			MaxAge: t.EventsMaxAge, MaxBytes: t.EventsMaxBytes, Discard: jetstream.DiscardOld,
			MaxMsgsPerSubject: eventsPerSubject, MaxMsgSize: maxEventSize,
			Duplicates: t.DuplicateWindow, Storage: jetstream.FileStorage, Replicas: t.Replicas,
		},
		{
			Name: protocol.StreamLogs, Description: "DSS and agent logs",
			Subjects: []string{protocol.SubjectAllLogs}, Retention: jetstream.LimitsPolicy,
			MaxAge: t.LogsMaxAge, MaxBytes: t.LogsMaxBytes, Discard: jetstream.DiscardOld,
			MaxMsgsPerSubject: logsPerSubject, MaxMsgSize: maxLogSize,
			// Not compressed: a bus node killed while it wrote a compressed
			// block came back with the stream's replica stuck ("error
			// reading compression reader: s2: unsupported input", never
			// current again; TestNATSNodeLossLosesNothing, nats-server
			// v2.15.3). A stream made compressed before keeps its blocks;
			// new ones are written plain.
			Compression: jetstream.NoCompression,
			// An agent sends a message again, under its id, until stored:
			// within seconds, so NATS's default window (2 minutes) is enough,
			// and keeps the ids of a fleet's logs for less.
			Storage: jetstream.FileStorage, Replicas: t.Replicas,
		},
		{
			// Chunks are filed into fm_diagnosis and dropped within
			// seconds; what is left (a run cut short) goes in a day. Apart
			// from FM_LOGS: a bundle is far more than an instance's share
			// of logs.
			Name: protocol.StreamDiagnosis, Description: "diagnosis bundles' chunks on their way to fm_diagnosis",
			Subjects: []string{protocol.SubjectAllDiag}, Retention: jetstream.LimitsPolicy,
			MaxAge: diagChunksMaxAge, MaxBytes: t.LogsMaxBytes, Discard: jetstream.DiscardOld, MaxMsgSize: maxDiagChunkSize,
			Duplicates: t.DuplicateWindow, Storage: jetstream.FileStorage, Replicas: t.Replicas,
		},
		{
			Name: protocol.StreamAudit, Description: "audit trail of every change (delete and purge denied)",
			Subjects: []string{protocol.SubjectAllAudit}, Retention: jetstream.LimitsPolicy,
			MaxAge: t.AuditMaxAge, DenyDelete: true, DenyPurge: true,
			Duplicates: t.DuplicateWindow, Storage: jetstream.FileStorage, Replicas: t.Replicas,
		},
	}
}

// StreamNames is every stream the topology declares, its buckets' and
// object stores' included, by the name JetStream gives each.
func (t Topology) StreamNames() []string {
	var names []string
	for _, kv := range t.KeyValues() {
		names = append(names, "KV_"+kv.Bucket)
	}
	for _, st := range t.Streams() {
		names = append(names, st.Name)
	}
	for _, o := range t.ObjectStores() {
		names = append(names, "OBJ_"+o.Bucket)
	}
	return names
}

// ObjectStores declares every object store.
func (t Topology) ObjectStores() []jetstream.ObjectStoreConfig {
	return []jetstream.ObjectStoreConfig{
		{Bucket: protocol.ObjectStoreKits, Description: "DSS install kits",
			Storage: jetstream.FileStorage, Replicas: t.Replicas},
		{Bucket: protocol.ObjectStoreDiagnosis, Description: "diagnosis bundles from agents",
			TTL: t.DiagnosisRetention, Storage: jetstream.FileStorage, Replicas: t.Replicas},
		// Kept until deleted: a snapshot is a backup.
		{Bucket: protocol.ObjectStoreSnapshots, Description: "snapshot archives of data volumes (local backend)",
			Storage: jetstream.FileStorage, Replicas: t.Replicas},
	}
}

// declareWait bounds how long Declare waits for a bus not ready to take
// the declaration: a cluster whose nodes have just started answers that no
// peer is ready (no suitable peers for placement) for a moment after each
// says it is healthy.
const declareWait = 2 * time.Minute

// Declare creates every stream, bucket and object store, or updates it to
// this declaration, stamped with LayoutVersion. It is idempotent; run it at
// every start. A bus with a newer layout is refused, untouched
// (ErrNewerLayout). A bus not ready yet (unanswered, or with no peer ready
// for a replica) is asked again, every second, for up to declareWait.
func (t Topology) Declare(ctx context.Context, js jetstream.JetStream) error {
	deadline := time.Now().Add(declareWait)
	for {
		err := CheckLayout(ctx, js)
		if err == nil {
			err = t.declareOnce(ctx, js)
		}
		if err == nil || !notReadyYet(err) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(time.Second):
		}
	}
}

// errCodeNoPeers is a cluster's refusal to place a replica, for lack of a
// peer ready for it (nats-server's JSClusterNoPeersErrF).
const errCodeNoPeers = 10005

func notReadyYet(err error) bool {
	var apiErr *jetstream.APIError
	return Unanswered(err) || (errors.As(err, &apiErr) && apiErr.ErrorCode == errCodeNoPeers)
}

func (t Topology) declareOnce(ctx context.Context, js jetstream.JetStream) error {
	for _, cfg := range t.KeyValues() {
		cfg.Metadata = stamped(cfg.Metadata)
		if cfg.Bucket == protocol.BucketAgents {
			if err := declareWithoutRollups(ctx, js, cfg); err != nil {
				return fmt.Errorf("declare bucket %s: %w", cfg.Bucket, err)
			}
			continue
		}
		if _, err := js.CreateOrUpdateKeyValue(ctx, cfg); err != nil {
			return fmt.Errorf("declare bucket %s: %w", cfg.Bucket, err)
		}
	}
	for _, cfg := range t.Streams() {
		cfg.Metadata = stamped(cfg.Metadata)
		if _, err := js.CreateOrUpdateStream(ctx, cfg); err != nil {
			return fmt.Errorf("declare stream %s: %w", cfg.Name, err)
		}
	}
	for _, cfg := range t.ObjectStores() {
		cfg.Metadata = stamped(cfg.Metadata)
		if _, err := js.CreateOrUpdateObjectStore(ctx, cfg); err != nil {
			return fmt.Errorf("declare object store %s: %w", cfg.Bucket, err)
		}
	}
	// Consumers made on kits (an admin's nats object get) leave none behind
	// for long.
	if err := limitIdleConsumers(ctx, js, "OBJ_"+protocol.ObjectStoreKits); err != nil {
		return fmt.Errorf("declare object store %s: %w", protocol.ObjectStoreKits, err)
	}
	return nil
}

// limitIdleConsumers makes every consumer of a stream, durable ones too,
// go once idle for idleConsumerLimit (the object store client declares its
// streams without consumer limits, so they are set after).
func limitIdleConsumers(ctx context.Context, js jetstream.JetStream, stream string) error {
	st, err := js.Stream(ctx, stream)
	if err != nil {
		return err
	}
	cfg := st.CachedInfo().Config
	if cfg.ConsumerLimits.InactiveThreshold == idleConsumerLimit {
		return nil
	}
	cfg.ConsumerLimits.InactiveThreshold = idleConsumerLimit
	if _, err := js.UpdateStream(ctx, cfg); err != nil {
		return fmt.Errorf("limit idle consumers: %w", err)
	}
	return nil
}

// declareWithoutRollups declares a bucket every agent writes its own key
// of with roll-ups off: a put with the header Nats-Rollup: all would
// otherwise purge every other key. The KV client turns them on, so the
// stream is changed after; and a bucket an older FM made with delete
// markers (which need roll-ups, and whose message TTLs cannot be turned
// off) is changed in place. Keys of such a bucket are deleted, never
// purged.
func declareWithoutRollups(ctx context.Context, js jetstream.JetStream, cfg jetstream.KeyValueConfig) error {
	_, err := js.CreateKeyValue(ctx, cfg)
	if err != nil && !errors.Is(err, jetstream.ErrBucketExists) {
		return err
	}
	st, err := js.Stream(ctx, "KV_"+cfg.Bucket)
	if err != nil {
		return err
	}
	want := st.CachedInfo().Config
	want.Description, want.MaxAge, want.MaxMsgSize, want.Replicas = cfg.Description, cfg.TTL, cfg.MaxValueSize, cfg.Replicas
	want.MaxMsgsPerSubject, want.SubjectDeleteMarkerTTL, want.AllowRollup = int64(cfg.History), 0, false
	want.Metadata = stamped(want.Metadata)
	if reflect.DeepEqual(want, st.CachedInfo().Config) {
		return nil
	}
	if _, err := js.UpdateStream(ctx, want); err != nil {
		return fmt.Errorf("turn roll-ups off: %w", err)
	}
	return nil
}
