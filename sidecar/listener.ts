/**
 * The LISTEN connection (pg-boss style): its own pg.Client, a liveness check that runs
 * `pg_listening_channels()` raced against a timeout, and reconnection with capped,
 * jittered exponential backoff for as long as the process runs (case C10).
 *
 * Default TCP keepalive takes over two hours to notice a half-open link, and a
 * half-open link neither errors nor ends: only a query that must be answered finds it.
 * A check starts every timeoutMs/2 and may take timeoutMs/2, so a dead link is found
 * within timeoutMs (KEYRING_LISTEN_TIMEOUT_MS).
 *
 * Notifications are hints: a payload names a kind of work, never data. Anything that
 * is not a known hint is logged (by length, never content) and ignored. Every promise
 * is awaited or caught here: the listener never crashes the process.
 */
import { EventEmitter } from 'node:events';
import pg from 'pg';
import type { Logger } from '../src/log.js';
import { destroySocket } from '../src/db/pool.js';

export const CHANNEL = 'keyring';
/** Kinds this build acts on; others are ignored with a warning. */
export const HINT_KINDS = ['pending', 'keys', 'job', 'shred'] as const;
export type HintKind = (typeof HINT_KINDS)[number];

export type ParsedHint = { readonly ok: true; readonly kind: HintKind } | { readonly ok: false; readonly problem: string };

/** Parses a notification payload defensively: `{"kind": "<known kind>", ...}` or a problem. */
export function parseHint(payload: string | undefined): ParsedHint {
  if (payload === undefined || payload.trim() === '') return { ok: false, problem: 'empty payload' };
  let v: unknown;
  try {
    v = JSON.parse(payload);
  } catch {
    return { ok: false, problem: 'payload is not JSON' };
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return { ok: false, problem: 'payload is not a JSON object' };
  const kind = (v as { kind?: unknown }).kind;
  if (typeof kind !== 'string') return { ok: false, problem: 'payload has no string "kind"' };
  if (!(HINT_KINDS as readonly string[]).includes(kind)) return { ok: false, problem: 'unknown hint kind' };
  return { ok: true, kind: kind as HintKind };
}

export interface ListenerOptions {
  readonly connectionString: string;
  readonly applicationName: string;
  readonly timeoutMs: number;
  readonly logger: Logger;
  readonly channel?: string;
  /** First reconnect delay and cap (ms); defaults 200 and 10 000. */
  readonly backoffBaseMs?: number;
  readonly backoffCapMs?: number;
}

export interface ListenerEvents {
  hint: [kind: HintKind];
  /** First LISTEN verified. */
  connected: [backendPid: number];
  /** LISTEN verified again after a loss: the queue may hold rows whose hints were missed. */
  reconnected: [backendPid: number];
  /** The link was lost; `halfOpen` when the liveness check timed out rather than failed. */
  disconnected: [info: { halfOpen: boolean; reason: string }];
}

/** Capped exponential backoff with jitter in [delay/2, delay]: sidecars that lost the same server do not reconnect in lockstep. */
export function backoffDelay(attempt: number, baseMs: number, capMs: number): number {
  const d = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.round(d / 2 + (Math.random() * d) / 2);
}

class TimeoutError extends Error {}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new TimeoutError(`${what}: no answer within ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

export class Listener extends EventEmitter<ListenerEvents> {
  readonly #o: Required<Pick<ListenerOptions, 'channel' | 'backoffBaseMs' | 'backoffCapMs'>> & ListenerOptions;
  #client: pg.Client | undefined;
  #listening = false;
  #backendPid: number | undefined;
  #stopped = false;
  #everConnected = false;
  #loop: Promise<void> | undefined;
  #wake: (() => void) | undefined;
  #lost: ((info: { halfOpen: boolean; reason: string }) => void) | undefined;
  #reconnects = 0;

  constructor(opts: ListenerOptions) {
    super();
    this.#o = { channel: CHANNEL, backoffBaseMs: 200, backoffCapMs: 10_000, ...opts };
  }

  get listening(): boolean {
    return this.#listening;
  }

  get backendPid(): number | undefined {
    return this.#backendPid;
  }

  /** The channels the current backend listens on (pg_listening_channels()); [] when disconnected. */
  async channels(): Promise<string[]> {
    const c = this.#client;
    if (!c || !this.#listening) return [];
    const { rows } = await withTimeout(c.query<{ ch: string }>('SELECT pg_listening_channels() AS ch'), this.#o.timeoutMs, 'channels');
    return rows.map((r) => r.ch);
  }

  get reconnects(): number {
    return this.#reconnects;
  }

  /** Starts the connection loop; resolves once LISTEN is first verified (or on stop). */
  start(): Promise<void> {
    const first = new Promise<void>((resolve) => {
      const done = (): void => {
        this.off('connected', done);
        resolve();
      };
      this.on('connected', done);
      this.#stopResolvers.push(done);
    });
    this.#loop ??= this.#run();
    return first;
  }

  #stopResolvers: (() => void)[] = [];

  async stop(): Promise<void> {
    this.#stopped = true;
    for (const r of this.#stopResolvers) r();
    this.#wake?.();
    this.#lost?.({ halfOpen: false, reason: 'stopping' });
    await this.#loop;
  }

  async #run(): Promise<void> {
    let attempt = 0;
    while (!this.#stopped) {
      try {
        const pid = await this.#connect();
        attempt = 0;
        if (this.#everConnected) {
          this.#reconnects++;
          this.#o.logger.info({ backendPid: pid }, 'listener reconnected');
          this.emit('reconnected', pid);
        } else {
          this.#everConnected = true;
          this.emit('connected', pid);
        }
        const info = await this.#watch();
        if (!this.#stopped) {
          this.#o.logger.warn({ reason: info.reason, halfOpen: info.halfOpen }, 'listener lost its connection');
          this.emit('disconnected', info);
        }
      } catch (err) {
        if (!this.#stopped) {
          this.#o.logger.warn({ err: { message: (err as Error).message }, attempt }, 'listener could not connect');
        }
      }
      this.#teardown();
      if (this.#stopped) break;
      await this.#sleep(backoffDelay(attempt++, this.#o.backoffBaseMs, this.#o.backoffCapMs));
    }
    this.#teardown();
  }

  async #connect(): Promise<number> {
    const client = new pg.Client({
      connectionString: this.#o.connectionString,
      application_name: this.#o.applicationName,
      connectionTimeoutMillis: this.#o.timeoutMs,
      keepAlive: true,
    });
    this.#client = client;
    client.on('error', (err) => this.#lost?.({ halfOpen: false, reason: err.message }));
    client.on('end', () => this.#lost?.({ halfOpen: false, reason: 'connection ended' }));
    client.on('notification', (msg) => {
      if (msg.channel === this.#o.channel) this.#onPayload(msg.payload);
    });
    await withTimeout(client.connect(), this.#o.timeoutMs, 'connect');
    await withTimeout(client.query(`LISTEN ${client.escapeIdentifier(this.#o.channel)}`), this.#o.timeoutMs, 'LISTEN');
    const pid = await this.#check(client, this.#o.timeoutMs);
    this.#backendPid = pid;
    this.#listening = true;
    return pid;
  }

  /** Verifies the backend answers and still listens on the channel; returns its pid. */
  async #check(client: pg.Client, ms: number): Promise<number> {
    const { rows } = await withTimeout(
      client.query<{ pid: number; channels: string[] }>(
        'SELECT pg_backend_pid() AS pid, array(SELECT pg_listening_channels())::text[] AS channels',
      ),
      ms,
      'liveness check',
    );
    const row = rows[0];
    if (!row || !row.channels.includes(this.#o.channel)) throw new Error(`backend is not listening on "${this.#o.channel}"`);
    return row.pid;
  }

  /** Resolves when the link is lost: an error or end event, or a failed liveness check. */
  #watch(): Promise<{ halfOpen: boolean; reason: string }> {
    return new Promise((resolve) => {
      let timer: NodeJS.Timeout | undefined;
      let settled = false;
      const finish = (info: { halfOpen: boolean; reason: string }): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this.#lost = undefined;
        this.#listening = false;
        resolve(info);
      };
      this.#lost = finish;
      const half = Math.max(50, Math.floor(this.#o.timeoutMs / 2));
      const tick = (): void => {
        const client = this.#client;
        if (!client || settled) return;
        this.#check(client, half).then(
          () => {
            if (!settled) timer = setTimeout(tick, half);
          },
          (err: Error) => finish({ halfOpen: err instanceof TimeoutError, reason: err.message }),
        );
      };
      timer = setTimeout(tick, half);
    });
  }

  #teardown(): void {
    this.#listening = false;
    this.#backendPid = undefined;
    const c = this.#client;
    this.#client = undefined;
    if (!c) return;
    c.removeAllListeners('notification');
    c.removeAllListeners('end');
    c.removeAllListeners('error');
    c.on('error', () => undefined);
    // end() would wait for a Terminate message that a half-open link never delivers.
    destroySocket(c);
    c.end().catch(() => undefined);
  }

  #onPayload(payload: string | undefined): void {
    const hint = parseHint(payload);
    if (hint.ok) {
      this.emit('hint', hint.kind);
      return;
    }
    // The length only: a payload is never logged, whatever it holds.
    this.#o.logger.warn({ problem: hint.problem, bytes: Buffer.byteLength(payload ?? '') }, 'ignored a notification that is not a keyring hint');
  }

  #sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.#wake = undefined;
        resolve();
      }, ms);
      this.#wake = () => {
        clearTimeout(t);
        this.#wake = undefined;
        resolve();
      };
    });
  }
}
