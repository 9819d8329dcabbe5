import type pg from 'pg';

/**
 * Splits SQL text into statements the way the server's lexer sees them: semicolons inside
 * comments (-- and nested block comments), string literals ('...', E'...'), quoted
 * identifiers and dollar-quoted bodies do not end a statement. Returns each statement
 * without comments, trimmed; empty ones (a file of only comments) are dropped.
 */
export function splitStatements(sql: string): string[] {
  const out: string[] = [];
  let current = '';
  let i = 0;
  const n = sql.length;
  while (i < n) {
    const ch = sql[i]!;
    const next = sql[i + 1];
    if (ch === '-' && next === '-') {
      const end = sql.indexOf('\n', i);
      i = end < 0 ? n : end;
      current += ' ';
      continue;
    }
    if (ch === '/' && next === '*') {
      let depth = 1;
      i += 2;
      while (i < n && depth > 0) {
        if (sql[i] === '/' && sql[i + 1] === '*') { depth++; i += 2; }
        else if (sql[i] === '*' && sql[i + 1] === '/') { depth--; i += 2; }
        else i++;
      }
      current += ' ';
      continue;
    }
    if (ch === "'" ) {
      const escapes = /[eE]$/.test(current) && !/[A-Za-z0-9_][eE]$/.test(current);
      let j = i + 1;
      while (j < n) {
        if (escapes && sql[j] === '\\') { j += 2; continue; }
        if (sql[j] === "'") {
          if (sql[j + 1] === "'") { j += 2; continue; }
          break;
        }
        j++;
      }
      current += sql.slice(i, j + 1);
      i = j + 1;
      continue;
    }
    if (ch === '"') {
      let j = i + 1;
      while (j < n && !(sql[j] === '"' && sql[j + 1] !== '"')) j += sql[j] === '"' ? 2 : 1;
      current += sql.slice(i, j + 1);
      i = j + 1;
      continue;
    }
    if (ch === '$') {
      const tag = /^\$([A-Za-z_][A-Za-z0-9_]*)?\$/.exec(sql.slice(i));
      // $1 parameters and identifiers containing $ are not dollar quotes
      if (tag && !/[A-Za-z0-9_$]$/.test(current)) {
        const close = sql.indexOf(tag[0], i + tag[0].length);
        const end = close < 0 ? n : close + tag[0].length;
        current += sql.slice(i, end);
        i = end;
        continue;
      }
    }
    if (ch === ';') {
      if (current.trim() !== '') out.push(current.trim());
      current = '';
      i++;
      continue;
    }
    current += ch;
    i++;
  }
  if (current.trim() !== '') out.push(current.trim());
  return out;
}

/** The error a promise rejects with (fails the test if it resolves). */
export async function pgError(p: Promise<unknown>): Promise<pg.DatabaseError> {
  try {
    await p;
  } catch (err) {
    return err as pg.DatabaseError;
  }
  throw new Error('expected the statement to fail, it succeeded');
}

/** A fake format-1 ciphertext (header, IV, 16-byte "tag") naming data key `dataKeyId`. */
export function fakeCiphertext(dataKeyId: number, body = 'opaque'): Buffer {
  const header = Buffer.alloc(9);
  header[0] = 1;
  header.writeBigUInt64BE(BigInt(dataKeyId), 1);
  return Buffer.concat([header, Buffer.alloc(12, 7), Buffer.from(body), Buffer.alloc(16, 9)]);
}

/** A 32-hex-digit fingerprint derived from a label (the registry's check value format). */
export function fingerprint(label: string): string {
  return Buffer.from(label.padEnd(16, '.').slice(0, 16)).toString('hex');
}
