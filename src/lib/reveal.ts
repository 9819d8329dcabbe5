/**
 * Audited reveal: one value, for one stated purpose, by an actor on the allow list
 * (keyring.settings reveal_actors). The audit row is committed before the value is
 * returned; when it cannot be written, nothing is revealed. Keyring.reveal() runs it;
 * this module holds its contract: the request, the checks and the errors.
 */
import { KeyringError } from '../crypto/index.js';

export interface RevealRequest {
  /** 'schema.table.column' ('table.column' means schema public). */
  readonly column: string;
  /** Canonical row key: the primary key as text, or a JSON array of texts for a composite key. */
  readonly rowKey: string;
  /** Why the value is needed (3..500 characters), e.g. a case number; written to the audit log. */
  readonly purpose: string;
  /** The named person or tool; without one, the database role is the actor. */
  readonly actor?: string;
}

/** Bounds on a purpose: long enough to mean something, short enough to stay a reason. */
export const PURPOSE_MIN = 3;
export const PURPOSE_MAX = 500;
export const ACTOR_MAX = 200;

/** The request is malformed (no purpose, an actor name that is too long): nothing was read or audited. */
export class RevealRequestError extends KeyringError {
  constructor(code: 'PURPOSE_REQUIRED' | 'BAD_ACTOR', message: string) {
    super(code, `keyring: ${message}`);
    this.name = 'RevealRequestError';
  }
}

/** The actor is not on the allow list. The refusal is in the audit log. */
export class RevealRefusedError extends KeyringError {
  constructor(actor: string) {
    super('REVEAL_REFUSED',
      `keyring: ${actor} may not reveal values; the attempt was audited. ` +
      'An administrator adds actors to keyring.settings reveal_actors.');
    this.name = 'RevealRefusedError';
  }
}

/** The value's data subject was shredded: the value is gone for good (crypto-shredding). */
export class ErasedError extends KeyringError {
  constructor(column: string, rowKey: string) {
    super('ERASED', `keyring: the value of ${column} in row ${rowKey} was erased (its data subject was shredded)`);
    this.name = 'ErasedError';
  }
}

/** The audit row could not be written or committed: nothing is revealed without it. */
export class AuditWriteError extends KeyringError {
  constructor(cause: string) {
    super('AUDIT_FAILED', `keyring: the audit log could not be written (${cause}); nothing was revealed`);
    this.name = 'AuditWriteError';
  }
}

/** Checks a request before anything is read; returns the trimmed purpose and actor. */
export function checkRevealRequest(r: RevealRequest): { purpose: string; actor: string | undefined } {
  const purpose = typeof r.purpose === 'string' ? r.purpose.trim() : '';
  if ([...purpose].length < PURPOSE_MIN || [...purpose].length > PURPOSE_MAX) {
    throw new RevealRequestError('PURPOSE_REQUIRED',
      `a reveal needs a purpose of ${PURPOSE_MIN} to ${PURPOSE_MAX} characters (why the value is needed, e.g. a case number)`);
  }
  const actor = r.actor?.trim() || undefined;
  // eslint-disable-next-line no-control-regex
  if (actor !== undefined && ([...actor].length > ACTOR_MAX || /[\u0000-\u001f\u007f]/.test(actor))) {
    throw new RevealRequestError('BAD_ACTOR', `an actor name has at most ${ACTOR_MAX} characters and no control characters`);
  }
  return { purpose, actor };
}
