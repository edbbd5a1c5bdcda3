// Package protocol is the vocabulary that FM's roles (server, provisioner,
// agent) share on the NATS bus: the names of streams, key-value buckets and
// object stores, the subjects, the message types, the protocol version and the
// stable error codes.
//
// It imports only the standard library and no other package of the project,
// so that every role, tool and test may import it. Names here are what an
// operator types into the NATS CLI (docs/architecture.md lists them); they are
// part of the protocol and never change meaning.
//
// # Versioning
//
// Every message carries its protocol version in the "v" field. A decoder
// accepts versions 1 through [Version] and rejects anything else with
// [ErrUnsupportedVersion]. Within a version, fields and message types are only
// ever added, never removed or given a new meaning, and decoders ignore
// fields they do not know, so an older role can read a newer message of the
// same version. A change that an older role cannot safely ignore raises
// [Version].
//
// History:
//
//	1 (2026-11): first version. Desired state, commands (with results),
//	  events, heartbeats, agent status, setup action parameters, provision
//	  requests and machine state. Added since: audit records; join specs,
//	  requests and responses; sealed licenses, command params and results
//	  (a role that holds an instance key sets them instead of the clear
//	  fields); the machine spec's agent download and the provision
//	  request's cloud identity (the EC2 backend); snapshot and
//	  delete-snapshot requests, a reprovision's snapshot to take first and
//	  snapshot to restore, snapshot events; grow-volume requests and the
//	  grow-filesystem command; a provision request's deadline and a
//	  desired state's retryUntil (transient failures are retried until
//	  then); a join request's public key and a join response's JWT (a
//	  machine makes its own NATS key, and may join again with it); a
//	  machine state's before (its status when the request under way
//	  began); the event status "retrying"; a join request's signature
//	  (every join request needs it); a provision request's order and a
//	  machine state's order (that of the last request handled). Since then
//	  an event's snapshot id, operation id and command id must be valid ids.
//	  Added since: a join spec's sealed token (the server sends no token in
//	  clear any more); renew requests and responses (agent credentials
//	  expire); an event's kind must be its subject's, and an agent
//	  may publish only the kinds an agent sends. Commands-from requests and
//	  responses (FM makes an agent's command consumer: agents are users of
//	  an account of their own, which cannot make consumers). Sealed values
//	  are bound to their place (the Sealed…Place functions; "fmsealed2:");
//	  values sealed before ("fmsealed1:") still open. Diagnosis bundles
//	  travel on their own stream (DiagSubject). An event is at most
//	  MaxEventBytes encoded (EncodeEvent cuts it to fit); logs come from
//	  LogSources only. A heartbeat's machine facts (whole); an agent's
//	  status keeps only the machine facts that change seldom (the data
//	  volume's size and its use to 1/200 of it, the memory's total), so
//	  that a fleet at rest does not rewrite fm_agents (an older FM reads
//	  the status's figures rounded, and no load, free memory or uptime). A
//	  heartbeat's interval (EverySeconds). Commands-after requests and
//	  responses (with a reset), and every command republished on its
//	  instance's live subject (CommandLiveSubject), replace commands-from
//	  requests (a command consumer FM made for each agent). This is the one
//	  removal within version 1: no release of FM had commands-from
//	  requests, so no agent in use asks them; an agent built before it
//	  and a server after it (or the reverse) do not exchange commands.
//	  Their subject ("fm.cmdfrom.") keeps no other meaning. Attempt
//	  failures between the server's replicas (SubjectAttemptFailures).
//	  The REST call's id (X-Request-Id) on what it causes: a command's, a
//	  provision request's and an audit record's callId. FM's durable
//	  consumers' names (ConsumerEvents, ConsumerProvisioner). The alerts'
//	  bucket (BucketAlerts); the provisioner's lease key (LeaseProvisioner).
//	  The event status "progress" (a server before it appends each as a
//	  step of its own). The cloud accounts' bucket (BucketAccounts); a
//	  cloud identity's external id (CloudAuth.ExternalID). Load
//	  balancers: lb-apply and lb-delete provision requests (on the
//	  subject of the load balancer's id, naming no instance) with their
//	  BalancerSpec, and the
//	  provisioner's BalancerState in BucketBalancers; the server's
//	  settings of them in BucketLBs. An older provisioner refuses these
//	  requests as of an unknown action. A desired state's HTTPS front
//	  (DSSTarget.HTTPS, with the instance's certificate sealed at
//	  SealedCertificatePlace) and the DSS status's HTTPS (DSSStatus.HTTPS):
//	  an older agent ignores the front and serves DSS in plain HTTP, and
//	  reports no HTTPS status, so FM shows an http:// URL for it. A
//	  desired state's AWS key pair for DSS (DSSTarget.AWSCredentials, its
//	  secret sealed at SealedAWSSecretPlace): an older agent ignores it.
//	  A join request's EC2 identity (EC2Identity), sent by an agent whose
//	  configuration names the instance metadata service: a server that
//	  checks it refuses the join of an older agent on EC2. A diagnosis
//	  result's sealed (the bundle travels sealed with the instance key,
//	  at SealedDiagnosisPlace): a server before it would file the sealed
//	  bytes as they are. A machine spec's network internet access mode
//	  and web ports (NetworkSpec.InternetAccess, WebPorts): an older
//	  provisioner ignores them (public addresses as assignPublicIp says,
//	  the web group of SSH, 80, 443 and the base port); an older server
//	  sends neither, and gets that group. The machine details
//	  DetailRuntimeProfile, DetailInstanceProfile and DetailMadeBy: a
//	  machine an older provisioner made keeps its startup profile. A
//	  network's peering with FM's VPC (NetworkSpec.Peering): an older
//	  provisioner makes none. A key pair for DSS kept in AWS Secrets
//	  Manager (AWSCredentials.SecretName, SecretRegion): an older agent
//	  refuses the desired state (no key id or secret). A volume's
//	  throughput (VolumeSpec.ThroughputMiBps): an older provisioner makes
//	  the volume with EBS's default. The web console's sessions' bucket
//	  (BucketSessions): a server before it has no console, and leaves
//	  the bucket alone. The upgrade-agent command (UpgradeAgentParams)
//	  and an agent status's AgentSHA256: an older agent answers the
//	  command as unknown, and reports no digest, so FM takes it for one
//	  to upgrade. Checked parameters for every setup action type (an
//	  older server stored those of eleven types as given; an older agent
//	  reports them unsupported), and the stages each type may run at
//	  (StagesFor). A desired state's tools (DSSTarget.Tools): an older
//	  agent ignores them.
package protocol
