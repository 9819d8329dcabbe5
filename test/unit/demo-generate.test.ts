// Synthetic demo customers: check-digit algorithms (src/demo/checksums.ts) and the
// deterministic generator / CSV writer (src/demo/generate.ts).
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  daysInMonth,
  iso7064Mod11_10,
  iso7064Mod97_10,
  isValidIban,
  isValidJmbg,
  isValidNorwegianId,
  isValidOib,
  makeIban,
  makeJmbg,
  makeNorwegianId,
  makeOib,
  norwegianAccountCheck,
} from '../../src/demo/checksums.js';
import {
  type Customer,
  MAX_CUSTOMERS,
  csvField,
  customerCsvLine,
  foldForEmail,
  generateCustomers,
  writeCustomersCsv,
} from '../../src/demo/generate.js';

/** Replaces the digit at position i with a different digit. */
function changeDigit(s: string, i: number): string {
  const d = s.charCodeAt(i) - 48;
  return s.slice(0, i) + String((d + 1) % 10) + s.slice(i + 1);
}

/** Minimal RFC 4180 parser for one record (no trailing newline). */
function parseCsvRecord(line: string): string[] {
  const fields: string[] = [];
  let i = 0;
  for (;;) {
    let field = '';
    if (line[i] === '"') {
      i++;
      for (;;) {
        const ch = line[i];
        if (ch === undefined) throw new Error('unterminated quoted field');
        if (ch === '"') {
          if (line[i + 1] === '"') {
            field += '"';
            i += 2;
          } else {
            i++;
            break;
          }
        } else {
          field += ch;
          i++;
        }
      }
    } else {
      while (i < line.length && line[i] !== ',') field += line[i++];
    }
    fields.push(field);
    if (i >= line.length) return fields;
    if (line[i] !== ',') throw new Error(`expected comma at ${i}`);
    i++;
  }
}

describe('Norwegian fødselsnummer', () => {
  // Hand-built: 15 Aug 1975, individual 123 → body 150875123.
  //   K1: digits 1 5 0 8 7 5 1 2 3 × weights 3 7 6 1 8 9 4 5 2
  //       = 3+35+0+8+56+45+4+10+6 = 167; 167 mod 11 = 2; K1 = 11 − 2 = 9.
  //   K2: digits 1 5 0 8 7 5 1 2 3 9 × weights 5 4 3 2 7 6 5 4 3 2
  //       = 5+20+0+16+49+30+5+8+9+18 = 160; 160 mod 11 = 6; K2 = 11 − 6 = 5.
  const GOOD = '15087512395';

  it('accepts the hand-built number and rejects a changed digit', () => {
    expect(makeNorwegianId({ year: 1975, month: 8, day: 15 }, 123)).toBe(GOOD);
    expect(isValidNorwegianId(GOOD)).toBe(true);
    expect(isValidNorwegianId(changeDigit(GOOD, 7))).toBe(false);
    expect(isValidNorwegianId(changeDigit(GOOD, 10))).toBe(false);
  });

  it('returns null when a check digit would be 10', () => {
    // Individual 128: K1 sum = 167 − 2·3 + 2·8 = 177 = 16·11 + 1 → K1 = 10 → no such number.
    expect(makeNorwegianId({ year: 1975, month: 8, day: 15 }, 128)).toBeNull();
    for (let k = 0; k <= 9; k++) expect(isValidNorwegianId(`150875128${k}5`)).toBe(false);
  });

  it('ties the individual number to the century', () => {
    expect(() => makeNorwegianId({ year: 1975, month: 8, day: 15 }, 600)).toThrow(RangeError);
    expect(() => makeNorwegianId({ year: 2003, month: 1, day: 2 }, 123)).toThrow(RangeError);
    const y2k = makeNorwegianId({ year: 2003, month: 1, day: 2 }, 512) ?? makeNorwegianId({ year: 2003, month: 1, day: 2 }, 513);
    expect(y2k).not.toBeNull();
    expect(isValidNorwegianId(y2k as string)).toBe(true);
    expect(() => makeNorwegianId({ year: 1975, month: 2, day: 29 }, 123)).toThrow(RangeError);
  });

  it('rejects malformed input', () => {
    for (const s of ['', '1508751239', '150875123955', '1508751239a', ' 15087512395']) {
      expect(isValidNorwegianId(s)).toBe(false);
    }
  });

  it('every group of ten individual numbers has at least 8 valid members (generator relies on ≥1)', () => {
    for (const year of [1940, 1972, 1999, 2000, 2004, 2005]) {
      for (let month = 1; month <= 12; month++) {
        for (let day = 1; day <= daysInMonth(year, month); day++) {
          const base = year >= 2000 ? 500 : 0;
          for (let g = 0; g < 50; g++) {
            let valid = 0;
            for (let k = 0; k < 10; k++) if (makeNorwegianId({ year, month, day }, base + g * 10 + k) !== null) valid++;
            if (valid < 8) throw new Error(`${year}-${month}-${day} group ${g}: ${valid} valid`);
          }
        }
      }
    }
  });
});

describe('Croatian OIB (ISO 7064 MOD 11,10)', () => {
  // Hand-built from 1234567890; a starts at 10; per digit d: a = (a + d) mod 10 (0 → 10), a = 2a mod 11.
  //   1: 1→2   2: 4→8   3: 11→1→2   4: 6→1   5: 6→1   6: 7→3   7: 10→0→10→9
  //   8: 17→7→3   9: 12→2→4   0: 4→8.  Check = 11 − 8 = 3.
  const GOOD = '12345678903';

  it('accepts the hand-built number and rejects a changed digit', () => {
    expect(makeOib('1234567890')).toBe(GOOD);
    expect(isValidOib(GOOD)).toBe(true);
    expect(isValidOib(changeDigit(GOOD, 4))).toBe(false);
    expect(isValidOib(changeDigit(GOOD, 10))).toBe(false);
  });

  it('rejects malformed input', () => {
    expect(isValidOib('1234567890')).toBe(false);
    expect(isValidOib('1234567890x')).toBe(false);
    expect(() => makeOib('123456789')).toThrow(RangeError);
  });
});

describe('Serbian JMBG', () => {
  // Hand-built: 01.01.1990, region 71, serial 012 → digits a..l = 0 1 0 1 9 9 0 7 1 0 1 2.
  //   7(0+0) + 6(1+7) + 5(0+1) + 4(1+0) + 3(9+1) + 2(9+2) = 0+48+5+4+30+22 = 109;
  //   109 mod 11 = 10; K = 11 − 10 = 1.
  const GOOD = '0101990710121';

  it('accepts the hand-built number and rejects a changed digit', () => {
    expect(makeJmbg({ year: 1990, month: 1, day: 1 }, 71, 12)).toBe(GOOD);
    expect(isValidJmbg(GOOD)).toBe(true);
    expect(isValidJmbg(changeDigit(GOOD, 8))).toBe(false);
    expect(isValidJmbg(changeDigit(GOOD, 12))).toBe(false);
  });

  it('maps a raw result of 11 to 0 and treats 10 as invalid', () => {
    // Serial 018: sum = 109 − 2·2 + 2·8 = 121 = 11·11 → raw 11 → K = 0.
    expect(makeJmbg({ year: 1990, month: 1, day: 1 }, 71, 18)).toBe('0101990710180');
    expect(isValidJmbg('0101990710180')).toBe(true);
    // Serial 013: sum = 109 − 4 + 6 = 111 = 10·11 + 1 → raw 10 → no valid control digit.
    expect(makeJmbg({ year: 1990, month: 1, day: 1 }, 71, 13)).toBeNull();
    for (let k = 0; k <= 9; k++) expect(isValidJmbg(`010199071013${k}`)).toBe(false);
  });

  it('rejects impossible dates and malformed input', () => {
    expect(isValidJmbg('3102990710121')).toBe(false);
    expect(isValidJmbg('010199071012')).toBe(false);
    expect(() => makeJmbg({ year: 1990, month: 1, day: 1 }, 100, 12)).toThrow(RangeError);
  });
});

describe('IBAN (ISO 13616 mod 97)', () => {
  // Hand-built NO IBAN for BBAN 12345678903: move "NO00" to the end, letters → N=23, O=24:
  //   12345678903 2324 00. Piecewise mod 97: 123456789 mod 97 = 39 (97·1272750 = 123456750);
  //   then 39|03232400 = 3903232400 mod 97 = 27 (97·40239509 = 3903232373). Check = 98 − 27 = 71.
  const GOOD = 'NO7112345678903';

  it('accepts the hand-built IBAN and rejects a changed digit', () => {
    expect(makeIban('NO', '12345678903')).toBe(GOOD);
    expect(isValidIban(GOOD)).toBe(true);
    expect(isValidIban(changeDigit(GOOD, 9))).toBe(false);
    expect(isValidIban(changeDigit(GOOD, 3))).toBe(false);
  });

  it('accepts the SWIFT registry example IBANs for NO, HR, RS and DE', () => {
    for (const iban of ['NO9386011117947', 'HR1210010051863000160', 'RS35260005601001611379', 'DE89370400440532013000']) {
      expect(isValidIban(iban)).toBe(true);
      expect(makeIban(iban.slice(0, 2), iban.slice(4))).toBe(iban);
    }
  });

  it('enforces shape, registry length and check-digit range', () => {
    expect(isValidIban('no7112345678903')).toBe(false);
    expect(isValidIban('NO71 1234 5678 903')).toBe(false);
    expect(isValidIban('NO71123456789030')).toBe(false); // 16 chars for NO
    expect(() => makeIban('DE', '12345')).toThrow(RangeError);
    expect(() => makeIban('de', '370400440532013000')).toThrow(RangeError);
  });
});

describe('generateCustomers', () => {
  const ROWS = 100_000;
  let rows: Customer[] = [];
  let millis = 0;

  beforeAll(() => {
    const t0 = performance.now();
    rows = [...generateCustomers(ROWS)];
    millis = performance.now() - t0;
  });

  it('generates the requested rows with ids 1..count', () => {
    console.info(`generateCustomers(${ROWS}) took ${millis.toFixed(0)} ms`);
    expect(rows).toHaveLength(ROWS);
    rows.forEach((c, i) => {
      if (c.id !== i + 1) throw new Error(`row ${i} has id ${c.id}`);
    });
  });

  it('every identifier in a 20 000-row sample passes its validator and national conventions', () => {
    const regions = new Set([71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 91, 92, 93, 94, 95, 96]);
    const email = /^[a-z0-9-]+\.[a-z0-9-]+\.([0-9]+)@example\.test$/;
    for (const c of rows.slice(0, 20_000)) {
      const problems: string[] = [];
      if (!isValidNorwegianId(c.nationalId)) problems.push('nationalId');
      if (!isValidOib(c.oib)) problems.push('oib');
      if (!isValidJmbg(c.jmbg)) problems.push('jmbg');
      if (!isValidIban(c.iban)) problems.push('iban');
      if (email.exec(c.email)?.[1] !== String(c.id)) problems.push('email');

      // One birth date and sex per person across fødselsnummer and JMBG; births 1940–2005.
      const yy = Number(c.nationalId.slice(4, 6));
      const year = Number(c.nationalId.slice(6, 9)) >= 500 ? 2000 + yy : 1900 + yy;
      if (year < 1940 || year > 2005) problems.push('birth year');
      if (c.jmbg.slice(0, 4) !== c.nationalId.slice(0, 4) || c.jmbg.slice(4, 7) !== String(year).slice(1)) problems.push('birth date');
      const male = Number(c.nationalId[8]) % 2 === 1;
      if (male !== Number(c.jmbg.slice(9, 12)) < 500) problems.push('sex');
      if (!regions.has(Number(c.jmbg.slice(7, 9)))) problems.push('region');

      // National BBAN check digits where the country has a simple one.
      const bban = c.iban.slice(4);
      const country = c.iban.slice(0, 2);
      if (country === 'NO' && norwegianAccountCheck(bban.slice(0, 10)) !== Number(bban[10])) problems.push('NO account');
      if (country === 'HR' && (iso7064Mod11_10(bban.slice(0, 6)) !== Number(bban[6]) || iso7064Mod11_10(bban.slice(7, 16)) !== Number(bban[16]))) {
        problems.push('HR account');
      }
      if (country === 'RS' && iso7064Mod97_10(bban.slice(0, 16)) !== bban.slice(16)) problems.push('RS account');
      if (!['NO', 'HR', 'RS', 'DE'].includes(country)) problems.push('country');

      if (problems.length > 0) throw new Error(`row ${c.id} ${JSON.stringify(c)}: ${problems.join(', ')}`);
    }
  });

  it('every identifier and email is unique over 100 000 rows', () => {
    for (const key of ['nationalId', 'oib', 'jmbg', 'iban', 'email'] as const) {
      expect(new Set(rows.map((c) => c[key])).size, key).toBe(ROWS);
    }
  });

  it('mixes all IBAN countries and uses non-ASCII names', () => {
    const countries = new Set(rows.slice(0, 1000).map((c) => c.iban.slice(0, 2)));
    expect([...countries].sort()).toEqual(['DE', 'HR', 'NO', 'RS']);
    const nonAscii = rows.slice(0, 1000).filter((c) => /[^\x20-\x7e]/.test(c.name));
    expect(nonAscii.length).toBeGreaterThan(100);
    expect(nonAscii.some((c) => /[øå]/i.test(c.name))).toBe(true);
    expect(nonAscii.some((c) => /[čćšžđ]/i.test(c.name))).toBe(true);
  });

  it('is deterministic by seed, and a shorter run is a prefix of a longer one', () => {
    expect([...generateCustomers(2000)]).toEqual(rows.slice(0, 2000));
    expect([...generateCustomers(300, 42)]).toEqual(rows.slice(0, 300));
    const other = [...generateCustomers(2000, 7)];
    expect([...generateCustomers(2000, 7)]).toEqual(other);
    const same = other.filter((c, i) => c.nationalId === rows[i]?.nationalId || c.oib === rows[i]?.oib);
    expect(same.length).toBeLessThan(5);
  });

  it('validates arguments on the call', () => {
    expect(MAX_CUSTOMERS).toBeGreaterThanOrEqual(1_000_000);
    expect(() => generateCustomers(-1)).toThrow(RangeError);
    expect(() => generateCustomers(1.5)).toThrow(RangeError);
    expect(() => generateCustomers(MAX_CUSTOMERS + 1)).toThrow(RangeError);
    expect(() => generateCustomers(10, Number.NaN)).toThrow(RangeError);
    expect([...generateCustomers(0)]).toEqual([]);
  });

  it('folds names to ASCII for emails', () => {
    expect(foldForEmail('Øystein')).toBe('oystein');
    expect(foldForEmail('Đorđević')).toBe('djordjevic');
    expect(foldForEmail('Šćepanović')).toBe('scepanovic');
    expect(foldForEmail("O'Connor")).toBe('oconnor');
    expect(foldForEmail('van der Berg')).toBe('van-der-berg');
    expect(foldForEmail('Løvås Sæther')).toBe('lovas-saether');
  });
});

describe('CSV', () => {
  const tricky: Customer = {
    id: 1,
    name: 'Ana "Anči" Kovačević, Jr.',
    email: 'ana.kovacevic.1@example.test',
    nationalId: '15087512395',
    oib: '12345678903',
    jmbg: '0101990710121',
    iban: 'NO7112345678903',
  };

  it('quotes only fields that need it', () => {
    expect(csvField('plain')).toBe('plain');
    expect(csvField('a,b')).toBe('"a,b"');
    expect(csvField('say "hi"')).toBe('"say ""hi"""');
    expect(csvField('two\nlines')).toBe('"two\nlines"');
    const plain = customerCsvLine({ ...tricky, name: 'Ola Nordmann' });
    expect(plain).toBe('Ola Nordmann,ana.kovacevic.1@example.test,15087512395,12345678903,0101990710121,NO7112345678903\n');
  });

  it('round-trips a name containing a comma and a quote', () => {
    const line = customerCsvLine(tricky);
    expect(line).toBe('"Ana ""Anči"" Kovačević, Jr.",ana.kovacevic.1@example.test,15087512395,12345678903,0101990710121,NO7112345678903\n');
    expect(line.endsWith('\n')).toBe(true);
    expect(parseCsvRecord(line.slice(0, -1))).toEqual([tricky.name, tricky.email, tricky.nationalId, tricky.oib, tricky.jmbg, tricky.iban]);
  });

  describe('writeCustomersCsv', () => {
    let dir = '';
    beforeAll(async () => {
      dir = await mkdtemp(join(tmpdir(), 'keyring-demo-csv-'));
    });
    afterAll(async () => {
      if (dir) await rm(dir, { recursive: true, force: true });
    });

    it('streams the expected lines to disk', async () => {
      const path = join(dir, 'customers.csv');
      const result = await writeCustomersCsv(path, 5000, 11);
      const text = await readFile(path, 'utf8');
      expect(result.rows).toBe(5000);
      expect(result.bytes).toBe((await stat(path)).size);
      expect(text.split('\n')).toHaveLength(5001); // 5000 lines + empty string after the final '\n'
      expect(text).toBe([...generateCustomers(5000, 11)].map(customerCsvLine).join(''));
      for (const line of text.slice(0, -1).split('\n')) expect(parseCsvRecord(line)).toHaveLength(6);
    });

    it('writes an empty file for zero rows and rejects bad counts before touching disk', async () => {
      const path = join(dir, 'empty.csv');
      expect(await writeCustomersCsv(path, 0)).toEqual({ rows: 0, bytes: 0 });
      expect((await stat(path)).size).toBe(0);
      await expect(writeCustomersCsv(join(dir, 'never.csv'), -5)).rejects.toThrow(RangeError);
      await expect(stat(join(dir, 'never.csv'))).rejects.toThrow();
    });
  });
});
