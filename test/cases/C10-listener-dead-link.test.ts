/**
 * C10 — The LISTEN connection dies silently, or reconnection gives up.
 *
 * The sidecar reaches Postgres through a TCP proxy written here, which can
 *   - stop forwarding without sending RST or FIN (a half-open link: only a query that
 *     must be answered notices), then resume;
 *   - close its server-side legs and turn new connections away at the server side;
 *   - close its listening socket (connection refused) and drop every connection.
 * Scenario 2 (restart Postgres, 60 s down) cannot be done on a shared server: it is
 * simulated with the third mode, for 5 s. The sidecar's reconnect loop has no attempt
 * limit; the test shows it keeps retrying across the outage, with capped backoff.
 *
 * Rows are inserted directly (not through the proxy) during and after each fault; the
 * poll interval is one minute, so only the post-reconnect catch-up and LISTEN can
 * explain their prompt processing.
 */
import net from 'node:net';
import { Writable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createLogger } from '../../src/log.js';
import type { Sidecar } from '../../sidecar/sidecar.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { activateKeys, getHealth, newKeys, pendingCount, startSidecar, waitFor, type TestKeys } from '../helpers/sidecar.js';

interface Pair {
  readonly down: net.Socket;
  up: net.Socket | undefined;
  readonly toUp: Buffer[];
  readonly toDown: Buffer[];
}

/** A loopback TCP proxy with fault modes (see the file comment). */
class FaultyProxy {
  readonly #target: { host: string; port: number };
  #server: net.Server | undefined;
  #port = 0;
  readonly #pairs = new Set<Pair>();
  #blackhole = false;
  #serverDown = false;

  constructor(target: { host: string; port: number }) {
    this.#target = target;
  }

  get port(): number {
    return this.#port;
  }

  async listen(port = 0): Promise<void> {
    const server = net.createServer((down) => this.#accept(down));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, '127.0.0.1', () => resolve());
    });
    this.#server = server;
    this.#port = (server.address() as net.AddressInfo).port;
  }

  #accept(down: net.Socket): void {
    down.on('error', () => undefined);
    if (this.#serverDown) {
      down.destroy();
      return;
    }
    const pair: Pair = { down, up: undefined, toUp: [], toDown: [] };
    this.#pairs.add(pair);
    const connectUp = (): void => {
      const up = net.connect(this.#target.port, this.#target.host);
      pair.up = up;
      up.on('error', () => undefined);
      up.on('data', (d: Buffer) => (this.#blackhole ? pair.toDown.push(d) : down.write(d)));
      up.on('close', () => { this.#pairs.delete(pair); down.destroy(); });
      for (const d of pair.toUp.splice(0)) up.write(d);
    };
    down.on('data', (d: Buffer) => (this.#blackhole || !pair.up ? pair.toUp.push(d) : pair.up.write(d)));
    down.on('close', () => { this.#pairs.delete(pair); pair.up?.destroy(); });
    if (!this.#blackhole) connectUp();
    else (pair as Pair & { connectUp?: () => void }).connectUp = connectUp;
  }

  /** Stop forwarding in both directions; nothing is closed, nothing is answered. */
  blackhole(): void {
    this.#blackhole = true;
  }

  resume(): void {
    this.#blackhole = false;
    for (const p of this.#pairs) {
      const pending = (p as Pair & { connectUp?: () => void }).connectUp;
      if (!p.up && pending) pending();
      for (const d of p.toUp.splice(0)) p.up?.write(d);
      for (const d of p.toDown.splice(0)) p.down.write(d);
    }
  }

  /** Server-side legs close; new connections are turned away until restored. */
  serverSideDown(down: boolean): void {
    this.#serverDown = down;
    if (down) for (const p of this.#pairs) p.up?.destroy();
  }

  /** Stop listening (connection refused) and drop every connection: a stopped server. */
  async stopListening(): Promise<void> {
    const s = this.#server;
    this.#server = undefined;
    for (const p of this.#pairs) { p.down.destroy(); p.up?.destroy(); }
    if (s) await new Promise<void>((r) => s.close(() => r()));
  }

  async close(): Promise<void> {
    await this.stopListening();
  }
}

let db: TestDb;
let keys: TestKeys;
let proxy: FaultyProxy;
let sidecar: Sidecar;
const logs: Record<string, unknown>[] = [];
const unhandled: unknown[] = [];
const onUnhandled = (e: unknown): void => { unhandled.push(e); };
let next = 1;

async function insertRows(n: number): Promise<void> {
  await db.pool.query(`INSERT INTO events_staging (id, payload) SELECT i, 'event-' || i FROM generate_series($1::int, $2::int) AS i`, [next, next + n - 1]);
  next += n;
}

async function expectHealth(status: number, timeoutMs: number): Promise<number> {
  const t0 = Date.now();
  await waitFor(async () => (await getHealth(sidecar.healthPort)).status === status, { timeoutMs, intervalMs: 100, what: `/healthz ${status}` });
  return Date.now() - t0;
}

async function expectDrained(timeoutMs: number): Promise<void> {
  await waitFor(async () => (await pendingCount(db.pool)) === 0, { timeoutMs, intervalMs: 100, what: 'every row encrypted' });
  const { rows } = await db.pool.query(`SELECT count(*)::int AS n FROM events WHERE get_byte(payload, 0) <> 1`);
  expect(rows[0].n).toBe(0);
}

beforeAll(async () => {
  process.on('unhandledRejection', onUnhandled);
  db = await createTestDb();
  keys = newKeys();
  await activateKeys(db.pool, keys);
  await db.pool.query('CREATE TABLE events (id int PRIMARY KEY, payload text)');
  await db.pool.query(`SELECT keyring.protect('public.events', 'payload')`);
  const target = new URL(db.url);
  proxy = new FaultyProxy({ host: target.hostname, port: Number(target.port || 5432) });
  await proxy.listen();
  const viaProxy = new URL(db.url);
  viaProxy.hostname = '127.0.0.1';
  viaProxy.port = String(proxy.port);
  const sink = new Writable({ write(chunk, _e, cb) { for (const l of String(chunk).split('\n')) if (l) logs.push(JSON.parse(l)); cb(); } });
  sidecar = await startSidecar(viaProxy.toString(), keys,
    { KEYRING_POLL_INTERVAL_MS: '60000', KEYRING_LISTEN_TIMEOUT_MS: '1500' },
    createLogger({ level: 'debug', destination: sink }));
});
afterAll(async () => {
  await sidecar?.stop();
  await proxy?.close();
  await db?.drop();
  process.off('unhandledRejection', onUnhandled);
});

describe('C10 listener dead link', () => {
  it('scenario 1: pg_terminate_backend on the LISTEN backend: reconnects, LISTENs again, processes rows', async () => {
    const old = sidecar.listener.backendPid!;
    await insertRows(3);
    await expectDrained(5_000);
    await db.pool.query('SELECT pg_terminate_backend($1)', [old]);
    await insertRows(3); // during the fault
    const fresh = await waitFor(() => sidecar.listener.listening && sidecar.listener.backendPid !== old && sidecar.listener.backendPid,
      { timeoutMs: 10_000, what: 'a new LISTEN backend' });
    expect(await sidecar.listener.channels()).toEqual(['keyring']);
    expect(fresh).not.toBe(old);
    await insertRows(3); // after
    await expectDrained(5_000);
  });

  it('scenario 2 (simulated restart): connection refused for 5 s, then back: unhealthy meanwhile, retries throughout, catches up', async () => {
    const failuresBefore = logs.filter((l) => l.msg === 'listener could not connect').length;
    await proxy.stopListening();
    await expectHealth(503, 5_000);
    await insertRows(5); // during the outage
    await new Promise((r) => setTimeout(r, 5_000));
    expect((await getHealth(sidecar.healthPort)).body.reason).toMatch(/LISTEN connection is down/);
    const failures = logs.filter((l) => l.msg === 'listener could not connect').length - failuresBefore;
    expect(failures).toBeGreaterThanOrEqual(3); // still trying after several failures
    await proxy.listen(proxy.port);
    await expectHealth(200, 15_000);
    expect(await sidecar.listener.channels()).toEqual(['keyring']);
    await insertRows(5); // after
    await expectDrained(10_000);
  });

  it('scenario 3: half-open link (no RST, no FIN) is detected within KEYRING_LISTEN_TIMEOUT_MS; recovers after resume', async () => {
    await expectHealth(200, 5_000);
    const old = sidecar.listener.backendPid;
    proxy.blackhole();
    const detectedIn = await expectHealth(503, 5_000);
    // 1500 ms bound plus one health poll interval and scheduling slack.
    expect(detectedIn).toBeLessThan(2_500);
    expect(logs.some((l) => l.msg === 'listener lost its connection' && l.halfOpen === true)).toBe(true);
    await insertRows(5); // during
    await new Promise((r) => setTimeout(r, 4_000));
    proxy.resume();
    await expectHealth(200, 15_000);
    expect(sidecar.listener.backendPid).not.toBe(old);
    expect(await sidecar.listener.channels()).toEqual(['keyring']);
    await insertRows(5); // after
    await expectDrained(10_000);
  });

  it('scenario 4: the proxy server-side leg stops entirely: unhealthy, then recovers when it is back', async () => {
    await expectHealth(200, 5_000);
    proxy.serverSideDown(true);
    await expectHealth(503, 5_000);
    await insertRows(5);
    await new Promise((r) => setTimeout(r, 3_000));
    proxy.serverSideDown(false);
    await expectHealth(200, 15_000);
    await insertRows(5);
    await expectDrained(10_000);
  });

  it('no unhandled promise rejection and no crash across all scenarios', () => {
    expect(unhandled).toEqual([]);
    expect(sidecar.listener.reconnects).toBeGreaterThanOrEqual(4);
  });
});
