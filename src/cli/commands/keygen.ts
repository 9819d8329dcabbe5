import { existsSync, readFileSync, writeFileSync, chmodSync } from 'node:fs';
import { generateKey } from '../../crypto/index.js';
import { parse, type Command } from '../command.js';
import { usageError } from '../errors.js';

export interface KeyFile {
  comment?: string;
  encrypt: string[];
  index: string[];
}

/** Appends a fresh key of `purpose` to a key file, creating it with mode 0600. */
export function appendToKeyFile(path: string, purpose: 'encrypt' | 'index', comment?: string): void {
  const file: KeyFile = existsSync(path)
    ? (JSON.parse(readFileSync(path, 'utf8')) as KeyFile)
    : { ...(comment ? { comment } : {}), encrypt: [], index: [] };
  file[purpose] = [...(file[purpose] ?? []), generateKey().use((b) => b.toString('hex'))];
  writeFileSync(path, `${JSON.stringify(file, null, 2)}\n`, { mode: 0o600 });
  chmodSync(path, 0o600);
}

export const keygenCommand: Command = {
  name: 'keygen',
  summary: 'generate a root key: 32 CSPRNG bytes as hex',
  help: `Usage: keyring keygen [--key-file PATH --purpose encrypt|index]

Without options, prints 32 bytes from the operating system's CSPRNG as 64 hex digits,
for KEYRING_ENCRYPT_KEYS / KEYRING_INDEX_KEYS or your secret store.
With --key-file, appends a new key of the given purpose to that JSON key file instead
(created with mode 0600) and prints nothing secret.`,
  async run(args, _env, out) {
    const { values } = parse(args, { 'key-file': { type: 'string' }, purpose: { type: 'string' } });
    if (values['key-file']) {
      const purpose = values.purpose;
      if (purpose !== 'encrypt' && purpose !== 'index') throw usageError('--purpose must be encrypt or index');
      appendToKeyFile(values['key-file'], purpose);
      out.line(`added a new ${purpose} key to ${values['key-file']}`);
      return 0;
    }
    if (values.purpose) throw usageError('--purpose goes with --key-file');
    out.line(generateKey().use((b) => b.toString('hex')));
    return 0;
  },
};
