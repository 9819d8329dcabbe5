/**
 * Prometheus metrics on a per-instance Registry (two sidecars in one test process must
 * not share counters, and prom-client's global registry refuses duplicate names).
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

export class SidecarMetrics {
  readonly registry = new Registry();
  readonly queueDepth = new Gauge({ name: 'keyring_queue_depth', help: 'Values waiting in keyring.pending', registers: [this.registry] });
  readonly batchSeconds = new Histogram({
    name: 'keyring_batch_duration_seconds',
    help: 'Time to claim, encrypt and commit one batch',
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers: [this.registry],
  });
  readonly encryptions = new Counter({
    name: 'keyring_encryptions_total',
    help: 'Values encrypted, by encrypt root key version of the data key',
    labelNames: ['root_version'] as const,
    registers: [this.registry],
  });
  readonly errors = new Counter({
    name: 'keyring_errors_total',
    help: 'Failures by kind (batch, row, link, keys)',
    labelNames: ['kind'] as const,
    registers: [this.registry],
  });
  readonly quarantined = new Counter({ name: 'keyring_quarantined_total', help: 'Values moved to keyring.quarantine', registers: [this.registry] });
  readonly listening = new Gauge({ name: 'keyring_listener_connected', help: '1 while LISTEN is verified', registers: [this.registry] });
  readonly reconnects = new Counter({ name: 'keyring_listener_reconnects_total', help: 'LISTEN reconnections', registers: [this.registry] });
  readonly healthy = new Gauge({ name: 'keyring_healthy', help: '1 when /healthz answers 200', registers: [this.registry] });

  constructor(instanceId: string) {
    this.registry.setDefaultLabels({ instance_id: instanceId });
    collectDefaultMetrics({ register: this.registry, prefix: 'keyring_process_' });
  }
}
