/**
 * The sidecar's connections. Every query runs on a client checked out through `with`,
 * which tracks it, so that when the listener finds the link dead (a half-open TCP
 * connection answers nothing and would hang a query forever) `reset` can destroy
 * every socket at once and start a fresh pool: in-flight work fails fast with a
 * connection error, and idle sockets that went dead are never handed out again.
 */
import pg from 'pg';
import type { Logger } from '../log.js';

export interface DbOptions {
  readonly connectionString: string;
  readonly applicationName: string;
  readonly max?: number;
  /** Bound on opening a connection (a black-holed link would otherwise hang connect()). */
  readonly connectTimeoutMs: number;
  readonly logger: Logger;
}

type Internal = pg.Pool & { _clients?: pg.PoolClient[] };

/** Destroys a client's socket at once (no Terminate message, no FIN wait). */
export function destroySocket(client: pg.ClientBase): void {
  // `connection.stream` is node-postgres' socket; destroy() sends no FIN and waits for nothing.
  (client as unknown as { connection?: { stream?: { destroy(): void } } }).connection?.stream?.destroy();
}

export class Db {
  #pool: pg.Pool;
  readonly #opts: DbOptions;
  #closed = false;

  constructor(opts: DbOptions) {
    this.#opts = opts;
    this.#pool = this.#create();
  }

  #create(): pg.Pool {
    const pool = new pg.Pool({
      connectionString: this.#opts.connectionString,
      application_name: this.#opts.applicationName,
      max: this.#opts.max ?? 4,
      connectionTimeoutMillis: this.#opts.connectTimeoutMs,
      idleTimeoutMillis: 30_000,
      keepAlive: true,
      // The session settings of the staging triggers (docs/write-path.md), so that a
      // row key cast back to its primary key type means the same value here. Hash and
      // merge joins off: every sidecar join is a batch of keys against a primary key
      // (base rows by row key, data keys by scope), where a nested loop over the index is
      // right; on stale statistics the planner hash-joined whole tables (one sequential
      // scan of the base table per batch, growing with the table).
      options: '-c TimeZone=UTC -c DateStyle=ISO,YMD -c IntervalStyle=postgres -c enable_hashjoin=off -c enable_mergejoin=off',
    });
    // An idle client whose socket fails emits here; without a listener the process dies.
    pool.on('error', (err) => this.#opts.logger.warn({ err: { message: err.message } }, 'idle database connection failed'));
    return pool;
  }

  get pool(): pg.Pool {
    return this.#pool;
  }

  /** Runs `fn` on a checked-out client; a client whose work failed on the link is discarded. */
  async with<T>(fn: (client: pg.PoolClient) => Promise<T>): Promise<T> {
    const client = await this.#pool.connect();
    let broken: Error | undefined;
    // node-postgres emits 'error' on a checked-out client whose socket dies between
    // queries (pg-pool listens only on idle ones): unheard, that event kills the process.
    const onError = (err: Error): void => {
      broken = err;
    };
    client.on('error', onError);
    try {
      return await fn(client);
    } catch (err) {
      // An error mid-transaction may leave the session in an unknown state: discard it
      // rather than hand it back to the pool.
      broken = err instanceof Error ? err : new Error(String(err));
      throw err;
    } finally {
      client.off('error', onError);
      client.release(broken);
    }
  }

  query<R extends pg.QueryResultRow = pg.QueryResultRow>(text: string, values?: unknown[]): Promise<pg.QueryResult<R>> {
    return this.#pool.query<R>(text, values);
  }

  /** Destroys every socket of the current pool and starts a fresh one (see file comment). */
  reset(): void {
    if (this.#closed) return;
    const old = this.#pool as Internal;
    this.#pool = this.#create();
    for (const c of old._clients ?? []) {
      c.on('error', () => undefined);
      destroySocket(c);
    }
    old.end().catch(() => undefined);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#pool.end();
  }
}

