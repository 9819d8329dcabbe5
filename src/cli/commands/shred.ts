import { shredSubject } from '../../db/queries/shred-subject.js';
import { parse, type Command } from '../command.js';
import { usageError } from '../errors.js';
import { withClient } from '../sql.js';

export const shredCommand: Command = {
  name: 'shred',
  summary: 'crypto-shred one data subject: destroy its data keys (irreversible)',
  help: `Usage: keyring shred <subject> --reason "WHY" --yes

Runs keyring.shred(): destroys every data key of the data subject (the value of the
subject column of protect(..., p_subject_column => ...)) in every protected column,
clears the subject's blind-index terms, deletes its queued plaintext, tells the sidecars
to drop cached keys, and audits 'subject.shredded' (counts, never values). Rows stay;
their protected values can never be decrypted again. New values written for the subject
later get a new data key.

  --reason "WHY"   recorded in the audit log (e.g. the erasure request's reference)
  --yes            required: there is no undo

Needs keyring_admin and UPDATE on the protected tables (their owner).`,
  async run(args, env, out) {
    const { values, positionals } = parse(args, { reason: { type: 'string' }, yes: { type: 'boolean' } }, true);
    if (positionals.length !== 1) throw usageError('expected exactly one <subject>');
    if (values.reason === undefined || values.reason.trim() === '') throw usageError('--reason "WHY" is required (it goes into the audit log)');
    if (!values.yes) throw usageError('shredding cannot be undone: the values of this subject become unreadable for good; add --yes');
    return withClient(env, 'keyring shred', async (client) => {
      const r = await shredSubject(client, positionals[0]!, values.reason!.trim());
      out.line(`shredded subject ${positionals[0]}: ${r.dataKeys} data keys destroyed, ${r.indexTerms} blind-index terms cleared, ` +
        `${r.queued} queued values deleted`);
      return 0;
    });
  },
};
