import { describe, expect, it } from 'vitest';
import pg from 'pg';
import { formatTable, jsonValue } from '../../src/cli/output.js';

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
});
