// Package server is FM's server role: it owns the fleet's objects (virtual
// networks, templates, instances, images, snapshots, operations, API keys) in
// JetStream key-value buckets, serves the Dataiku-compatible REST API and
// FM's own additions, and turns user actions into desired state and commands
// on the bus. It never calls a cloud API and never dials an agent.
//
// cmd/fm and tests import it; it imports protocol, api and bus, never
// provisioner or agent. server/servertest starts one in-process for tests.
package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	stdlog "log"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fleetmanager/fm/api"
	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/console"
	"github.com/fleetmanager/fm/internal/crashpoint"
	"github.com/fleetmanager/fm/internal/natsauth"
	"github.com/fleetmanager/fm/internal/seal"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// Config configures a Server.
type Config struct {
	// Conn is the NATS connection the server uses; the caller owns it.
	Conn *nats.Conn
	// Listener serves the REST API; if nil, the server listens on Listen.
	Listener net.Listener
	Listen   string
	// MetricsAddr, if set, is an address of its own where GET /metrics is
	// served without an API key (with the REST API's TLS, if any), for a
	// Prometheus the operator lets reach it and nobody else: the series
	// name instances. ":0" picks a port (Server.MetricsAddr).
	MetricsAddr string
	// MetricsPublic serves /metrics on the REST API's listener without an
	// API key; by default it needs one, of any role.
	MetricsPublic bool
	// Metrics, if set, is the registry the server adds its metrics to and
	// serves, with whatever else the process registered there (fm dev's
	// provisioner); nil: one of its own.
	Metrics *prometheus.Registry
	// DrainTime is how long a stopping server keeps serving while /healthz
	// answers 503, so that a load balancer stops sending it calls before it
	// closes its listener (0: it closes at once). Set it to the balancer's
	// health-check interval times its unhealthy threshold.
	DrainTime time.Duration
	// TrustedProxies are the load balancers whose X-Forwarded-For is
	// believed: a request from one of them is the client's that the header
	// names (forwardedFor).
	TrustedProxies []netip.Prefix
	// Topology is declared (created or updated) at start; the zero value
	// means bus.DefaultTopology().
	Topology bus.Topology
	// Network is FM's own network, for useDefaultValues=True.
	Network NetworkDefaults
	// DefaultInstanceType is the cloudInstanceType of an instance created
	// without one.
	DefaultInstanceType string
	// StartTimeout bounds New's work on the bus.
	StartTimeout time.Duration
	// LocalBackend says the machines are local processes (fm dev): each
	// instance gets its own DSS base port, and images need a kit.
	LocalBackend bool
	// HeartbeatSeconds is the agents' heartbeat interval (default 10); an
	// agent silent for three of them is shown as not responding.
	HeartbeatSeconds int
	// SweepInterval is how often running operations are checked for their
	// deadline and lost requests (default 2s).
	SweepInterval time.Duration
	// RepublishAfter is how long an operation may go without its request or
	// command being taken before the sweep sends it again (default 10s);
	// an operation recorded but never claimed is ended after three times
	// as long. Tests shorten it.
	RepublishAfter time.Duration
	// SnapshotHour is how long an hour of automatedSnapshotPeriod lasts
	// (default an hour); tests shorten it. SchedulerInterval is how often
	// the snapshot scheduler looks (default a minute, at most a tenth of
	// SnapshotHour).
	SnapshotHour      time.Duration
	SchedulerInterval time.Duration
	// RolloutInterval is how often the server that holds the agent
	// rollout's lease moves it on (default 5 s).
	RolloutInterval time.Duration
	// AlertInterval is how often the server that holds the alerts' lease
	// evaluates them (default 15 s). AlertHoldFor, if set, shortens how
	// long a condition must hold before its alert fires (each rule's own,
	// as deploy/prometheus's rules say, by default; tests shorten it).
	// AlertGiveUpAfter is how long the webhook is tried for one
	// notification (default a day).
	AlertInterval    time.Duration
	AlertHoldFor     time.Duration
	AlertGiveUpAfter time.Duration
	// OperationTimeout, if set, replaces every instance operation's own
	// deadline (an hour for a reprovision, 15 minutes for a command).
	OperationTimeout time.Duration
	// SecretKey (32 bytes) seals the secrets FM stores. It is held outside
	// the bus (a file), so a copy of the buckets gives no secret away.
	SecretKey []byte
	// Authority, if set, mints NATS credentials: every new machine gets a
	// join token to exchange at JoinURL for its agent's own credentials,
	// and a machine that goes has its agent's revoked. SystemConn (a
	// connection as the NATS system account) pushes the revocations.
	Authority  *natsauth.Authority
	SystemConn *nats.Conn
	// AgentCredsTTL is how long an agent's NATS credentials last (default
	// a day); agents renew them before. Tests shorten it.
	AgentCredsTTL time.Duration
	// EC2IdentityCerts, if set, are AWS's certificates for instance
	// identity documents (LoadEC2IdentityCerts): a machine the EC2 backend
	// launched joins only with the identity document of the machine
	// launched for its token, which only that machine can read.
	EC2IdentityCerts []*x509.Certificate
	// ConsoleURL is FM's address as people's browsers reach it
	// (https://fm.example.com behind a load balancer that ends TLS): the
	// web console's SSO callback is made from it, and its scheme says
	// whether the session cookie is Secure. Empty: the request's own
	// host, and TLS as this server serves it.
	ConsoleURL string
	// ConsoleKeepAlive is how often an idle console event stream is
	// written to and its session checked again (default 20 s; tests).
	ConsoleKeepAlive time.Duration
	// JoinURL is FM's join endpoint as machines reach it
	// ("https://fm.example.com:10000/api/join"); the default is derived
	// from the listener.
	JoinURL string
	// TLS, if set, makes the REST API (and the join endpoint) HTTPS. CAPEM
	// is the CA certificate agents are given to verify FM (the server's and
	// the bus's).
	TLS   *tls.Config
	CAPEM string
	// AgentBinary is the agent binary (the slim fm-agent build, or fm
	// itself) cloud machines download from
	// DownloadPath (at JoinURL's host) and run as their agent; without
	// one, a cloud backend's machines cannot bootstrap. It is also what
	// upgrade-agent upgrades every machine's agent to (fm dev's local
	// machines too).
	AgentBinary string
	// ACME is where the machines of networks with httpsStrategy
	// LETSENCRYPT obtain their certificates (default Let's Encrypt).
	ACME ACMEConfig
	// Crash is passed every crash point of the server's multi-step work:
	// starting an action, ending it, a join (tests).
	Crash  crashpoint.Hook
	Logger zerolog.Logger
}

// Server is a running FM server. Create it with New, serve with Run, release
// it with Close.
type Server struct {
	cfg      Config
	log      zerolog.Logger
	js       jetstream.JetStream
	commands jetstream.Stream // FM_COMMANDS
	// commandReader answers agents' catch-ups from FM_COMMANDS.
	commandReader *bus.CommandReader
	st            *stores
	auth          *authenticator
	metrics       *metrics
	fold          *folder
	listed        instanceEncodings // the instances' JSON, as lists last wrote it
	ln            net.Listener
	httpSrv       *http.Server
	metricsLn     net.Listener // nil without Config.MetricsAddr
	metricsSrv    *http.Server
	stop          context.CancelFunc // stops the bucket watchers
	box           *seal.Box          // FM's secret key, for what it hands the provisioner sealed
	renewals      agentPacer         // paces agents' renewal requests on the bus
	cmdAfters     agentPacer         // paces agents' catch-ups of their commands
	agentWork     *agentWorkers      // answers agents' requests
	diagChunks    diagBudget         // diagnosis chunks relayed per operation (admitStored)
	diagLookups   agentPacer         // paces admitStored's reads of the buckets per instance
	revokeMu      sync.Mutex         // one revocation recorded and pushed at a time
	replayingTpl  sync.Mutex         // one template-wide replay at a time (TryLock)
	draining      atomic.Bool        // stopping: /healthz says so (Config.DrainTime)
	agent         *agentBinary
	crash         crashpoint.Hook

	// Failed attempts at credentials, each kind counted apart
	// (attemptLimiter), and shared with the other replicas
	// (ratelimitshare.go), who know this one as replica.
	apiByAddr, apiByKey, joinByAddr *attemptLimiter
	// sso verifies the ID tokens of people signed in by SSO (sso.go).
	sso ssoVerifiers
	// sessions are the web console's sign-ins, and live what its pages
	// follow (consolesession.go, consolelive.go).
	sessions    *sessionStore
	live        *liveHub
	crossOrigin *http.CrossOriginProtection // refuses another origin's changes made with a session
	replica     string
	failures    *nats.Subscription // the other replicas' failures
}

// New declares the bus topology, loads the fleet's objects and opens the
// listener. The server does not serve until Run.
func New(cfg Config) (*Server, error) {
	if cfg.Conn == nil {
		return nil, errors.New("server: a NATS connection is required")
	}
	if cfg.ConsoleURL != "" {
		u, err := url.Parse(cfg.ConsoleURL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || strings.Trim(u.Path, "/") != "" || u.RawQuery != "" {
			return nil, fmt.Errorf("server: the console's URL %q: want http(s)://host[:port]", cfg.ConsoleURL)
		}
		if u.Scheme == "http" && cfg.TLS != nil {
			return nil, fmt.Errorf("server: the console's URL %q is http, but this server serves TLS: give its https URL", cfg.ConsoleURL)
		}
		cfg.ConsoleURL = u.Scheme + "://" + u.Host
	}
	box, err := seal.New(cfg.SecretKey)
	if err != nil {
		return nil, fmt.Errorf("server: secret key: %w", err)
	}
	if cfg.Topology.Replicas == 0 {
		cfg.Topology = bus.DefaultTopology()
	}
	if cfg.DefaultInstanceType == "" {
		cfg.DefaultInstanceType = "m5.2xlarge"
	}
	if cfg.StartTimeout == 0 {
		cfg.StartTimeout = 30 * time.Second
	}
	if cfg.HeartbeatSeconds == 0 {
		cfg.HeartbeatSeconds = 10
	}
	if cfg.SweepInterval == 0 {
		cfg.SweepInterval = 2 * time.Second
	}
	if cfg.RepublishAfter == 0 {
		cfg.RepublishAfter = 10 * time.Second
	}
	if cfg.SnapshotHour == 0 {
		cfg.SnapshotHour = time.Hour
	}
	if cfg.SchedulerInterval == 0 {
		cfg.SchedulerInterval = min(time.Minute, cfg.SnapshotHour/10)
	}
	if cfg.RolloutInterval == 0 {
		cfg.RolloutInterval = 5 * time.Second
	}
	if cfg.AlertInterval == 0 {
		cfg.AlertInterval = 15 * time.Second
	}
	if cfg.AlertGiveUpAfter == 0 {
		cfg.AlertGiveUpAfter = 24 * time.Hour
	}
	agentBin, err := openAgentBinary(cfg.AgentBinary)
	if err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	log := cfg.Logger.With().Str("component", "server").Logger()
	if agentBin != nil {
		log.Info().Str("agent_binary", agentBin.path).Str("sha256", agentBin.sha256).Msg("serving the agent binary at " + DownloadPath)
	}
	js, err := jetstream.New(cfg.Conn)
	if err != nil {
		return nil, fmt.Errorf("server: jetstream: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), cfg.StartTimeout)
	defer cancel()
	if err := cfg.Topology.Declare(ctx, js); err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	commands, err := js.Stream(ctx, protocol.StreamCommands)
	if err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	st, err := openStores(ctx, js, box, log)
	if err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	auth, err := newAuthenticator(st.keys, cfg.SecretKey)
	if err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	s := &Server{
		cfg: cfg, log: log, js: js, commands: commands, commandReader: bus.NewCommandReader(commands), st: st, fold: newFolder(), box: box, agent: agentBin, crash: cfg.Crash, auth: auth,
		apiByAddr: newAttemptLimiter(limiterAPIByAddr), apiByKey: newAttemptLimiter(limiterAPIByKey), joinByAddr: newAttemptLimiter(limiterJoinByAddr),
		replica: newID("srv"), live: newLiveHub(cfg.ConsoleKeepAlive), crossOrigin: http.NewCrossOriginProtection(),
		renewals: agentPacer{interval: renewInterval}, cmdAfters: agentPacer{interval: cmdAfterInterval}, diagLookups: agentPacer{interval: time.Second}, agentWork: newAgentWorkers(agentRequestWorkers),
	}
	for _, l := range s.limiters() {
		l.share = s.publishFailure
	}
	if s.metrics, err = newMetrics(s); err != nil {
		return nil, fmt.Errorf("server: metrics: %w", err)
	}
	s.sessions = newSessionStore(st.sessions, cfg.Topology.SessionLifetime)
	// Reports about an instance make it be reconciled, and the console's
	// pages that show it read it again.
	reconcile := func(key string) { s.enqueue(key); s.liveInstance(key) }
	st.machines.onChange, st.agents.onChange, st.lifecycle.onChange = reconcile, reconcile, reconcile
	st.instances.onChange, st.ops.onChange, st.snapshots.onChange = s.liveInstance, s.liveOp, s.liveSnapshot
	st.snapshots.onRemove = func(_ string, old api.Snapshot) { s.live.publish("instance", old.InstanceID) }
	// What only time changes (an agent gone silent, a snapshot overdue)
	// shows as an alert's change.
	st.networks.onChange, st.templates.onChange = s.liveFleet("virtual-networks"), s.liveFleet("instance-settings-templates")
	st.images.onChange, st.alerts.onChange = s.liveFleet("images"), s.liveFleet("alerts")
	watchCtx, stop := context.WithCancel(context.Background())
	s.stop = stop
	st.run(watchCtx)
	go rewatchOnReconnect(watchCtx, cfg.Conn, st)
	if err := st.waitSynced(ctx); err != nil {
		stop()
		return nil, fmt.Errorf("server: %w", err)
	}
	// Before it serves a call: the failures other replicas count from then
	// on count here too.
	if s.failures, err = s.followFailures(); err != nil {
		stop()
		return nil, fmt.Errorf("server: %w", err)
	}
	s.ln = cfg.Listener
	if s.ln == nil {
		if s.ln, err = net.Listen("tcp", cfg.Listen); err != nil {
			stop()
			_ = s.failures.Unsubscribe()
			return nil, fmt.Errorf("server: listen on %s: %w", cfg.Listen, err)
		}
	}
	s.httpSrv = &http.Server{
		Handler:           s.handler(),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       5 * time.Minute, // kit uploads
		WriteTimeout:      5 * time.Minute,
		IdleTimeout:       2 * time.Minute,
		TLSConfig:         cfg.TLS,
		ErrorLog:          stdlog.New(httpErrorLog{log}, "", 0),
	}
	// The console's event streams never end by themselves.
	s.httpSrv.RegisterOnShutdown(s.live.close)
	if cfg.MetricsAddr != "" {
		if s.metricsLn, err = net.Listen("tcp", cfg.MetricsAddr); err != nil {
			stop()
			_ = s.failures.Unsubscribe()
			if cfg.Listener == nil {
				_ = s.ln.Close()
			}
			return nil, fmt.Errorf("server: metrics: listen on %s: %w", cfg.MetricsAddr, err)
		}
		s.metricsSrv = &http.Server{
			Handler:           s.metricsHandler(),
			ReadHeaderTimeout: 10 * time.Second,
			ReadTimeout:       time.Minute,
			WriteTimeout:      time.Minute,
			IdleTimeout:       2 * time.Minute,
			TLSConfig:         cfg.TLS,
			ErrorLog:          stdlog.New(httpErrorLog{log}, "", 0),
		}
	}
	if cfg.JoinURL == "" {
		scheme := "http"
		if cfg.TLS != nil {
			scheme = "https"
		}
		s.cfg.JoinURL = scheme + "://" + s.ln.Addr().String() + JoinPath
	}
	return s, nil
}

// Addr is the address the REST API listens on.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// MetricsAddr is the address of the metrics listener (Config.MetricsAddr),
// nil without one.
func (s *Server) MetricsAddr() net.Addr {
	if s.metricsLn == nil {
		return nil
	}
	return s.metricsLn.Addr()
}

// Run serves the REST API (and the metrics listener) until ctx ends, then
// shuts the listeners down, letting requests in flight finish for a few
// seconds.
func (s *Server) Run(ctx context.Context) error {
	errc := make(chan error, 2)
	serve := func(srv *http.Server, ln net.Listener) {
		if s.cfg.TLS != nil {
			errc <- srv.ServeTLS(ln, "", "")
			return
		}
		errc <- srv.Serve(ln)
	}
	go serve(s.httpSrv, s.ln)
	if s.metricsSrv != nil {
		go serve(s.metricsSrv, s.metricsLn)
		s.log.Info().Str("addr", s.metricsLn.Addr().String()).Msg("serving /metrics")
	}
	// Operations go on while calls drain and finish: the work stops when
	// Run returns, not when ctx ends.
	foldCtx, stopFolding := context.WithCancel(context.WithoutCancel(ctx))
	folded := make(chan struct{})
	go func() { defer close(folded); s.runFolding(foldCtx) }()
	scheduled := make(chan struct{})
	go func() { defer close(scheduled); s.runSnapshotScheduler(foldCtx) }()
	alerted := make(chan struct{})
	go func() {
		defer close(alerted)
		s.runLeased(foldCtx, alertLease, "alerts", s.cfg.AlertInterval, func() tickFunc { return newAlerter(s).tick })
	}()
	rolled := make(chan struct{})
	go func() { defer close(rolled); s.runAgentRollouts(foldCtx) }()
	defer func() { stopFolding(); <-folded; <-scheduled; <-alerted; <-rolled }()
	go s.syncAccount(foldCtx)
	go s.metrics.bus.run(foldCtx)
	// After the subscriptions end (deferred below), the answers under way.
	defer s.agentWork.close()
	cmdAfters, err := s.serveCommandsAfter()
	if err != nil {
		stopFolding()
		return fmt.Errorf("server: agents' command catch-ups: %w", err)
	}
	defer func() { _ = cmdAfters.Unsubscribe() }()
	// What agents store crosses into FM's account through this relay
	// (natsauth/relay.go); on a bus without FM's accounts nothing comes
	// to it.
	relay, err := natsauth.StartRelay(s.cfg.Conn, s.admitStored)
	if err != nil {
		stopFolding()
		return fmt.Errorf("server: the relay of what agents store: %w", err)
	}
	defer relay.Stop()
	if s.cfg.Authority != nil {
		renewals, err := s.serveRenewals()
		if err != nil {
			stopFolding()
			return fmt.Errorf("server: agents' renewals: %w", err)
		}
		defer func() { _ = renewals.Unsubscribe() }()
	}
	s.log.Info().Str("addr", s.ln.Addr().String()).Msg("serving the REST API")
	select {
	case err := <-errc:
		return fmt.Errorf("server: serve: %w", err)
	case <-ctx.Done():
	}
	if s.cfg.DrainTime > 0 {
		s.draining.Store(true)
		s.log.Info().Dur("drain", s.cfg.DrainTime).Msg("stopping: /healthz answers 503 while calls drain")
		select {
		case err := <-errc:
			return fmt.Errorf("server: serve: %w", err)
		case <-time.After(s.cfg.DrainTime):
		}
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if s.metricsSrv != nil {
		_ = s.metricsSrv.Shutdown(shutdownCtx)
	}
	if err := s.httpSrv.Shutdown(shutdownCtx); err != nil {
		s.log.Warn().Err(err).Msg("requests still in flight at shutdown were cut")
		_ = s.httpSrv.Close()
	}
	return nil
}

// Close stops the server's background work and its listeners. It does not
// close the NATS connection, which the caller owns.
func (s *Server) Close() {
	s.stop()
	s.live.close()
	_ = s.failures.Unsubscribe()
	_ = s.httpSrv.Close()
	if s.metricsSrv != nil {
		_ = s.metricsSrv.Close()
	}
}

// handler builds the HTTP handler: routes, then authentication, logging,
// panic recovery and path cleaning around them.
func (s *Server) handler() http.Handler {
	mux := http.NewServeMux()
	t := api.BasePath + "{tenant}"
	route := func(pattern string, m methods) {
		mux.Handle(pattern, routeHandler{s: s, methods: m, tenant: true})
	}
	route(t+"/virtual-networks", methods{"GET": reads(RoleViewer, s.listNetworks), "POST": writes(RoleAdmin, s.createNetwork)})
	route(t+"/virtual-networks/{id}", methods{"GET": reads(RoleViewer, s.getNetwork),
		"PUT": writes(RoleAdmin, s.saveNetwork), "DELETE": writes(RoleAdmin, s.deleteNetwork)})
	route(t+"/instance-settings-templates", methods{"GET": reads(RoleViewer, s.listTemplates), "POST": writes(RoleAdmin, s.createTemplate)})
	route(t+"/instance-settings-templates/{id}", methods{"GET": reads(RoleViewer, s.getTemplate),
		"PUT": writes(RoleAdmin, s.saveTemplate), "DELETE": writes(RoleAdmin, s.deleteTemplate)})
	route(t+"/instance-settings-templates/{id}/actions/"+opReplayActions, methods{"POST": writes(RoleOperator, s.replayTemplate)})
	route(t+"/instances", methods{"GET": reads(RoleViewer, s.listInstances), "POST": writes(RoleOperator, s.createInstance)})
	route(t+"/instances/{id}", methods{"GET": reads(RoleViewer, s.getInstance), "PUT": writes(RoleOperator, s.saveInstance)})
	route(t+"/instances/{id}/status", methods{"GET": reads(RoleViewer, s.instanceStatus)})
	route(t+"/fleet", methods{"GET": reads(RoleViewer, s.getFleet)})
	route(t+"/instances/{id}/logs", methods{"GET": reads(RoleOperator, s.instanceLogs)})
	// Bundles hold whole logs and DSS's settings: operators', audited.
	route(t+"/instances/{id}/diagnoses", methods{"GET": reads(RoleOperator, s.listDiagnoses)})
	route(t+"/instances/{id}/diagnoses/{name}", methods{"GET": writes(RoleOperator, s.getDiagnosis)})
	route(t+"/instances/{id}/admin-api-key", methods{"GET": writes(RoleOperator, s.getAdminAPIKey)})
	route(t+"/instances/{id}/actions/delete", methods{"GET": writes(RoleOperator, s.deleteInstance)})
	route(t+"/instances/{id}/actions/get-initial-password", methods{"GET": writes(RoleOperator, s.getInitialPassword)})
	for _, kind := range []string{opReprovision, opDeprovision, opStart, opStop, opRestartDSS, opReplayActions, opDiagnosis, opUpgradeAgent} {
		route(t+"/instances/{id}/actions/"+kind, methods{"GET": writes(RoleOperator, s.instanceAction(kind))})
	}
	route(t+"/instances/{id}/actions/"+opResetPassword, methods{"GET": writes(RoleOperator, s.instanceAction(opResetPassword)),
		"POST": writes(RoleOperator, s.instanceAction(opResetPassword))})
	route(t+"/instances/{id}/snapshots", methods{"GET": reads(RoleViewer, s.listInstanceSnapshots), "POST": writes(RoleOperator, s.createSnapshot)})
	route(t+"/instances/{id}/snapshots/{snapshotId}", methods{"GET": reads(RoleViewer, s.getSnapshot), "DELETE": writes(RoleOperator, s.deleteSnapshot)})
	route(t+"/instances/{id}/snapshots/{snapshotId}/reprovision", methods{"POST": writes(RoleOperator, s.reprovisionFromSnapshot)})
	route(t+"/images", methods{"GET": reads(RoleViewer, s.listImages), "POST": writes(RoleAdmin, s.createImage)})
	route(t+"/images/{id}", methods{"GET": reads(RoleViewer, s.getImage), "DELETE": writes(RoleAdmin, s.deleteImage)})
	route(t+"/futures", methods{"GET": reads(RoleViewer, s.listFutures)})
	route(t+"/futures/{id}", methods{"GET": reads(RoleViewer, s.getFuture), "DELETE": writes(RoleOperator, s.abortFuture)})
	route(t+"/cloud-tags", methods{"GET": reads(RoleViewer, s.getCloudTags), "PUT": writes(RoleAdmin, s.putCloudTags)})
	// The webhook's URL is its credential: reading it is audited.
	route(t+"/alerting", methods{"GET": writes(RoleAdmin, s.getAlerting), "PUT": writes(RoleAdmin, s.putAlerting)})
	route(t+"/alerts", methods{"GET": reads(RoleViewer, s.listAlerts)})
	route(t+"/cloud-credentials", methods{"GET": reads(RoleViewer, s.getCloudCredentials), "PUT": writes(RoleAdmin, s.putCloudCredentials)})
	route(t+"/api-keys", methods{"GET": reads(RoleAdmin, s.listKeys), "POST": writes(RoleAdmin, s.createKeyHandler)})
	route(t+"/api-keys/{id}", methods{"DELETE": writes(RoleAdmin, s.revokeKey)})
	route(t+"/audit", methods{"GET": reads(RoleAdmin, s.listAudit)})
	route(t+"/agent-upgrade", methods{"GET": reads(RoleViewer, s.getAgentUpgrade), "POST": writes(RoleAdmin, s.startAgentUpgrade),
		"DELETE": writes(RoleAdmin, s.abortAgentUpgrade)})
	route(t+"/nats-credentials", methods{"POST": writes(RoleAdmin, s.natsCredentials)})
	route(t+"/cloud-accounts", methods{"GET": reads(RoleViewer, s.listAccounts), "POST": writes(RoleAdmin, s.createAccount)})
	route(t+"/cloud-accounts/{id}", methods{"GET": reads(RoleViewer, s.getAccount),
		"PUT": writes(RoleAdmin, s.saveAccount), "DELETE": writes(RoleAdmin, s.deleteAccount)})
	route(t+"/load-balancers", methods{"GET": reads(RoleViewer, s.listLBs), "POST": writes(RoleAdmin, s.createLB)})
	route(t+"/load-balancers/{id}", methods{"GET": reads(RoleViewer, s.getLB),
		"PUT": writes(RoleAdmin, s.saveLB), "DELETE": writes(RoleAdmin, s.deleteLB)})
	route(t+"/load-balancers/{id}/physical/status", methods{"GET": reads(RoleViewer, s.lbPhysicalStatus)})
	for name := range lbActions() {
		route(t+"/load-balancers/{id}/actions/"+name, methods{"POST": writes(RoleOperator, s.lbAction(name))})
	}
	// IAM settings hold how people sign in: an admin's to read too.
	for name := range iamSettings {
		route(t+"/iam/"+name, methods{"GET": reads(RoleAdmin, s.getIAM(name)), "PUT": writes(RoleAdmin, s.putIAM(name))})
	}
	mux.Handle("/", routeHandler{s: s, methods: unknownPath()})

	api := s.requireAuth(mux)
	root := http.NewServeMux()
	// "/api" too, or ServeMux would redirect it to "/api/", which cleanPath
	// serves as "/api" again: a loop.
	root.Handle("/api", api)
	root.Handle("/api/", api)
	// An agent joining has no API key: its join token is its credential.
	// join records its own credential events on the audit trail.
	root.Handle(JoinPath, routeHandler{s: s, methods: methods{"POST": reads(RoleViewer, s.join)}})
	root.Handle(RenewPath, routeHandler{s: s, methods: methods{"POST": reads(RoleViewer, s.renewHTTP)}})
	root.HandleFunc(DownloadPath, s.serveAgentBinary)
	// The series name instances: any API key may read them, or anyone if
	// the operator says so (or reads them at Config.MetricsAddr).
	if s.cfg.MetricsPublic {
		root.Handle("/metrics", s.metrics.handler())
	} else {
		root.Handle("/metrics", s.requireAuth(s.metrics.handler()))
	}
	root.Handle("/healthz", routeHandler{s: s, methods: methods{"GET": reads(RoleViewer, s.healthz)}})
	// The web console: its pages and assets (package console), its
	// sign-in and its event stream; everything else it does goes through
	// /api like any client's call.
	pages := console.Handler()
	root.Handle("/{$}", pages)
	root.Handle(console.AssetsPath, pages)
	// (cleanPath serves ".../assets/" as ".../assets": a 404, not the
	// mux's redirect back to ".../assets/".)
	root.Handle(strings.TrimSuffix(console.AssetsPath, "/"), pages)
	root.HandleFunc(SessionPath, s.serveSession)
	root.HandleFunc(LivePath, s.serveLive)
	root.HandleFunc(SSOPath, s.serveSSO)
	root.HandleFunc(SSOStartPath, s.startSSO)
	root.HandleFunc(SSOCallbackPath, s.finishSSO)
	root.Handle("/", routeHandler{s: s, methods: unknownPath()})
	return cleanPath(forwardedFor(s.cfg.TrustedProxies, withCallIDs(s.recoverPanics(s.logRequests(root)))))
}

func unknownPath() methods {
	h := reads(RoleViewer, func(r *http.Request) (any, error) {
		return nil, newAPIError("NotFound", "Not found", "no endpoint at %s", r.URL.Path)
	})
	return methods{"GET": h, "POST": h, "PUT": h, "DELETE": h, "PATCH": h, "HEAD": h}
}

func (s *Server) healthz(r *http.Request) (any, error) {
	if s.draining.Load() {
		return nil, unavailable(nil, "this replica is stopping")
	}
	if st := s.cfg.Conn.Status(); st != nats.CONNECTED {
		return nil, unavailable(nil, "the bus connection is %s", st)
	}
	return map[string]string{"status": "ok"}, nil
}

// httpErrorLog sends net/http's own complaints (TLS handshakes that fail,
// malformed requests) to the server's log.
type httpErrorLog struct{ log zerolog.Logger }

func (w httpErrorLog) Write(p []byte) (int, error) {
	w.log.Warn().Str("source", "http").Msg(strings.TrimSpace(string(p)))
	return len(p), nil
}
