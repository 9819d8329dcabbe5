import { describe, expect, it } from 'vitest';
import pg from 'pg';
import { formatTable, jsonValue, ProgressBar } from '../../src/cli/output.js';

describe('CLI output', () => {
  // node-postgres parses an interval (oid 1186) into an object; keyring status shows one.
  const interval = pg.types.getTypeParser(1186, 'text')('00:00:05.5');

  it('prints an interval as psql does, in the table and in JSON', () => {
    const table = formatTable([{ column_name: 'national_id', oldest_pending_age: interval }]);
    expect(table).not.toContain('{');
    expect(table).toMatch(/5\.5 seconds|00:00:05\.5/);
    expect(JSON.stringify({ age: interval }, jsonValue)).toMatch(/"age":"(5\.5 seconds|00:00:05\.5)"/);
  });

  it('aligns columns and counts rows', () => {
    const t = formatTable([{ a: 1, b: 'x' }, { a: 22, b: null }]).split('\n');
    expect(t[0]).toBe('a  | b');
    expect(t.at(-1)).toBe('(2 rows)');
  });

  it('a progress bar whose job outgrew its starting total shows the grown total, never done above total', () => {
    const lines: string[] = [];
    const stream = { isTTY: false, write: (t: string) => { lines.push(t); return true; } } as unknown as NodeJS.WriteStream;
    const bar = new ProgressBar('reencrypt job 4', 100_526, 'rows', stream);
    bar.update(54_000, true, { rate: 26_000, etaSeconds: 2 });
    bar.finish(100_811, { rate: 41_189, etaSeconds: 0 });
    expect(lines[0]).toBe('reencrypt job 4 [################..............] 54,000/100,526 26,000 rows/s ETA 2s\n');
    expect(lines[1]).toBe('reencrypt job 4 [##############################] 100,811/100,811 41,189 rows/s ETA 0s\n');
  });
});
