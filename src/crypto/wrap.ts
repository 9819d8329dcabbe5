// Data keys are stored in keyring.data_keys only wrapped by an encrypt root key:
//
//   wrapped = IV (12) || AES-256-GCM(root, dataKey) (32) || tag (16) = 60 bytes
//   AAD     = ascii "keyring/dk/1" || uint64 BE data key id || uint32 BE root version
//
// The AAD binds a wrapped key to its row and root version: swapping wrapped
// keys between data_keys rows, or relabelling the root version, fails to
// unwrap instead of silently decrypting values under another subject's key.
// A root key wraps at most one key per data key row, far below the 2^32
// random-IV bound of NIST SP 800-38D §8.3.

import { randomBytes } from 'node:crypto';
import { GCM_IV_BYTES, GCM_TAG_BYTES, gcmOpen, gcmSeal, type IvPool } from './aead.js';
import { DecryptError, UnsupportedParameterError, requireUint } from './errors.js';
import { KEY_BYTES } from './keys.js';
import { SecretBytes } from './secret.js';

export const WRAPPED_BYTES = GCM_IV_BYTES + KEY_BYTES + GCM_TAG_BYTES; // 60

const LABEL = Buffer.from('keyring/dk/1', 'ascii');

function wrapAad(rootVersion: number, dataKeyId: bigint): Buffer {
  requireUint(rootVersion, 32, 'root key version');
  requireUint(dataKeyId, 64, 'data key id');
  const aad = Buffer.allocUnsafe(LABEL.length + 8 + 4);
  LABEL.copy(aad, 0);
  aad.writeBigUInt64BE(dataKeyId, LABEL.length);
  aad.writeUInt32BE(rootVersion, LABEL.length + 8);
  return aad;
}

/** Wraps a 32-byte data key under an encrypt root key. Never returns the data key in clear. */
export function wrapDataKey(
  root: SecretBytes,
  rootVersion: number,
  dataKeyId: bigint,
  dataKey: SecretBytes,
  ivPool?: IvPool,
): Buffer {
  if (dataKey.length !== KEY_BYTES) {
    throw new UnsupportedParameterError(`data key must be ${KEY_BYTES} bytes, got ${dataKey.length}`);
  }
  const aad = wrapAad(rootVersion, dataKeyId);
  const iv = ivPool?.next() ?? randomBytes(GCM_IV_BYTES);
  const { ciphertext, tag } = dataKey.use((bytes) => gcmSeal(root, iv, bytes, aad));
  return Buffer.concat([iv, ciphertext, tag], WRAPPED_BYTES);
}

/** Unwraps a data key; DecryptError if the root key, id or version do not match or the bytes were altered. */
export function unwrapDataKey(
  root: SecretBytes,
  rootVersion: number,
  dataKeyId: bigint,
  wrapped: Buffer,
): SecretBytes {
  const aad = wrapAad(rootVersion, dataKeyId);
  if (wrapped.length !== WRAPPED_BYTES) {
    throw new DecryptError('length');
  }
  const tagOffset = GCM_IV_BYTES + KEY_BYTES;
  const plaintext = gcmOpen(
    root,
    wrapped.subarray(0, GCM_IV_BYTES),
    wrapped.subarray(GCM_IV_BYTES, tagOffset),
    wrapped.subarray(tagOffset),
    aad,
  );
  return SecretBytes.from(plaintext); // zero-fills the transient plaintext buffer
}
