/**
 * /healthz and /metrics. /healthz answers 200 only while the sidecar is ready (LISTEN
 * verified and keys verified), else 503 with the reason, so an orchestrator never
 * routes work to, or keeps alive silently, a sidecar that cannot encrypt.
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { SidecarMetrics } from './metrics.js';

export interface HealthState {
  readonly ok: boolean;
  readonly reason?: string;
  readonly detail: Record<string, unknown>;
}

export class HealthServer {
  readonly #server: Server;

  private constructor(server: Server) {
    this.#server = server;
  }

  static async start(port: number, state: () => HealthState, metrics: SidecarMetrics): Promise<HealthServer> {
    const server = createServer((req, res) => {
      const path = (req.url ?? '/').split('?')[0];
      if (path === '/healthz') {
        const s = state();
        const body = JSON.stringify({ status: s.ok ? 'ok' : 'unavailable', ...(s.reason ? { reason: s.reason } : {}), ...s.detail });
        res.writeHead(s.ok ? 200 : 503, { 'content-type': 'application/json' }).end(body);
        return;
      }
      if (path === '/metrics') {
        metrics.registry.metrics().then(
          (text) => res.writeHead(200, { 'content-type': metrics.registry.contentType }).end(text),
          () => res.writeHead(500).end(),
        );
        return;
      }
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found\n');
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, () => {
        server.off('error', reject);
        resolve();
      });
    });
    return new HealthServer(server);
  }

  get port(): number {
    return (this.#server.address() as AddressInfo).port;
  }

  close(): Promise<void> {
    this.#server.closeAllConnections();
    return new Promise((resolve) => this.#server.close(() => resolve()));
  }
}
