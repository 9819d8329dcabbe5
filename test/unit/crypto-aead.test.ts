// AES-256-GCM parameter checks and HKDF limits beyond the Wycheproof vectors.
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import {
  DecryptError,
  SecretBytes,
  UnsupportedParameterError,
  gcmOpen,
  gcmSeal,
  hkdfSha256,
} from '../../src/crypto/index.js';

describe('gcmSeal / gcmOpen', () => {
  const key = SecretBytes.random(32);
  const iv = randomBytes(12);
  const aad = Buffer.from('aad');
  const { ciphertext, tag } = gcmSeal(key, iv, Buffer.from('value-1'), aad);

  it('round-trips and returns a 16-byte tag', () => {
    expect(tag.length).toBe(16);
    expect(gcmOpen(key, iv, ciphertext, tag, aad).toString()).toBe('value-1');
  });

  it('refuses a truncated tag that Node alone would accept (4..15 bytes)', () => {
    for (const length of [4, 8, 12, 15]) {
      expect(() => gcmOpen(key, iv, ciphertext, tag.subarray(0, length), aad)).toThrow(UnsupportedParameterError);
    }
  });

  it('refuses 128- and 192-bit keys and non-96-bit IVs', () => {
    for (const size of [16, 24]) {
      expect(() => gcmSeal(SecretBytes.random(size), iv, Buffer.alloc(1), aad)).toThrow(UnsupportedParameterError);
    }
    for (const size of [0, 8, 16]) {
      expect(() => gcmSeal(key, randomBytes(size), Buffer.alloc(1), aad)).toThrow(UnsupportedParameterError);
      expect(() => gcmOpen(key, randomBytes(size), ciphertext, tag, aad)).toThrow(UnsupportedParameterError);
    }
  });

  it('throws DecryptError for a wrong AAD, key or tag', () => {
    expect(() => gcmOpen(key, iv, ciphertext, tag, Buffer.from('other'))).toThrow(DecryptError);
    expect(() => gcmOpen(SecretBytes.random(32), iv, ciphertext, tag, aad)).toThrow(DecryptError);
    const badTag = Buffer.from(tag);
    badTag[15] = badTag[15]! ^ 0x80;
    expect(() => gcmOpen(key, iv, ciphertext, badTag, aad)).toThrow(DecryptError);
  });
});

describe('hkdfSha256', () => {
  it('refuses lengths outside 1..255*32 and info over 1024 bytes', () => {
    const ikm = randomBytes(32);
    expect(hkdfSha256(ikm, Buffer.alloc(0), Buffer.alloc(0), 8160).length).toBe(8160);
    for (const length of [0, -1, 1.5, 8161]) {
      expect(() => hkdfSha256(ikm, Buffer.alloc(0), Buffer.alloc(0), length)).toThrow(UnsupportedParameterError);
    }
    expect(() => hkdfSha256(ikm, Buffer.alloc(0), Buffer.alloc(1025), 32)).toThrow(UnsupportedParameterError);
  });
});
