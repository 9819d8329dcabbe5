/**
 * `keyring sidecar`: loads the configuration, starts the sidecar, and stops it on
 * SIGTERM/SIGINT. A refused start prints one line with the reason and returns non-zero
 * (2: configuration, 1: refused by the database or keys); a clean stop returns 0.
 */
import { ConfigError, loadConfig } from '../src/config.js';
import { disposeMaterial } from '../src/keys/material.js';
import { createLogger } from '../src/log.js';
import { Sidecar } from './sidecar.js';

export interface RunIo {
  readonly error: (line: string) => void;
}

const oneLine = (err: unknown): string =>
  (err instanceof Error ? err.message : String(err)).replace(/\s*\n\s*/g, ' ').replace(/^keyring: /, '').trim();

/** Runs until a signal; resolves to the process exit code. */
export async function runSidecar(env: NodeJS.ProcessEnv, io: RunIo = { error: (l) => process.stderr.write(`${l}\n`) }): Promise<number> {
  let config;
  try {
    config = loadConfig(env);
  } catch (err) {
    io.error(`keyring sidecar: ${oneLine(err)}`);
    return err instanceof ConfigError ? 2 : 1;
  }
  const logger = createLogger({ level: config.logLevel, bindings: { instance: config.instanceId } });
  let sidecar: Sidecar;
  try {
    sidecar = await Sidecar.start(config, { logger });
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    logger.fatal({ code, err: { message: oneLine(err) } }, 'sidecar start refused');
    io.error(`keyring sidecar: ${oneLine(err)}`);
    disposeMaterial(config.keys);
    return 1;
  }
  return new Promise<number>((resolve) => {
    let stopping = false;
    const onSignal = (signal: NodeJS.Signals): void => {
      if (stopping) {
        // A second signal: the operator does not want to wait for the batch in hand.
        logger.warn({ signal }, 'second signal; exiting now');
        resolve(1);
        return;
      }
      stopping = true;
      logger.info({ signal }, 'signal received; shutting down');
      sidecar.stop().then(
        () => resolve(0),
        (err) => {
          logger.error({ err: { message: oneLine(err) } }, 'shutdown failed');
          resolve(1);
        },
      ).finally(() => {
        process.off('SIGTERM', onSignal);
        process.off('SIGINT', onSignal);
        disposeMaterial(config.keys);
      });
    };
    process.on('SIGTERM', onSignal);
    process.on('SIGINT', onSignal);
  });
}
