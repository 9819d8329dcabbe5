// Blind index (DESIGN.md "Blind index"):
//   term = uint16 BE index-root version || HMAC-SHA-256(K_col_scope, normalize(v))[0..L)
//   K_col_scope = HKDF-SHA-256(index root, salt = "",
//                 info = "keyring/bidx/1" || uint32 BE column id || tenant scope, 32)

import { createHmac } from 'node:crypto';
import { KeyringError, UnsupportedParameterError, requireUint } from './errors.js';
import { hkdfSha256 } from './hkdf.js';
import { SecretBytes } from './secret.js';

export type Normalization = 'none' | 'trim' | 'lower' | 'digits' | 'nfc';

// Canonical order, whatever order a column declares its steps in:
// nfc first, so that composed and decomposed input (e.g. "é" as U+00E9 or
// e + U+0301) is one string before anything else looks at it; then trim and
// lower (which commute); digits last, since it drops everything but 0-9.
// Declaring "lower,trim" or "trim,lower" therefore gives the same terms.
const CANONICAL_ORDER = ['nfc', 'trim', 'lower', 'digits'] as const;

/**
 * Term length L in bytes of HMAC output (plus the 2-byte version prefix).
 * Collisions: with L bytes about 2^(4L) distinct values (birthday bound,
 * sqrt(2 ln 2 * 2^(8L))) give a 50% chance that two share a term; at 16 bytes
 * that is 2^64 values, i.e. never. Leakage: equal values always give equal
 * terms, whatever L. A shorter L puts several values behind each term (with
 * N distinct values, about N / 2^(8L) false positives per lookup), which
 * hides more from someone holding the index but means the caller must filter
 * lookups by decrypting the candidates. 16 bytes favours exact lookups.
 */
export const DEFAULT_INDEX_BYTES = 16;
export const MIN_INDEX_BYTES = 4;
export const MAX_INDEX_BYTES = 32;

const BIDX_LABEL = Buffer.from('keyring/bidx/1', 'ascii');

/**
 * Parses a column's declared normalisation ("trim,lower" or ["trim", "lower"],
 * names case-insensitive). Returns the steps de-duplicated in canonical order
 * (nfc, trim, lower, digits). An empty declaration means "none"; "none" cannot
 * be combined with another step. Unknown names throw BAD_NORMALIZATION.
 */
export function parseNormalization(spec: string | readonly string[]): Normalization[] {
  const names = (typeof spec === 'string' ? spec.split(',') : spec)
    .map((name) => name.trim().toLowerCase())
    .filter((name) => name !== '');
  for (const name of names) {
    if (name !== 'none' && !(CANONICAL_ORDER as readonly string[]).includes(name)) {
      throw new KeyringError(
        'BAD_NORMALIZATION',
        `keyring: unknown normalisation "${name}"; use none, or a combination of ${CANONICAL_ORDER.join(', ')}`,
      );
    }
  }
  const steps = CANONICAL_ORDER.filter((step) => names.includes(step));
  if (names.includes('none') && steps.length > 0) {
    throw new KeyringError('BAD_NORMALIZATION', 'keyring: normalisation "none" cannot be combined with other steps');
  }
  return steps.length === 0 ? ['none'] : steps;
}

// Unicode White_Space property (PropList.txt); all such code points are in the
// BMP, so testing one UTF-16 unit at a time is exact.
const WHITE_SPACE = /^\p{White_Space}$/u;

// A loop, not a /^\s+|\s+$/ regex: that backtracks quadratically on long
// runs of inner whitespace (a multi-MiB value would stall the sidecar).
function trimUnicode(value: string): string {
  let start = 0;
  let end = value.length;
  while (start < end && WHITE_SPACE.test(value.charAt(start))) start++;
  while (end > start && WHITE_SPACE.test(value.charAt(end - 1))) end--;
  return value.slice(start, end);
}

const STEP: Record<(typeof CANONICAL_ORDER)[number], (value: string) => string> = {
  nfc: (value) => value.normalize('NFC'),
  trim: trimUnicode,
  // Unicode default lowercase mapping, locale-independent (not
  // toLocaleLowerCase: under a Turkish locale "I" would map differently on
  // different hosts). Lowercasing is not case folding: "STRASSE" and
  // "straße" stay different.
  lower: (value) => value.toLowerCase(),
  digits: (value) => value.replace(/[^0-9]/g, ''),
};

/**
 * THE normalisation of blind-indexed values, used on write and on lookup
 * alike (case C07). Steps run in canonical order whatever order `spec` lists
 * them in; "none" is the identity. Only the index sees the result: the
 * encrypted value is always the original input.
 */
export function normalize(value: string, spec: readonly Normalization[]): string {
  let out = value;
  for (const step of CANONICAL_ORDER) {
    if (spec.includes(step)) out = STEP[step](out);
  }
  return out;
}

/** The HMAC key of one column and tenant scope (null: the column is not tenant-scoped). */
export function deriveIndexKey(indexRoot: SecretBytes, columnId: number, tenant: string | null): SecretBytes {
  requireUint(columnId, 32, 'column id');
  // 0x00 for "no tenant" and 0x01 || tenant otherwise keep null apart from
  // the empty tenant ''. The tenant is the last field, so it needs no length.
  const tenantBytes = tenant === null ? Buffer.alloc(0) : Buffer.from(tenant, 'utf8');
  const info = Buffer.alloc(BIDX_LABEL.length + 4 + 1 + tenantBytes.length);
  BIDX_LABEL.copy(info, 0);
  info.writeUInt32BE(columnId, BIDX_LABEL.length);
  info[BIDX_LABEL.length + 4] = tenant === null ? 0x00 : 0x01;
  tenantBytes.copy(info, BIDX_LABEL.length + 5);
  return SecretBytes.from(hkdfSha256(indexRoot, Buffer.alloc(0), info, 32));
}

const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/**
 * Blind-index term of one value: uint16 BE index version || first
 * `indexBytes` bytes of HMAC-SHA-256(indexKey, normalised value).
 * Text is UTF-8 decoded (invalid UTF-8 is refused rather than replaced by
 * U+FFFD, which would make distinct inputs collide), normalised and
 * re-encoded; bytea values admit only "none".
 */
export function blindIndexTerm(
  indexKey: SecretBytes,
  indexVersion: number,
  value: Buffer,
  spec: readonly Normalization[],
  indexBytes: number,
  isText: boolean,
): Buffer {
  requireUint(indexVersion, 16, 'index key version');
  if (!Number.isInteger(indexBytes) || indexBytes < MIN_INDEX_BYTES || indexBytes > MAX_INDEX_BYTES) {
    throw new UnsupportedParameterError(
      `blind index length must be ${MIN_INDEX_BYTES}..${MAX_INDEX_BYTES} bytes, got ${indexBytes}`,
    );
  }
  const normalizes = spec.some((step) => step !== 'none');
  if (normalizes && !isText) {
    throw new KeyringError('BAD_NORMALIZATION', 'keyring: a bytea column admits only the normalisation "none"');
  }
  let message = value;
  if (normalizes) {
    let text: string;
    try {
      text = utf8.decode(value);
    } catch {
      throw new KeyringError('INVALID_UTF8', 'keyring: text value is not valid UTF-8 and cannot be indexed');
    }
    message = Buffer.from(normalize(text, spec), 'utf8');
  }
  // With "none" the bytes are hashed as they are: for valid UTF-8 that equals
  // decode-then-encode, and skips the work on the hot path.
  const mac = createHmac('sha256', indexKey.keyObject()).update(message).digest();
  const term = Buffer.allocUnsafe(2 + indexBytes);
  term.writeUInt16BE(indexVersion, 0);
  mac.copy(term, 2, 0, indexBytes);
  return term;
}
