// Project Wycheproof vectors (test/vectors/wycheproof, Apache-2.0) run through
// the crypto core's own functions, not through node:crypto directly.
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import {
  DecryptError,
  SecretBytes,
  UnsupportedParameterError,
  blindIndexTerm,
  gcmOpen,
  gcmSeal,
  hkdfSha256,
} from '../../src/crypto/index.js';

type Result = 'valid' | 'invalid' | 'acceptable';
interface VectorFile<G> {
  algorithm: string;
  testGroups: G[];
}
interface AeadGroup {
  keySize: number;
  ivSize: number;
  tagSize: number;
  tests: { tcId: number; key: string; iv: string; aad: string; msg: string; ct: string; tag: string; result: Result }[];
}
interface MacGroup {
  keySize: number;
  tagSize: number;
  tests: { tcId: number; key: string; msg: string; tag: string; result: Result }[];
}
interface HkdfGroup {
  tests: { tcId: number; ikm: string; salt: string; info: string; size: number; okm: string; result: Result }[];
}

function load<G>(name: string): VectorFile<G> {
  const url = new URL(`../vectors/wycheproof/${name}`, import.meta.url);
  return JSON.parse(readFileSync(url, 'utf8')) as VectorFile<G>;
}

const hex = (s: string): Buffer => Buffer.from(s, 'hex');
const secret = (s: string): SecretBytes => SecretBytes.from(hex(s));

describe('wycheproof AES-GCM (aes_gcm_test.json)', () => {
  it('format-1 parameters match every vector; all other sizes are refused', () => {
    const file = load<AeadGroup>('aes_gcm_test.json');
    let valid = 0;
    let invalid = 0;
    let acceptable = 0;
    let refused = 0;
    for (const group of file.testGroups) {
      const supported = group.keySize === 256 && group.ivSize === 96 && group.tagSize === 128;
      for (const t of group.tests) {
        const [iv, aad, msg, ct, tag] = [hex(t.iv), hex(t.aad), hex(t.msg), hex(t.ct), hex(t.tag)];
        const where = `tcId ${t.tcId}`;
        if (!supported) {
          // Other key, IV or tag sizes must be refused, never silently used.
          expect(() => gcmSeal(secret(t.key), iv, msg, aad), where).toThrow(UnsupportedParameterError);
          expect(() => gcmOpen(secret(t.key), iv, ct, tag, aad), where).toThrow(UnsupportedParameterError);
          refused++;
        } else if (t.result === 'valid') {
          const sealed = gcmSeal(secret(t.key), iv, msg, aad);
          expect(sealed.ciphertext.toString('hex'), where).toBe(t.ct);
          expect(sealed.tag.toString('hex'), where).toBe(t.tag);
          expect(gcmOpen(secret(t.key), iv, ct, tag, aad).toString('hex'), where).toBe(t.msg);
          valid++;
        } else if (t.result === 'invalid') {
          expect(() => gcmOpen(secret(t.key), iv, ct, tag, aad), where).toThrow(DecryptError);
          invalid++;
        } else {
          // Decision for "acceptable": opening may be refused, but if it
          // succeeds it must yield exactly the vector's message.
          let opened: Buffer | undefined;
          try {
            opened = gcmOpen(secret(t.key), iv, ct, tag, aad);
          } catch (err) {
            expect(err, where).toBeInstanceOf(DecryptError);
          }
          if (opened !== undefined) expect(opened.toString('hex'), where).toBe(t.msg);
          acceptable++;
        }
      }
    }
    console.log(
      `wycheproof aes-gcm: ${valid} valid verified, ${invalid} invalid rejected, ` +
        `${acceptable} acceptable checked, ${refused} refused (unsupported sizes)`,
    );
    expect(valid).toBeGreaterThan(0);
    expect(invalid).toBeGreaterThan(0);
    expect(refused).toBeGreaterThan(0);
  });
});

describe('wycheproof HMAC-SHA-256 (hmac_sha256_test.json)', () => {
  it('blind-index terms equal the vector tags, truncated ones included', () => {
    const file = load<MacGroup>('hmac_sha256_test.json');
    let valid = 0;
    let invalid = 0;
    let truncated = 0;
    for (const group of file.testGroups) {
      const tagBytes = group.tagSize / 8;
      for (const t of group.tests) {
        // A blind-index term is version || HMAC prefix; with "none" on bytea
        // the HMAC input is the raw message.
        const term = blindIndexTerm(secret(t.key), 0, hex(t.msg), ['none'], tagBytes, false);
        const mac = term.subarray(2).toString('hex');
        if (t.result === 'valid') {
          expect(mac, `tcId ${t.tcId}`).toBe(t.tag);
          valid++;
          if (tagBytes < 32) truncated++;
        } else {
          expect(mac, `tcId ${t.tcId}`).not.toBe(t.tag);
          invalid++;
        }
      }
    }
    console.log(`wycheproof hmac-sha256: ${valid} valid verified (${truncated} truncated), ${invalid} invalid rejected`);
    expect(valid).toBeGreaterThan(0);
    expect(truncated).toBeGreaterThan(0);
    expect(invalid).toBeGreaterThan(0);
  });
});

describe('wycheproof HKDF-SHA-256 (hkdf_sha256_test.json)', () => {
  it('derives the expected okm and refuses output sizes over 255 * 32', () => {
    const file = load<HkdfGroup>('hkdf_sha256_test.json');
    let valid = 0;
    let invalid = 0;
    for (const group of file.testGroups) {
      for (const t of group.tests) {
        const [ikm, salt, info] = [hex(t.ikm), hex(t.salt), hex(t.info)];
        if (t.result === 'valid') {
          expect(hkdfSha256(ikm, salt, info, t.size).toString('hex'), `tcId ${t.tcId}`).toBe(t.okm);
          // Same result when the input key is held as a SecretBytes.
          expect(hkdfSha256(secret(t.ikm), salt, info, t.size).toString('hex'), `tcId ${t.tcId}`).toBe(t.okm);
          valid++;
        } else {
          expect(() => hkdfSha256(ikm, salt, info, t.size), `tcId ${t.tcId}`).toThrow(UnsupportedParameterError);
          invalid++;
        }
      }
    }
    console.log(`wycheproof hkdf-sha256: ${valid} valid verified, ${invalid} invalid rejected`);
    expect(valid).toBeGreaterThan(0);
    expect(invalid).toBeGreaterThan(0);
  });
});
