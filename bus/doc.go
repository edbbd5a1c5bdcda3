// Package bus is FM's access to NATS JetStream: it connects to the bus (an
// embedded nats-server, bus/embedded, or an existing NATS), and declares the
// JetStream topology (every stream, key-value bucket and object store of
// docs/architecture.md) in one place, creating or updating it idempotently.
// Its Lease elects one holder of a job among processes.
//
// Roles (server, provisioner, agent) and commands import it; it imports only
// protocol from this project, and not nats-server, so that the agent does
// not link the server. bus/bustest starts a real JetStream server for tests.
package bus
