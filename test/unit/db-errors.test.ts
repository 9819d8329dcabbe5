import { describe, expect, it } from 'vitest';
import { describeError, isRetryable } from '../../src/db/errors.js';

/** describeError output is stored (pending.last_error, quarantine, audit) and logged: no value may survive. */
describe('describeError', () => {
  const pgError = (code: string, message: string) => Object.assign(new Error(message), { code });

  it('masks quoted input, quotes inside the value included', () => {
    const out = describeError(pgError('22P02', 'invalid input syntax for type integer: "12"secret-part"'));
    expect(out).toBe('22P02: invalid input syntax for type integer: "…"');
    expect(out).not.toContain('secret');
    expect(describeError(pgError('22P02', "value 'a'b'c' is bad"))).not.toMatch(/[abc]'/);
  });

  it('masks byte sequences Postgres prints unquoted', () => {
    const out = describeError(pgError('22021', 'invalid byte sequence for encoding "UTF8": 0xc3 0x28'));
    expect(out).not.toMatch(/c3|28/);
  });

  it('classifies link and lock errors as retryable, data errors not', () => {
    expect(isRetryable(pgError('40P01', 'deadlock detected'))).toBe(true);
    expect(isRetryable(pgError('08006', 'connection failure'))).toBe(true);
    expect(isRetryable(pgError('22P02', 'invalid input syntax'))).toBe(false);
  });
});
