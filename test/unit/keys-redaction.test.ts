import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { generateKey } from '../../src/crypto/index.js';
import { createLogger } from '../../src/log.js';

function capture(): { lines: string[]; stream: Writable } {
  const lines: string[] = [];
  const stream = new Writable({ write(chunk, _enc, cb) { lines.push(String(chunk)); cb(); } });
  return { lines, stream };
}

describe('logger redaction', () => {
  it('redacts keys, values, plaintext, passwords and connection strings, and never prints SecretBytes', async () => {
    const { lines, stream } = capture();
    const log = createLogger({ level: 'info', destination: stream, bindings: { instance: 'i-1' } });
    const key = generateKey();
    const hex = key.use((b) => b.toString('hex'));
    log.info({
      key: hex, keys: [hex], value: 'marker-VALUE-1', plaintext: 'marker-PLAIN-2', password: 'pw-3',
      databaseUrl: 'postgres://u:pw-4@h/db', cfg: { password: 'pw-5', connectionString: 'postgres://u:pw-6@h/db' },
      err: { message: 'duplicate key', detail: 'Key (email)=(marker-DETAIL-7) already exists' },
      secret: key, nested: { secret: key },
    }, 'hello');
    log.info({ k: key }, 'a SecretBytes under an innocent name');
    await new Promise((r) => setImmediate(r));
    const out = lines.join('');
    for (const s of [hex, 'marker-VALUE-1', 'marker-PLAIN-2', 'pw-3', 'pw-4', 'pw-5', 'pw-6', 'marker-DETAIL-7']) {
      expect(out).not.toContain(s);
    }
    expect(out).toContain('[redacted]');
    expect(out).toContain('SecretBytes(<redacted>)');
    const first = JSON.parse(lines[0]!);
    expect(first).toMatchObject({ level: 'info', instance: 'i-1', msg: 'hello' });
  });
});
