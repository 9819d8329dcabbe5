import { parse, type Command } from '../command.js';
import { usageError } from '../errors.js';
import { withKeyring } from '../sql.js';

export const revealCommand: Command = {
  name: 'reveal',
  summary: 'reveal one protected value for a stated purpose (audited)',
  help: `Usage: keyring reveal <schema.table.column> --row KEY --purpose "WHY" [--actor NAME]

Decrypts one value and prints it (bytea as \\x hex; nothing for NULL). Every reveal is
written to the audit log (actor, key version, column, row key, purpose) and committed
before the value is printed; if that fails, nothing is printed. Refused, and the
refusal audited, unless the actor is on the allow list (keyring.settings reveal_actors).

  --row KEY         the row's primary key as text; a composite key as a JSON array of
                    texts, e.g. '["2024","17"]'
  --purpose "WHY"   why the value is needed, 3..500 characters (e.g. a case number)
  --actor NAME      the person revealing (default: the database role)

Keys come from KEYRING_ENCRYPT_KEYS / KEYRING_INDEX_KEYS or KEYRING_KEY_FILE and the
database from DATABASE_URL, as for the sidecar. Exit 1 when refused, erased (the data
subject was shredded) or not decryptable.`,
  async run(args, env, out) {
    const { values, positionals } = parse(args, {
      row: { type: 'string' }, purpose: { type: 'string' }, actor: { type: 'string' },
    }, true);
    if (positionals.length !== 1) throw usageError('expected exactly one <schema.table.column>');
    if (values.row === undefined) throw usageError('--row KEY is required');
    if (values.purpose === undefined || values.purpose.trim() === '') throw usageError('--purpose "WHY" is required (it goes into the audit log)');
    const row = values.row;
    const purpose = values.purpose;
    return withKeyring(env, async (kr) => {
      const value = await kr.reveal({
        column: positionals[0]!, rowKey: row, purpose, ...(values.actor ? { actor: values.actor } : {}),
      });
      if (value === null) out.error('(the value is NULL)');
      else out.line(Buffer.isBuffer(value) ? `\\x${value.toString('hex')}` : value);
      return 0;
    });
  },
};
