// SecretBytes: a key can be neither printed, serialised nor compared in variable time (STYLE.md rule 5).
import { randomBytes } from 'node:crypto';
import { format, inspect } from 'node:util';
import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { KeyringError, SecretBytes } from '../../src/crypto/index.js';

const REDACTED = 'SecretBytes(<redacted>)';

function freshSecret(): { bytes: Buffer; secret: SecretBytes } {
  const bytes = randomBytes(32);
  return { bytes, secret: SecretBytes.from(Buffer.from(bytes)) };
}

function expectNoKeyBytes(text: string, bytes: Buffer): void {
  expect(text.toLowerCase()).not.toContain(bytes.toString('hex'));
  expect(text).not.toContain(bytes.toString('base64'));
  expect(text).not.toContain(bytes.subarray(0, 8).toString('hex'));
}

describe('SecretBytes', () => {
  it('never shows its bytes when printed or serialised', () => {
    const { bytes, secret } = freshSecret();
    const renderings = [
      JSON.stringify(secret),
      JSON.stringify({ k: secret }),
      String(secret),
      `${secret}`,
      inspect(secret),
      inspect({ nested: { k: secret } }, { showHidden: true, depth: Infinity }),
      format('%o %O %s %j', secret, secret, secret, { k: secret }),
    ];
    for (const text of renderings) {
      expectNoKeyBytes(text, bytes);
      expect(text).toContain(REDACTED);
    }
    expect(Object.keys(secret)).toEqual([]);
  });

  it('is redacted in pino log lines', () => {
    const { bytes, secret } = freshSecret();
    const lines: string[] = [];
    const log = pino({ base: null }, { write: (line: string) => lines.push(line) });
    log.info({ key: secret, nested: { secret } }, 'loaded key');
    expect(lines).toHaveLength(1);
    expectNoKeyBytes(lines[0]!, bytes);
    expect(lines[0]).toContain(REDACTED);
  });

  it('copies from its source and zero-fills the source', () => {
    const source = randomBytes(32);
    const copy = Buffer.from(source);
    const secret = SecretBytes.from(source);
    expect(source.equals(Buffer.alloc(32))).toBe(true);
    secret.use((b) => expect(b.equals(copy)).toBe(true));
  });

  it('compares in constant time, false on different content or length', () => {
    const { bytes, secret } = freshSecret();
    expect(secret.equals(SecretBytes.from(Buffer.from(bytes)))).toBe(true);
    const flipped = Buffer.from(bytes);
    flipped[31] = flipped[31]! ^ 1;
    expect(secret.equals(SecretBytes.from(flipped))).toBe(false);
    expect(secret.equals(SecretBytes.from(bytes.subarray(0, 16)))).toBe(false);
  });

  it('caches its KeyObject', () => {
    const { secret } = freshSecret();
    expect(secret.keyObject()).toBe(secret.keyObject());
    expect(secret.keyObject().symmetricKeySize).toBe(32);
  });

  it('zero-fills on dispose and refuses any later use', () => {
    const { secret } = freshSecret();
    const inner = secret.use((b) => b);
    secret.dispose();
    expect(inner.equals(Buffer.alloc(32))).toBe(true);
    expect(secret.disposed).toBe(true);
    for (const use of [() => secret.use((b) => b), () => secret.keyObject(), () => secret.length]) {
      expect(use).toThrow(KeyringError);
    }
    expect(() => secret.dispose()).not.toThrow();
    expect(String(secret)).toBe(REDACTED);
  });

  it('random(n) gives n CSPRNG bytes', () => {
    const a = SecretBytes.random(32);
    expect(a.length).toBe(32);
    expect(a.equals(SecretBytes.random(32))).toBe(false);
  });
});
