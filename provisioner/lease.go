package provisioner

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/fleetmanager/fm/bus"
	"github.com/fleetmanager/fm/protocol"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// runOnce holds the lease and consumes while it can. Everything it starts
// (the workers, the machine checks) has stopped when it returns, and only
// then is the lease given up: a standby never acts beside a worker still
// unwinding. At every taking of the lease, the requests a previous holder
// had taken are handed out again at once (see takeOver).
func (p *Provisioner) runOnce(ctx context.Context) error {
	// A bus a newer FM laid out is not this provisioner's to work on.
	if err := bus.CheckLayout(ctx, p.js); err != nil {
		return err
	}
	leases, err := p.js.KeyValue(ctx, protocol.BucketLeases)
	if err != nil {
		return fmt.Errorf("lease bucket: %w", err)
	}
	if p.machines, err = p.js.KeyValue(ctx, protocol.BucketMachines); err != nil {
		return fmt.Errorf("machines bucket: %w", err)
	}
	if p.balancers, err = p.js.KeyValue(ctx, protocol.BucketBalancers); err != nil {
		return fmt.Errorf("load balancers bucket: %w", err)
	}
	l := &bus.Lease{KV: leases, Key: protocol.LeaseProvisioner, Holder: p.cfg.Holder, TTL: p.cfg.LeaseTTL}
	p.lease.Store(l)
	return l.Run(ctx, func(held context.Context) error {
		p.log.Info().Str("holder", p.cfg.Holder).Msg("holding the provisioner lease")
		p.metrics.lease.Set(1)
		defer p.metrics.lease.Set(0)
		// The work outlives ctx a little: consuming stops first, then the
		// workers hand back what they hold. It ends at once when the lease
		// can no longer be proven (held ends).
		work, stopWork := context.WithCancel(held)
		defer func() {
			stopWork()
			p.wg.Wait()
			if b, ok := p.cfg.Backend.(GivingUp); ok {
				b.GiveUp() // once no worker serves anything new
			}
		}()
		if b, ok := p.cfg.Backend.(TakingOver); ok {
			// At every taking of the lease, not only the first: a holder
			// between two of ours may have died in the middle of a step.
			b.TakeOver(work)
		}
		// At every taking too: the previous holder may be another process
		// that died (or stopped, and gave the lease up on its own clock),
		// or this one, whose hand-backs may not have reached a bus it had
		// lost.
		if err := p.takeOver(work); err != nil {
			return err
		}
		cons, err := p.js.CreateOrUpdateConsumer(work, protocol.StreamProvision, p.consumerConfig())
		if err != nil {
			return fmt.Errorf("provision consumer: %w", err)
		}
		pulling, stopPulling := context.WithCancel(ctx)
		defer stopPulling()
		p.wg.Add(2)
		go func() { defer p.wg.Done(); p.watchMachines(work) }()
		pulled := make(chan struct{})
		go func() { defer p.wg.Done(); defer close(pulled); p.pull(pulling, work, cons) }()
		select {
		case <-ctx.Done():
		case <-work.Done(): // the lease is lost: the work under way was stopped
		}
		stopPulling()
		<-pulled
		return nil
	})
}

// deposed hands m back, saying so, if this provisioner can no longer prove
// its lease (leaseHeld): only the holder acknowledges, reports or carries out
// a request. It is handed back with a delay, so that a process whose lease
// keeper has not stopped its work yet does not spin on it; whoever takes
// the lease next has it at once (takeOver).
func (p *Provisioner) deposed(m jetstream.Msg, log zerolog.Logger) bool {
	if p.leaseHeld() {
		return false
	}
	// The subject is added here, not by callers: building a logger for
	// every request dispatched would cost on the path of each one.
	log.Warn().Str("subject", m.Subject()).Msg("the lease is lost or can no longer be proven; request handed back")
	_ = m.NakWithDelay(time.Second)
	return true
}

// leaseHeld says whether this provisioner can prove its lease at the moment
// it asks (bus.Lease.Held): a worker asks right before it changes a machine,
// so that a provisioner resumed after being stopped for longer than the
// lease never acts beside the one that took over, even before its lease
// keeper has run to stop it. What is left is the moment between the
// question and the act.
func (p *Provisioner) leaseHeld() bool {
	if p.held != nil {
		return p.held()
	}
	l := p.lease.Load()
	return l != nil && l.Held()
}

// takeOver hands out again at once the requests the previous holder of the
// lease had taken (they would otherwise wait for the ack wait): that holder
// died, or can no longer prove the lease (a holder that cannot renew gives
// it up on its own clock, and one frozen and resumed asks before it acts:
// deposed). FM_PROVISION is a work queue: a request leaves it only when it
// is acknowledged, so replacing the consumer loses none, it only forgets who
// held what, and the waits of those being retried.
func (p *Provisioner) takeOver(ctx context.Context) error {
	cons, err := p.js.Consumer(ctx, protocol.StreamProvision, ConsumerName)
	if errors.Is(err, jetstream.ErrConsumerNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("provision consumer: %w", err)
	}
	info, err := cons.Info(ctx)
	if err != nil {
		return fmt.Errorf("provision consumer: %w", err)
	}
	if info.NumAckPending == 0 {
		return nil
	}
	if err := p.js.DeleteConsumer(ctx, protocol.StreamProvision, ConsumerName); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
		return fmt.Errorf("provision consumer: %w", err)
	}
	p.log.Info().Int("requests", info.NumAckPending).Msg("requests taken by a previous provisioner are handed out again")
	return nil
}
