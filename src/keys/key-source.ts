/**
 * Reads root key material from the environment or a key file. Problems are appended to
 * `problems` (one line each, naming the variable and the key's position) so that
 * config validation reports everything at once; no line ever quotes a key.
 */
import { readFileSync, statSync } from 'node:fs';
import { z } from 'zod';
import { KeyringError, parseKeyHex, type KeyPurpose } from '../crypto/index.js';
import { KEY_PURPOSES, type LabeledKey, type RootKeyMaterial } from './material.js';

const ENV_VAR: Record<KeyPurpose, string> = { encrypt: 'KEYRING_ENCRYPT_KEYS', index: 'KEYRING_INDEX_KEYS' };

const keyFileSchema = z.strictObject({
  encrypt: z.array(z.string()).default([]),
  index: z.array(z.string()).default([]),
  comment: z.string().optional(),
});

const isSet = (v: string | undefined): v is string => v !== undefined && v.trim() !== '';

function parseList(hexes: readonly string[], label: (i: number) => string, problems: string[]): LabeledKey[] {
  const out: LabeledKey[] = [];
  hexes.forEach((hex, i) => {
    try {
      out.push({ label: label(i), key: parseKeyHex(hex, label(i)) });
    } catch (err) {
      // WeakKeyError names the label and the problem, never the key.
      problems.push(err instanceof KeyringError ? err.message.replace(/^keyring: /, '') : `${label(i)} is not a valid key`);
    }
  });
  return out;
}

function readKeyFile(path: string, problems: string[]): { encrypt: string[]; index: string[] } | undefined {
  let mode: number;
  try {
    mode = statSync(path).mode;
  } catch {
    problems.push(`KEYRING_KEY_FILE ${path} cannot be read (missing or no permission)`);
    return undefined;
  }
  // Group/other access would let another local account read (or swap) the root keys.
  if ((mode & 0o077) !== 0) {
    problems.push(
      `KEYRING_KEY_FILE ${path} is accessible by group or others (mode ${(mode & 0o777).toString(8).padStart(4, '0')}); ` +
        `run \`chmod 600 ${path}\``,
    );
    return undefined;
  }
  let json: unknown;
  try {
    json = JSON.parse(readFileSync(path, 'utf8'));
  } catch {
    // JSON.parse messages quote the text around the error: that could be key material.
    problems.push(`KEYRING_KEY_FILE ${path} is not valid JSON`);
    return undefined;
  }
  const parsed = keyFileSchema.safeParse(json);
  if (!parsed.success) {
    for (const issue of parsed.error.issues) {
      const where = issue.path.length > 0 ? ` field ${issue.path.join('.')}` : '';
      problems.push(`KEYRING_KEY_FILE${where}: ${issue.code === 'unrecognized_keys' ? 'unknown field (expected encrypt, index, comment)' : issue.message}`);
    }
    return undefined;
  }
  return { encrypt: parsed.data.encrypt, index: parsed.data.index };
}

/** Refuses one key given twice, or one key used for both purposes. */
function checkDistinct(m: { encrypt: LabeledKey[]; index: LabeledKey[] }, problems: string[]): void {
  const all = [...m.encrypt, ...m.index];
  for (let i = 0; i < all.length; i++) {
    for (let j = i + 1; j < all.length; j++) {
      const a = all[i]!;
      const b = all[j]!;
      if (a.key.equals(b.key)) problems.push(`${a.label} and ${b.label} are the same key; every root key must be distinct`);
    }
  }
}

/**
 * The configured root keys, or undefined when a source problem was recorded. A set
 * variable may list no key at all (an empty store): the key registry check then names
 * the versions whose material is missing (case C01).
 */
export function loadKeyMaterial(env: NodeJS.ProcessEnv, problems: string[]): RootKeyMaterial | undefined {
  const file = env.KEYRING_KEY_FILE;
  const fromEnv = KEY_PURPOSES.filter((p) => env[ENV_VAR[p]] !== undefined);
  if (isSet(file) && fromEnv.some((p) => isSet(env[ENV_VAR[p]]))) {
    problems.push('KEYRING_KEY_FILE and KEYRING_ENCRYPT_KEYS/KEYRING_INDEX_KEYS are both set; use one key source');
    return undefined;
  }
  const before = problems.length;
  let out: { encrypt: LabeledKey[]; index: LabeledKey[] };
  let source: RootKeyMaterial['source'];
  if (isSet(file)) {
    const raw = readKeyFile(file.trim(), problems);
    if (!raw) return undefined;
    source = 'file';
    out = {
      encrypt: parseList(raw.encrypt, (i) => `KEYRING_KEY_FILE encrypt[${i}]`, problems),
      index: parseList(raw.index, (i) => `KEYRING_KEY_FILE index[${i}]`, problems),
    };
  } else if (fromEnv.length > 0) {
    source = 'env';
    const list = (p: KeyPurpose): string[] => (env[ENV_VAR[p]] ?? '').split(',').filter((s) => s.trim() !== '');
    out = {
      encrypt: parseList(list('encrypt'), (i) => `${ENV_VAR.encrypt}[${i}]`, problems),
      index: parseList(list('index'), (i) => `${ENV_VAR.index}[${i}]`, problems),
    };
  } else {
    problems.push('no key source: set KEYRING_ENCRYPT_KEYS and KEYRING_INDEX_KEYS, or KEYRING_KEY_FILE (generate keys with `keyring keygen`)');
    return undefined;
  }
  if (problems.length === before) checkDistinct(out, problems);
  if (problems.length > before) {
    for (const k of [...out.encrypt, ...out.index]) k.key.dispose();
    return undefined;
  }
  return Object.freeze({ source, encrypt: Object.freeze(out.encrypt), index: Object.freeze(out.index) });
}
