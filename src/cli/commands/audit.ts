import pg from 'pg';
import { anchorHolds, auditHead, verifyAuditChain } from '../../db/queries/verify-audit-chain.js';
import { databaseUrl, parse, type Command } from '../command.js';
import { usageError } from '../errors.js';

/** `ID:HASH` as printed by `keyring audit head`. */
function parseAnchor(s: string): { id: string; hash: string } {
  const m = /^(\d{1,19}):([0-9a-f]{64})$/.exec(s.trim());
  if (!m) throw usageError('--anchor takes ID:HASH as printed by `keyring audit head` (64 hex digits)');
  return { id: m[1]!, hash: m[2]! };
}

export const auditCommand: Command = {
  name: 'audit',
  summary: 'verify the hash-chained audit log, or print its head for anchoring',
  help: `Usage: keyring audit verify [--anchor ID:HASH]
       keyring audit head

verify  walks keyring.audit_log (keyring.verify_audit_chain()) and reports the first
        broken or missing link: a row whose content no longer matches its hash, rows
        missing in the middle, at the start or at the end. Exit 0 when the chain is
        whole, 1 when it is broken.
        --anchor ID:HASH  also checks that row ID still holds HASH (an earlier head
        kept outside the database): catches a log rewritten from that row on.
head    prints the chain's head as ID:HASH. Store it outside the database (a ticket,
        a WORM bucket, another system's log) to anchor the chain.

Needs SELECT on the audit log: keyring_auditor or keyring_admin.`,
  async run(args, env, out) {
    const { values, positionals } = parse(args, { anchor: { type: 'string' } }, true);
    const [sub, ...rest] = positionals;
    if (rest.length > 0 || (sub !== 'verify' && sub !== 'head')) throw usageError('expected `keyring audit verify` or `keyring audit head`');
    if (sub === 'head' && values.anchor !== undefined) throw usageError('--anchor goes with verify');
    const anchor = values.anchor === undefined ? undefined : parseAnchor(values.anchor);
    const client = new pg.Client({ connectionString: databaseUrl(env), application_name: `keyring audit ${sub}` });
    client.on('error', () => undefined);
    await client.connect();
    try {
      const head = await auditHead(client);
      if (sub === 'head') {
        out.line(`${head.id}:${head.hash}`);
        return 0;
      }
      const problem = await verifyAuditChain(client);
      if (problem) {
        out.error(`audit chain broken at row ${problem.id ?? '(head)'}: ${problem.problem}`);
        return 1;
      }
      if (anchor && !(await anchorHolds(client, anchor.id, anchor.hash))) {
        out.error(`audit chain broken at row ${anchor.id}: the row no longer holds the anchored hash (deleted, or the log was rewritten from there on)`);
        return 1;
      }
      out.line(`audit chain intact: ${head.rows} rows, head row ${head.id} (sha256 ${head.hash || '-'})` +
        (anchor ? `; anchor row ${anchor.id} holds its hash` : ''));
      return 0;
    } finally {
      await client.end().catch(() => undefined);
    }
  },
};
