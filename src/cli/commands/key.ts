import type pg from 'pg';
import { formatTable } from '../output.js';
import { parse, type Command } from '../command.js';
import { usageError } from '../errors.js';
import { withClient } from '../sql.js';

const SUBCOMMANDS = ['list', 'activate', 'retire', 'disable', 'enable', 'destroy'] as const;
type Sub = (typeof SUBCOMMANDS)[number];

/** Options each subcommand accepts (anything else is a usage error, exit 2). */
const ALLOWED: Record<Sub, readonly string[]> = {
  list: ['json'], activate: [], retire: [], disable: ['reason', 'successor'], enable: ['reason'], destroy: ['yes'],
};

const LIST_COLUMNS = ['purpose', 'version', 'state', 'fingerprint', 'activated_at', 'next_due', 'overdue', 'data_keys', 'reason'];

interface Target {
  readonly purpose: 'encrypt' | 'index';
  readonly version: number;
}

function target(sub: Sub, positionals: readonly string[]): Target {
  if (positionals.length !== 2) throw usageError(`keyring key ${sub} takes <encrypt|index> <version>`);
  const [purpose, v] = positionals as [string, string];
  if (purpose !== 'encrypt' && purpose !== 'index') throw usageError(`purpose must be encrypt or index, not '${purpose}'`);
  const version = Number(v);
  if (!/^\d+$/.test(v) || !Number.isInteger(version) || version < 1 || version > 65535) throw usageError('version must be a whole number 1..65535');
  return { purpose, version };
}

function requireText(value: string | undefined, flag: string, sub: Sub): string {
  if (value === undefined || value.trim() === '') throw usageError(`keyring key ${sub} needs ${flag} "<why>" (it goes into the audit log)`);
  return value;
}

/** Data keys still wrapped by other encrypt versions than the active one: what `keyring rotate` would rewrap. */
async function toRewrap(c: pg.Client): Promise<number> {
  const { rows } = await c.query<{ n: string | null }>(
    `SELECT sum(data_keys) AS n FROM keyring.key_inventory WHERE purpose = 'encrypt' AND state <> 'active'`);
  return Number(rows[0]?.n ?? 0);
}

export const keyCommand: Command = {
  name: 'key',
  summary: 'root key versions: list, activate, retire, disable, enable, destroy',
  help: `Usage: keyring key <subcommand> [options]

  list [--json]                              every version: state, fingerprint, rotation due, data keys it wraps
  activate <encrypt|index> <version>         new writes use this version; the previous one keeps decrypting
                                             (refused unless a live sidecar holds it, except the first version)
  retire <encrypt|index> <version>           nothing depends on the version any more; refused while data keys
                                             or blind-index terms still do (run \`keyring rotate\` first)
  disable <encrypt|index> <version> --reason TEXT [--successor N]
                                             emergency: nothing new is encrypted, wrapped or indexed under it;
                                             the active version needs --successor (activated in the same step)
  enable <encrypt|index> <version> --reason TEXT
                                             undo disable after a false alarm (back to decrypt_only)
  destroy <encrypt|index> <version> --yes    final, for a retired version: sidecars drop the material from
                                             memory; then delete it from every key store yourself

Each runs the SQL function of the same name (keyring.activate_key, ...) in DATABASE_URL
as the connecting role (a member of keyring_admin); every change is audited.`,
  async run(args, env, out) {
    const { values, positionals } = parse(args, {
      json: { type: 'boolean' }, reason: { type: 'string' }, successor: { type: 'string' }, yes: { type: 'boolean' },
    }, true);
    const sub = positionals[0] as Sub | undefined;
    if (!sub || !(SUBCOMMANDS as readonly string[]).includes(sub)) {
      throw usageError(`expected one of ${SUBCOMMANDS.join(', ')}; run \`keyring key --help\``);
    }
    const extra = Object.keys(values).filter((k) => !ALLOWED[sub].includes(k));
    if (extra.length > 0) throw usageError(`keyring key ${sub} does not take --${extra.join(', --')}`);

    if (sub === 'list') {
      if (positionals.length > 1) throw usageError('keyring key list takes no arguments');
      return withClient(env, 'keyring key list', async (c) => {
        const { rows } = await c.query('SELECT * FROM keyring.key_inventory');
        out.line(values.json ? JSON.stringify(rows, null, 2) : formatTable(rows, LIST_COLUMNS));
        return 0;
      });
    }
    const t = target(sub, positionals.slice(1));
    const name = `${t.purpose} key version ${t.version}`;
    switch (sub) {
      case 'activate':
        return withClient(env, 'keyring key activate', async (c) => {
          await c.query('SELECT keyring.activate_key($1, $2)', [t.purpose, t.version]);
          out.line(`${name} is active`);
          const left = t.purpose === 'encrypt' ? await toRewrap(c) : 0;
          if (left > 0) out.line(`${left} data key(s) are still wrapped by older versions: run \`keyring rotate\``);
          return 0;
        });
      case 'retire':
        return withClient(env, 'keyring key retire', async (c) => {
          await c.query('SELECT keyring.retire_key($1, $2)', [t.purpose, t.version]);
          out.line(`${name} is retired; destroy it with \`keyring key destroy ${t.purpose} ${t.version} --yes\` once you no longer need old backups`);
          return 0;
        });
      case 'disable': {
        const reason = requireText(values.reason, '--reason', sub);
        const successor = values.successor === undefined ? null : Number(values.successor);
        if (successor !== null && !(Number.isInteger(successor) && successor >= 1)) throw usageError('--successor must be a version number');
        return withClient(env, 'keyring key disable', async (c) => {
          await c.query('SELECT keyring.disable_key($1, $2, reason => $3, successor => $4)', [t.purpose, t.version, reason, successor]);
          if (successor !== null) out.line(`${t.purpose} key version ${successor} is active`);
          out.line(`${name} is disabled: nothing new is encrypted, wrapped or indexed under it`);
          return 0;
        });
      }
      case 'enable': {
        const reason = requireText(values.reason, '--reason', sub);
        return withClient(env, 'keyring key enable', async (c) => {
          await c.query('SELECT keyring.enable_key($1, $2, reason => $3)', [t.purpose, t.version, reason]);
          out.line(`${name} is enabled again (decrypt_only); activate it with \`keyring key activate ${t.purpose} ${t.version}\` if it should be active`);
          return 0;
        });
      }
      case 'destroy':
        if (!values.yes) {
          throw usageError(`destroying ${name} cannot be undone; run again with --yes ` +
            '(refused anyway while any data key or blind-index term still depends on it)');
        }
        return withClient(env, 'keyring key destroy', async (c) => {
          await c.query('SELECT keyring.destroy_key($1, $2)', [t.purpose, t.version]);
          const { rows } = await c.query<{ fingerprint: string }>(
            'SELECT fingerprint FROM keyring.root_keys WHERE purpose = $1 AND version = $2', [t.purpose, t.version]);
          out.line(`${name} is destroyed; running sidecars drop it from memory now`);
          out.line(`Delete the key with fingerprint ${rows[0]?.fingerprint} from every key store ` +
            `(KEYRING_${t.purpose.toUpperCase()}_KEYS, key files, KMS) and from their backups`);
          return 0;
        });
    }
  },
};
