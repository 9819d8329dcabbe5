/**
 * `keyring` command line. Every command has --help; a failure prints one line with the
 * reason on stderr and exits non-zero. Secrets come from the environment or a key
 * file, never from argv.
 */
import { stdio, type Out } from './output.js';
import { CliError } from './errors.js';
import type { Command } from './command.js';
import { migrateCommand } from './commands/migrate.js';
import { keygenCommand } from './commands/keygen.js';
import { initCommand } from './commands/init.js';
import { protectCommand } from './commands/protect.js';
import { statusCommand } from './commands/status.js';
import { sidecarCommand } from './commands/sidecar.js';
import { demoCommand } from './commands/demo.js';
import { auditCommand } from './commands/audit.js';
import { revealCommand } from './commands/reveal.js';
import { shredCommand } from './commands/shred.js';
import { keyCommand } from './commands/key.js';
import { rotateCommand } from './commands/rotate.js';
import { reencryptCommand } from './commands/reencrypt.js';
import { verifyCommand } from './commands/verify.js';

export const COMMANDS: readonly Command[] = [
  migrateCommand, keygenCommand, initCommand, protectCommand, statusCommand, sidecarCommand, demoCommand,
  auditCommand, revealCommand, shredCommand,
  keyCommand, rotateCommand, reencryptCommand, verifyCommand,
];

function usage(): string {
  const width = Math.max(...COMMANDS.map((c) => c.name.length));
  return [
    'Usage: keyring <command> [options]',
    '',
    'Field-level encryption and key lifecycle for PostgreSQL.',
    '',
    'Commands:',
    ...COMMANDS.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`),
    '',
    'Run `keyring <command> --help` for the options of one command.',
    'Configuration comes from the environment (DATABASE_URL, KEYRING_*): see README.md.',
  ].join('\n');
}

export async function main(argv: readonly string[], env: NodeJS.ProcessEnv, out: Out = stdio): Promise<number> {
  const [name, ...rest] = argv;
  if (!name || name === '--help' || name === '-h' || name === 'help') {
    out.line(usage());
    return name ? 0 : 1;
  }
  const cmd = COMMANDS.find((c) => c.name === name);
  if (!cmd) {
    out.error(`keyring: unknown command '${name}'. Run \`keyring --help\` for the list.`);
    return 2;
  }
  if (rest.includes('--help') || rest.includes('-h')) {
    out.line(cmd.help);
    return 0;
  }
  try {
    return await cmd.run(rest, env, out);
  } catch (err) {
    out.error(`keyring ${name}: ${oneLine(err)}`);
    return err instanceof CliError ? err.exitCode : 1;
  }
}

/** The reason of a failure on one line, without stack traces. */
export function oneLine(err: unknown): string {
  const msg = err instanceof Error ? err.message : String(err);
  return msg.replace(/\s*\n\s*/g, ' ').trim();
}
