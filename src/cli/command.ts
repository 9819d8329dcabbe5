import { parseArgs, type ParseArgsConfig } from 'node:util';
import { z } from 'zod';
import type { Out } from './output.js';
import { usageError, CliError } from './errors.js';

export interface Command {
  readonly name: string;
  readonly summary: string;
  readonly help: string;
  run(args: readonly string[], env: NodeJS.ProcessEnv, out: Out): Promise<number>;
}

/** parseArgs with strict options; unknown flags become a usage error (exit 2). */
export function parse<T extends NonNullable<ParseArgsConfig['options']>>(
  args: readonly string[], options: T, allowPositionals = false,
) {
  try {
    return parseArgs({ args: [...args], options, allowPositionals, strict: true });
  } catch (err) {
    throw usageError(err instanceof Error ? err.message : String(err));
  }
}

const dbUrl = z.string().regex(/^postgres(ql)?:\/\//, 'must be a postgres:// URL');

/** DATABASE_URL from the environment, the one setting every database command needs. */
export function databaseUrl(env: NodeJS.ProcessEnv): string {
  const parsed = dbUrl.safeParse(env.DATABASE_URL);
  if (!parsed.success) {
    throw new CliError('CONFIG', env.DATABASE_URL
      ? 'DATABASE_URL must be a postgres:// URL'
      : 'DATABASE_URL is not set; export DATABASE_URL=postgres://user@host:5432/db');
  }
  return parsed.data;
}
