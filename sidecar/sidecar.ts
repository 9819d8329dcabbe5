/**
 * The sidecar process: holds the root keys and does the write path's cryptography.
 *
 * Start order: connect → refuse an unknown schema → resolve keys (refuse missing or
 * mismatched material, case C01) → heartbeat → health server → LISTEN → initial drain
 * (rows queued while no sidecar ran) → loop. Stop: stop claiming, let the batch in
 * hand finish within the shutdown timeout (else its connection is destroyed and the
 * server rolls it back), mark stopped, close.
 */
import { hostname } from 'node:os';
import { IvPool } from '../src/crypto/index.js';
import type { Config } from '../src/config.js';
import { SchemaVersionError, describeError } from '../src/db/errors.js';
import { appliedSchemaVersion, knownSchemaVersion } from '../src/db/migrate.js';
import { Db } from '../src/db/pool.js';
import { auditAppend } from '../src/db/queries/audit-append.js';
import { compactValueCounts } from '../src/db/queries/compact-value-counts.js';
import { queueDepth } from '../src/db/queries/queue-depth.js';
import { heartbeat, markStopped } from '../src/db/queries/sidecar-heartbeat.js';
import { DataKeyCache, DEFAULT_MAX_ENCRYPTIONS } from '../src/keys/data-keys.js';
import { KeyMissingError, KeyUnavailableError } from '../src/keys/errors.js';
import { IndexKeyCache } from '../src/keys/index-keys.js';
import type { RootKeyMaterial } from '../src/keys/material.js';
import { dropDestroyed, resolveRootKeys, type RootKeyStore } from '../src/keys/root-keys.js';
import { createLogger, type Logger } from '../src/log.js';
import { processBatch, type BatchResult } from './claim.js';
import { unwrapFailureReporter } from './decrypt-audit.js';
import { HealthServer, type HealthState } from './health.js';
import { backfillHandler } from './jobs/backfill.js';
import { reencryptHandler } from './jobs/reencrypt.js';
import { reindexHandler } from './jobs/reindex.js';
import { rewrapHandler } from './jobs/rewrap.js';
import { JobRunner } from './jobs/runner.js';
import { Listener } from './listener.js';
import { SidecarMetrics } from './metrics.js';
import { Worker, type Progress } from './worker.js';

/** Heartbeat period; keyring.settings heartbeat_fresh_seconds (30) allows several misses. */
export const HEARTBEAT_MS = 5_000;

export interface SidecarOptions {
  readonly logger?: Logger;
  /** Called after every batch (rows done, estimated queue depth): the demo's progress bar. */
  readonly onProgress?: (p: Progress) => void;
}

export class Sidecar {
  readonly #config: Config;
  readonly #log: Logger;
  readonly #db: Db;
  readonly #metrics: SidecarMetrics;
  #keys: RootKeyStore;
  /** The configured root keys minus destroyed versions (zeroed and dropped when the registry says so). */
  #material: RootKeyMaterial;
  #keysProblem: string | undefined;
  /** The last registry reload queued (#reloadKeys runs them one after another). */
  #reloads: Promise<void> = Promise.resolve();
  #maxEncryptions: bigint;
  readonly #dataKeys: DataKeyCache;
  readonly #indexKeys: IndexKeyCache;
  readonly #listener: Listener;
  readonly #worker: Worker;
  readonly #jobs: JobRunner;
  #health: HealthServer | undefined;
  #heartbeatTimer: NodeJS.Timeout | undefined;
  #stopping: Promise<void> | undefined;
  /** A subject was shredded: zero the cached data keys before the next batch (never under one in flight). */
  #dropDataKeys = false;

  private constructor(config: Config, log: Logger, db: Db, keys: RootKeyStore, maxEncryptions: bigint, opts: SidecarOptions) {
    this.#config = config;
    this.#log = log;
    this.#db = db;
    this.#keys = keys;
    this.#material = config.keys;
    this.#dropDestroyed(keys);
    this.#maxEncryptions = maxEncryptions;
    this.#metrics = new SidecarMetrics(config.instanceId);
    const ivPool = new IvPool();
    this.#dataKeys = new DataKeyCache({
      capacity: config.dataKeyCacheSize,
      rootKeys: () => this.#keys,
      autocommit: (fn) => this.#db.with(fn),
      ivPool,
      maxEncryptions: () => this.#maxEncryptions,
      onUnwrapFailure: unwrapFailureReporter(() => db, config.instanceId, log),
    });
    this.#indexKeys = new IndexKeyCache(config.dataKeyCacheSize, () => this.#keys);
    this.#listener = new Listener({
      connectionString: config.databaseUrl,
      applicationName: `keyring sidecar listen ${config.instanceId}`.slice(0, 63),
      timeoutMs: config.listenTimeoutMs,
      logger: log,
    });
    const ctx = {
      db, dataKeys: this.#dataKeys, indexKeys: this.#indexKeys, ivPool, instanceId: config.instanceId,
      logger: log, metrics: this.#metrics, testDelayMs: config.testBatchDelayMs, batchBytes: config.batchBytes,
    };
    this.#worker = new Worker({
      batchSize: config.batchSize,
      concurrency: config.concurrency,
      pollIntervalMs: config.pollIntervalMs,
      logger: log,
      metrics: this.#metrics,
      processBatch: (limit, afterId) => this.#guardedBatch(() => processBatch(ctx, limit, afterId)),
      queueDepth: () => queueDepth(this.#db.pool),
    });
    if (opts.onProgress) this.#worker.on('progress', opts.onProgress);
    this.#jobs = new JobRunner({
      db, pollIntervalMs: config.pollIntervalMs, instanceId: config.instanceId, logger: log, metrics: this.#metrics,
      paused: () => this.#keysProblem,
      handlers: [rewrapHandler({
        rootKeys: () => this.#keys, ivPool, instanceId: config.instanceId, logger: log, testDelayMs: config.testBatchDelayMs,
      }), reencryptHandler({
        db, dataKeys: this.#dataKeys, rootKeys: () => this.#keys, ivPool, instanceId: config.instanceId, logger: log,
        metrics: this.#metrics, testDelayMs: config.testBatchDelayMs,
      }), backfillHandler({
        db, instanceId: config.instanceId, logger: log, metrics: this.#metrics, testDelayMs: config.testBatchDelayMs,
      }), reindexHandler({
        db, dataKeys: this.#dataKeys, indexKeys: this.#indexKeys, rootKeys: () => this.#keys, instanceId: config.instanceId,
        logger: log, metrics: this.#metrics, testDelayMs: config.testBatchDelayMs,
      })],
    });
  }

  /** Starts a sidecar; rejects (and releases everything) when the start is refused. */
  static async start(config: Config, opts: SidecarOptions = {}): Promise<Sidecar> {
    const log = opts.logger ?? createLogger({ level: config.logLevel, bindings: { instance: config.instanceId } });
    const db = new Db({
      connectionString: config.databaseUrl,
      applicationName: `keyring sidecar ${config.instanceId}`.slice(0, 63),
      connectTimeoutMs: config.listenTimeoutMs,
      // Per lane: its batch and a data key creation (autocommit); plus the job runner,
      // the heartbeat and a queue count, so that no lane ever waits for a connection.
      max: 2 * config.concurrency + 3,
      logger: log,
    });
    try {
      const { keys, max } = await db.with(async (c) => {
        await checkSchema(c);
        const keys = await resolveRootKeys(c, config.keys, { register: true });
        return { keys, max: await maxEncryptions(c) };
      });
      const s = new Sidecar(config, log, db, keys, max, opts);
      try {
        await s.#begin();
      } catch (err) {
        await s.stop().catch(() => undefined); // timers, listener, health server
        throw err;
      }
      return s;
    } catch (err) {
      await db.close().catch(() => undefined);
      throw err;
    }
  }

  async #begin(): Promise<void> {
    await this.#beat(true);
    await this.#db.with((c) => auditAppend(c, {
      action: 'sidecar.started', actor: this.#config.instanceId,
      detail: { fingerprints: this.#keys.fingerprints, host: hostname(), pid: process.pid },
    }));
    this.#heartbeatTimer = setInterval(() => void this.#tick(), HEARTBEAT_MS);
    this.#heartbeatTimer.unref();
    this.#health = await HealthServer.start(this.#config.healthPort, () => this.#state(), this.#metrics);

    this.#listener.on('hint', (kind) => {
      if (kind === 'pending') this.#worker.hint();
      else if (kind === 'shred') {
        this.#dropDataKeys = true;
        this.#worker.hint();
      }
      else if (kind === 'job') this.#jobs.hint();
      else if (kind === 'keys') {
        this.#reloadKeys().catch((err: unknown) => this.#log.warn({ err: { message: describeError(err) } }, 'key registry reload failed; retried at the next heartbeat'));
      }
    });
    this.#listener.on('reconnected', () => {
      this.#metrics.reconnects.inc();
      this.#metrics.listening.set(1);
      this.#worker.kick(); // hints sent while disconnected were lost: catch up
      this.#jobs.kick();
    });
    this.#listener.on('disconnected', ({ halfOpen }) => {
      this.#metrics.listening.set(0);
      // A half-open link hangs every socket on it: fail in-flight work now, reconnect fresh.
      if (halfOpen) this.#db.reset();
    });
    await this.#listener.start();
    this.#metrics.listening.set(this.#listener.listening ? 1 : 0);
    this.#worker.start();
    this.#jobs.start();
    this.#log.info({ healthPort: this.healthPort, fingerprints: this.#keys.fingerprints, activeEncrypt: this.#keys.activeVersion('encrypt'), activeIndex: this.#keys.activeVersion('index') }, 'sidecar ready');
  }

  get instanceId(): string {
    return this.#config.instanceId;
  }

  get healthPort(): number {
    return this.#health?.port ?? 0;
  }

  get healthy(): boolean {
    return this.#state().ok;
  }

  get metrics(): SidecarMetrics {
    return this.#metrics;
  }

  get listener(): Listener {
    return this.#listener;
  }

  get rootKeys(): RootKeyStore {
    return this.#keys;
  }

  /** Processes queued values until the queue is empty; returns the number encrypted. */
  drain(): Promise<number> {
    return this.#worker.drain();
  }

  onProgress(fn: (p: Progress) => void): void {
    this.#worker.on('progress', fn);
  }

  stop(): Promise<void> {
    this.#stopping ??= this.#stop();
    return this.#stopping;
  }

  async #stop(): Promise<void> {
    this.#log.info('sidecar stopping');
    clearInterval(this.#heartbeatTimer);
    const stopped = Promise.all([this.#worker.stop(), this.#jobs.stop()]);
    let timer: NodeJS.Timeout | undefined;
    const timedOut = await Promise.race([
      stopped.then(() => false),
      new Promise<boolean>((r) => { timer = setTimeout(() => r(true), this.#config.shutdownTimeoutMs); }),
    ]);
    clearTimeout(timer);
    if (timedOut) {
      // Destroying the batch's socket makes the server roll its transaction back; the
      // claimed rows are free for the next sidecar at once (locks only, no lease).
      this.#log.warn({ timeoutMs: this.#config.shutdownTimeoutMs }, 'batch did not finish within the shutdown timeout; rolling it back');
      this.#db.reset();
      // Not awaited: the batch's session is gone, whatever its code does next fails.
      stopped.catch(() => undefined);
    }
    await this.#listener.stop();
    try {
      await this.#db.with(async (c) => {
        await markStopped(c, this.#config.instanceId);
        await auditAppend(c, { action: 'sidecar.stopped', actor: this.#config.instanceId, detail: { rolledBack: timedOut } });
      });
    } catch (err) {
      this.#log.warn({ err: { message: describeError(err) } }, 'could not mark the sidecar stopped');
    }
    await this.#health?.close();
    this.#dataKeys.clear();
    this.#indexKeys.clear();
    await this.#db.close().catch(() => undefined);
    this.#log.info({ rolledBack: timedOut }, 'sidecar stopped');
  }

  #state(): HealthState {
    const detail = {
      instanceId: this.#config.instanceId,
      listening: this.#listener.listening,
      activeEncryptVersion: this.#keys.activeVersion('encrypt') ?? null,
      activeIndexVersion: this.#keys.activeVersion('index') ?? null,
    };
    const reason = this.#stopping ? 'stopping'
      : this.#keysProblem ? this.#keysProblem
      : !this.#listener.listening ? 'LISTEN connection is down; reconnecting'
      : !this.#holdsActiveEncrypt() ? 'no active encrypt root key version is held by this sidecar'
      : undefined;
    this.#metrics.healthy.set(reason ? 0 : 1);
    return reason ? { ok: false, reason, detail } : { ok: true, detail };
  }

  #holdsActiveEncrypt(): boolean {
    const v = this.#keys.activeVersion('encrypt');
    return v !== undefined && this.#keys.get('encrypt', v) !== undefined;
  }

  /** Runs a batch unless the key set is known to be unusable (then it throws a retryable error, claiming nothing). */
  #guardedBatch(fn: () => Promise<BatchResult>): Promise<BatchResult> {
    if (this.#keysProblem) return Promise.reject(new KeyUnavailableError(`paused: ${this.#keysProblem.replace(/^keyring: /, '')}`));
    if (this.#dropDataKeys) {
      this.#dropDataKeys = false;
      this.#dataKeys.clear();
    }
    return fn();
  }

  async #tick(): Promise<void> {
    try {
      await this.#beat();
      await this.#reloadKeys();
    } catch (err) {
      this.#log.warn({ err: { message: describeError(err) } }, 'heartbeat failed');
    }
    await this.#compactCounts();
  }

  /**
   * Folds the status counters' delta rows (keyring.value_counts) at every heartbeat, so that
   * keyring.status reads a few rows whatever the write rate. One sidecar at a time (an
   * advisory lock in the function); a failure only delays the next compaction.
   */
  async #compactCounts(): Promise<void> {
    try {
      const folded = await this.#db.with((c) => compactValueCounts(c));
      if (folded > 0) this.#log.debug({ folded }, 'status counters compacted');
    } catch (err) {
      this.#log.warn({ err: { message: describeError(err) } }, 'status counter compaction failed; retried at the next heartbeat');
    }
  }

  #beat(starting = false): Promise<void> {
    return this.#db.with((c) => heartbeat(c, {
      instanceId: this.#config.instanceId, host: hostname(), pid: process.pid, fingerprints: this.#keys.fingerprints,
    }, starting));
  }

  /**
   * Re-reads the key registry (on a `keys` hint and on every heartbeat, since a hint can
   * be missed): a newly activated version is used without a restart; a version whose
   * material this sidecar lacks pauses the claim loop and fails /healthz.
   *
   * One reload at a time, in call order: two overlapping reloads (a retire's hint and the
   * destroy's right after it) could finish out of order, and the older read would put a
   * destroyed version back until the next heartbeat.
   */
  #reloadKeys(): Promise<void> {
    const run = this.#reloads.then(() => this.#reloadKeysNow());
    this.#reloads = run.catch(() => undefined);
    return run;
  }

  async #reloadKeysNow(): Promise<void> {
    try {
      const { keys, max } = await this.#db.with(async (c) => ({
        keys: await resolveRootKeys(c, this.#material, { register: false }),
        max: await maxEncryptions(c),
      }));
      const changed = keys.registry.map((r) => `${r.purpose}${r.version}${r.state}`).join() !== this.#keys.registry.map((r) => `${r.purpose}${r.version}${r.state}`).join();
      this.#keys = keys;
      this.#maxEncryptions = max;
      // Stop vouching for a destroyed version at once, not at the next heartbeat.
      if (this.#dropDestroyed(keys)) await this.#beat();
      if (this.#keysProblem || changed) {
        this.#log.info({ activeEncrypt: keys.activeVersion('encrypt'), activeIndex: keys.activeVersion('index') }, 'root key registry reloaded');
        this.#keysProblem = undefined;
        this.#worker.kick();
        this.#jobs.kick();
      }
    } catch (err) {
      if (err instanceof KeyMissingError) {
        if (this.#keysProblem !== err.message) this.#log.error({ code: err.code, err: { message: err.message } }, 'key material missing; claim loop paused');
        this.#keysProblem = err.message;
      } else {
        throw err;
      }
    }
  }

  /**
   * Zeroes and forgets the configured material of destroyed versions: it is never used
   * again, and only the operator can delete it from the key store. True when any was dropped.
   */
  #dropDestroyed(keys: RootKeyStore): boolean {
    if (keys.destroyed.length === 0) return false;
    this.#log.warn({ versions: keys.destroyed.map((h) => `${h.purpose} ${h.version}`), sources: keys.destroyed.map((h) => h.label) },
      'root key versions destroyed in the registry were dropped from memory; delete them from the key store');
    this.#material = dropDestroyed(this.#material, keys);
    return true;
  }
}

async function checkSchema(c: import('pg').ClientBase): Promise<void> {
  // Checked apart: appliedSchemaVersion's query names keyring.migrations, which fails to
  // plan when the table does not exist.
  const { rows } = await c.query<{ ok: boolean }>(`SELECT to_regclass('keyring.migrations') IS NOT NULL AS ok`);
  const applied = rows[0]?.ok ? await appliedSchemaVersion(c) : 0;
  const known = knownSchemaVersion();
  if (applied === 0) throw new SchemaVersionError('SCHEMA_MISSING', 'the keyring schema is not installed in this database; run `keyring migrate`');
  if (applied > known) {
    throw new SchemaVersionError('SCHEMA_TOO_NEW', `the database schema is at version ${applied} but this sidecar knows only up to ${known}; upgrade the sidecar`);
  }
  if (applied < known) {
    throw new SchemaVersionError('SCHEMA_OUTDATED', `the database schema is at version ${applied} but this sidecar needs ${known}; run \`keyring migrate\``);
  }
}

async function maxEncryptions(c: import('pg').ClientBase): Promise<bigint> {
  const { rows } = await c.query<{ v: string | null }>(`SELECT keyring.setting('data_key_max_encryptions') AS v`);
  const v = rows[0]?.v;
  return v && /^\d+$/.test(v) ? BigInt(v) : DEFAULT_MAX_ENCRYPTIONS;
}

export type { Progress };
