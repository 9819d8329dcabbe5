// Data key wrapping under an encrypt root key (DESIGN.md "Key hierarchy").
import { describe, expect, it } from 'vitest';
import {
  DecryptError,
  IvPool,
  UnsupportedParameterError,
  SecretBytes,
  WRAPPED_BYTES,
  generateKey,
  unwrapDataKey,
  wrapDataKey,
} from '../../src/crypto/index.js';

describe('wrapDataKey / unwrapDataKey', () => {
  const root = generateKey();
  const dataKey = generateKey();

  it('round-trips into a 60-byte wrapped key, with or without an IV pool', () => {
    for (const wrapped of [wrapDataKey(root, 1, 42n, dataKey), wrapDataKey(root, 1, 42n, dataKey, new IvPool())]) {
      expect(WRAPPED_BYTES).toBe(60);
      expect(wrapped.length).toBe(60);
      expect(unwrapDataKey(root, 1, 42n, wrapped).equals(dataKey)).toBe(true);
    }
  });

  it('never contains the data key in clear', () => {
    const wrapped = wrapDataKey(root, 1, 42n, dataKey);
    dataKey.use((bytes) => expect(wrapped.includes(bytes)).toBe(false));
  });

  it('fails for another root key, root version or data key id (AAD binding)', () => {
    const wrapped = wrapDataKey(root, 1, 42n, dataKey);
    expect(() => unwrapDataKey(generateKey(), 1, 42n, wrapped)).toThrow(DecryptError);
    expect(() => unwrapDataKey(root, 2, 42n, wrapped)).toThrow(DecryptError);
    expect(() => unwrapDataKey(root, 1, 43n, wrapped)).toThrow(DecryptError);
  });

  it('fails for tampered or wrongly sized input', () => {
    const wrapped = wrapDataKey(root, 1, 42n, dataKey);
    for (const position of [0, 11, 12, 43, 44, 59]) {
      const tampered = Buffer.from(wrapped);
      tampered[position] = tampered[position]! ^ 0x01;
      expect(() => unwrapDataKey(root, 1, 42n, tampered)).toThrow(DecryptError);
    }
    expect(() => unwrapDataKey(root, 1, 42n, wrapped.subarray(0, 59))).toThrow(DecryptError);
  });

  it('refuses a data key that is not 32 bytes and out-of-range ids', () => {
    expect(() => wrapDataKey(root, 1, 42n, SecretBytes.random(16))).toThrow(UnsupportedParameterError);
    expect(() => wrapDataKey(root, -1, 42n, dataKey)).toThrow(UnsupportedParameterError);
    expect(() => wrapDataKey(root, 1, 1n << 64n, dataKey)).toThrow(UnsupportedParameterError);
  });
});
