// Blind index (DESIGN.md "Blind index"); cases C04 and C07.
import { hkdfSync, randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import {
  DEFAULT_INDEX_BYTES,
  KeyringError,
  SecretBytes,
  UnsupportedParameterError,
  blindIndexTerm,
  deriveIndexKey,
  generateKey,
  normalize,
  parseNormalization,
  type Normalization,
} from '../../src/crypto/index.js';

const indexRoot = generateKey();
const indexKey = deriveIndexKey(indexRoot, 3, null);

function term(value: string, spec: readonly Normalization[], version = 1): string {
  return blindIndexTerm(indexKey, version, Buffer.from(value, 'utf8'), spec, DEFAULT_INDEX_BYTES, true).toString('hex');
}

function codeOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (err) {
    return err instanceof KeyringError ? err.code : 'not a KeyringError';
  }
  return undefined;
}

describe('normalize', () => {
  const table: [string, string, string][] = [
    ['none', '  Alpha.One@Example.TEST ', '  Alpha.One@Example.TEST '],
    ['trim', '  Alpha.One@Example.TEST ', 'Alpha.One@Example.TEST'],
    ['trim', '\t\n\u00a0\u3000\u2028\u0085x y\u2003', 'x y'],
    ['trim', '\u200bx\ufeff', '\u200bx\ufeff'], // zero-width space and BOM are not White_Space
    ['trim', ' ', ''],
    ['lower', 'ALPHA.One ÀÉ', 'alpha.one àé'],
    ['lower', 'İI', 'i\u0307i'], // Unicode default mapping, not the Turkish locale's
    ['digits', '+1 (555) 010-9999', '15550109999'],
    ['digits', 'id ٣٤ 12', '12'], // ASCII digits only
    ['nfc', 'Cafe\u0301-1', 'Caf\u00e9-1'],
    ['trim,lower', '  Alpha.One@Example.TEST ', 'alpha.one@example.test'],
    ['nfc,lower', 'CAFE\u0301', 'caf\u00e9'],
  ];

  it.each(table)('%s: %j -> %j', (spec, input, expected) => {
    expect(normalize(input, parseNormalization(spec))).toBe(expected);
  });

  it('does not depend on the order of the steps it is given', () => {
    const value = '  CAFE\u0301-1 ';
    expect(normalize(value, ['lower', 'trim', 'nfc'])).toBe(normalize(value, ['nfc', 'trim', 'lower']));
  });

  // A /\p{White_Space}+$/ regex backtracks quadratically on inner runs
  // (about 5 s for 80 KB on the dev machine); 5 MiB values must not stall (C18).
  it('trims multi-MiB whitespace runs in linear time', () => {
    const inner = `x${' '.repeat(5 * 1024 * 1024)}x`;
    const outer = `${' '.repeat(1024 * 1024)}x${'\t'.repeat(1024 * 1024)}`;
    const started = Date.now();
    expect(normalize(inner, ['trim'])).toBe(inner);
    expect(normalize(outer, ['trim'])).toBe('x');
    expect(Date.now() - started).toBeLessThan(2000);
  });
});

describe('parseNormalization', () => {
  it('returns de-duplicated steps in canonical order, whatever the declared order', () => {
    const canonical = ['nfc', 'trim', 'lower', 'digits'];
    expect(parseNormalization('digits,lower,trim,nfc')).toEqual(canonical);
    expect(parseNormalization([' LOWER ', 'digits', 'nfc', 'trim', 'lower'])).toEqual(canonical);
    expect(parseNormalization('lower,trim')).toEqual(parseNormalization(['trim', 'lower']));
    expect(parseNormalization('none')).toEqual(['none']);
    expect(parseNormalization('')).toEqual(['none']);
    expect(parseNormalization([])).toEqual(['none']);
  });

  it('refuses unknown names and "none" combined with a step', () => {
    expect(codeOf(() => parseNormalization('trim,upper'))).toBe('BAD_NORMALIZATION');
    expect(codeOf(() => parseNormalization(['nfkc']))).toBe('BAD_NORMALIZATION');
    expect(codeOf(() => parseNormalization('none,trim'))).toBe('BAD_NORMALIZATION');
  });
});

describe('blindIndexTerm', () => {
  const trimLower = parseNormalization('trim,lower');

  it('matches every case and whitespace variant of a trim,lower column (C07 step 2)', () => {
    const written = term('  Alpha.One@Example.TEST ', trimLower);
    for (const lookup of ['alpha.one@example.test', 'ALPHA.ONE@EXAMPLE.TEST', 'alpha.one@example.test  ']) {
      expect(term(lookup, trimLower), lookup).toBe(written);
    }
    expect(term('alpha.two@example.test', trimLower)).not.toBe(written);
  });

  it('matches NFC and NFD forms of Café-1 when nfc is declared, and only then (C07 step 3)', () => {
    const nfc = 'Caf\u00e9-1';
    const nfd = 'Cafe\u0301-1';
    expect(term(nfd, ['nfc'])).toBe(term(nfc, ['nfc']));
    expect(term(nfd, ['none'])).not.toBe(term(nfc, ['none']));
  });

  it('applies exactly normalize(), so write and lookup cannot drift (C07)', () => {
    const spec = parseNormalization('lower,digits,trim,nfc');
    const declaredOtherwise = parseNormalization(['nfc', 'trim', 'digits', 'lower']);
    for (const value of ['  Tel: +1 (555) 010-9999 ', 'CAFE\u0301 42', '']) {
      const viaNormalize = term(normalize(value, spec), ['none']);
      expect(term(value, spec)).toBe(viaNormalize);
      expect(term(value, declaredOtherwise)).toBe(viaNormalize);
    }
  });

  it("keeps '' and ' ' apart without trim and together with trim (C04)", () => {
    expect(term('', ['none'])).not.toBe(term(' ', ['none']));
    expect(term('', ['trim'])).toBe(term(' ', ['trim']));
  });

  it('starts with the uint16 BE index version and has 2 + L bytes', () => {
    const value = Buffer.from('value-1');
    for (const length of [4, DEFAULT_INDEX_BYTES, 32]) {
      const t = blindIndexTerm(indexKey, 0x0102, value, ['none'], length, true);
      expect(t.length).toBe(2 + length);
      expect(t.readUInt16BE(0)).toBe(0x0102);
    }
    expect(DEFAULT_INDEX_BYTES).toBe(16);
    const v1 = blindIndexTerm(indexKey, 1, value, ['none'], 16, true);
    const v2 = blindIndexTerm(indexKey, 2, value, ['none'], 16, true);
    expect(v1.subarray(2).equals(v2.subarray(2))).toBe(true);
    expect(v1.equals(v2)).toBe(false);
  });

  it('refuses lengths outside 4..32, versions outside uint16, normalised bytea and invalid UTF-8', () => {
    const value = Buffer.from('value-1');
    for (const length of [3, 33, 16.5]) {
      expect(() => blindIndexTerm(indexKey, 1, value, ['none'], length, true)).toThrow(UnsupportedParameterError);
    }
    expect(() => blindIndexTerm(indexKey, 65536, value, ['none'], 16, true)).toThrow(UnsupportedParameterError);
    expect(codeOf(() => blindIndexTerm(indexKey, 1, value, ['lower'], 16, false))).toBe('BAD_NORMALIZATION');
    expect(blindIndexTerm(indexKey, 1, randomBytes(64), ['none'], 16, false).length).toBe(18);
    expect(codeOf(() => blindIndexTerm(indexKey, 1, Buffer.from([0x61, 0xff]), ['lower'], 16, true))).toBe(
      'INVALID_UTF8',
    );
  });
});

describe('deriveIndexKey', () => {
  it('separates columns and tenant scopes, and is deterministic', () => {
    const keys = [
      deriveIndexKey(indexRoot, 3, null),
      deriveIndexKey(indexRoot, 3, ''),
      deriveIndexKey(indexRoot, 3, 'org-1'),
      deriveIndexKey(indexRoot, 3, 'org-2'),
      deriveIndexKey(indexRoot, 4, null),
      deriveIndexKey(generateKey(), 3, null),
    ];
    for (let i = 0; i < keys.length; i++) {
      for (let j = i + 1; j < keys.length; j++) {
        expect(keys[i]!.equals(keys[j]!), `${i} vs ${j}`).toBe(false);
      }
    }
    expect(deriveIndexKey(indexRoot, 3, 'org-1').equals(keys[2]!)).toBe(true);
    const sameValue = (key: SecretBytes): string =>
      blindIndexTerm(key, 1, Buffer.from('value-1'), ['none'], 16, true).toString('hex');
    expect(sameValue(keys[2]!)).not.toBe(sameValue(keys[3]!));
  });

  it('is HKDF-SHA-256 with info "keyring/bidx/1" || uint32 column || scope', () => {
    const root = randomBytes(32);
    const info = (tenant: Buffer): Buffer => Buffer.concat([Buffer.from('keyring/bidx/1'), Buffer.from([0, 0, 1, 0]), tenant]);
    const expectNull = Buffer.from(hkdfSync('sha256', root, Buffer.alloc(0), info(Buffer.from([0])), 32));
    const expectOrg = Buffer.from(
      hkdfSync('sha256', root, Buffer.alloc(0), info(Buffer.concat([Buffer.from([1]), Buffer.from('org-é')])), 32),
    );
    const rootSecret = SecretBytes.from(Buffer.from(root));
    expect(deriveIndexKey(rootSecret, 256, null).equals(SecretBytes.from(expectNull))).toBe(true);
    expect(deriveIndexKey(rootSecret, 256, 'org-é').equals(SecretBytes.from(expectOrg))).toBe(true);
  });
});
