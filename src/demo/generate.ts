/**
 * Deterministic synthetic customers for the demo.
 *
 * No real persons: names are combined at random from small built-in lists and every
 * identifier is produced from a seeded PRNG, so the same seed always yields the same rows.
 *
 * Uniqueness without a Set: each identifier is derived from the row index through a
 * seeded bijection (a Feistel network with cycle walking), so distinct rows get distinct
 * "payload slots"; the remaining free digit is searched inside the row's own slot only.
 *
 *   fødselsnummer  slot = (birth day 1940-01-01..2005-12-31, first two digits of the
 *                  individual number) → 24 107 days × 50 = 1 205 350 slots; the last
 *                  individual digit is the first of 10 candidates whose check digits exist.
 *                  At least 8 of the 10 always do: K1 ≡ −S₁ − 2·i₃ and
 *                  K2 ≡ −(S₂' + 3·i₃ + 2·K1) ≡ i₃ − c (mod 11), so each of K1 and K2 is
 *                  "10" for at most one i₃.
 *   JMBG           same birth date; (region, serial parity) is injective in the Norwegian
 *                  slot's two digits, so it is unique whenever the fødselsnummer slot is.
 *                  Serial range follows the sex encoded in the fødselsnummer; the last
 *                  serial digit (weight 2) skips the single value whose control would be 10.
 *   OIB            first ten digits = 1 000 000 000 + π(row) over 9·10⁹.
 *   IBAN           account digits = π(row) over 9·10⁸ per row; country is chosen per row,
 *                  so IBANs are unique within and across countries.
 *   email          contains the row id.
 */
import { createWriteStream } from 'node:fs';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import {
  type CalendarDate,
  daysInMonth,
  iso7064Mod11_10,
  iso7064Mod97_10,
  makeIban,
  makeJmbg,
  makeNorwegianId,
  makeOib,
  norwegianAccountCheck,
} from './checksums.js';

export interface Customer {
  id: number;
  name: string;
  email: string;
  nationalId: string;
  oib: string;
  jmbg: string;
  iban: string;
}

export const DEFAULT_SEED = 42;

// ---------------------------------------------------------------------------
// Seeded randomness
// ---------------------------------------------------------------------------

/** 32-bit integer finaliser (MurmurHash3 fmix32 constants); returns an unsigned 32-bit int. */
function mix32(x: number): number {
  let h = x | 0;
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/** Hash of a seed and a domain-separation salt into 32 bits. */
function deriveKey(seed: number, salt: number): number {
  const lo = seed >>> 0;
  const hi = Math.floor(seed / 0x1_0000_0000) >>> 0;
  return mix32(mix32(lo ^ Math.imul(salt, 0x9e3779b1)) ^ mix32(hi + 0x632be5ab));
}

/** mulberry32: small, fast 32-bit PRNG. `next()` returns an unsigned 32-bit integer. */
class Mulberry32 {
  private state: number;

  constructor(seed: number) {
    this.state = seed | 0;
  }

  next(): number {
    this.state = (this.state + 0x6d2b79f5) | 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }

  /** Integer in [0, n) for 1 ≤ n ≤ 2³² (multiply-shift; bias ≤ n / 2³², irrelevant here). */
  below(n: number): number {
    return Math.floor((this.next() / 0x1_0000_0000) * n);
  }

  pick<T>(items: readonly T[]): T {
    return items[this.below(items.length)] as T;
  }
}

/**
 * Seeded bijection on [0, size): a 4-round balanced Feistel network on 2^(2·halfBits) ≥ size
 * values, restricted to [0, size) by cycle walking (re-apply until the value lands in range;
 * this terminates because the walk stays on the cycle of the starting value). size ≤ 2⁵².
 */
class FeistelPermutation {
  private readonly half: number;
  private readonly mask: number;
  private readonly keys: number[];

  constructor(
    readonly size: number,
    key: number,
  ) {
    let bits = 1;
    while (2 ** (2 * bits) < size) bits++;
    if (bits > 26) throw new RangeError('FeistelPermutation: domain too large');
    this.half = 2 ** bits;
    this.mask = this.half - 1;
    const rng = new Mulberry32(key);
    this.keys = [rng.next(), rng.next(), rng.next(), rng.next()];
  }

  apply(x: number): number {
    let y = x;
    do y = this.encrypt(y);
    while (y >= this.size);
    return y;
  }

  private encrypt(x: number): number {
    let l = Math.floor(x / this.half);
    let r = x - l * this.half;
    for (const k of this.keys) {
      const f = mix32(Math.imul(r ^ k, 0x9e3779b1) + k) & this.mask;
      const nl = r;
      r = (l ^ f) & this.mask;
      l = nl;
    }
    return l * this.half + r;
  }
}

// ---------------------------------------------------------------------------
// Name lists (invented combinations of common given names and surnames)
// ---------------------------------------------------------------------------

interface NamePool {
  first: readonly string[];
  last: readonly string[];
}

const NAME_POOLS: readonly NamePool[] = [
  {
    // Norwegian
    first: ['Ola', 'Kari', 'Øystein', 'Åse', 'Bjørn', 'Ingrid', 'Håkon', 'Sigrid', 'Torbjørn', 'Solveig', 'Jørgen', 'Marte', 'Ståle', 'Live', 'Eirik', 'Ragnhild', 'Sindre', 'Tone', 'Kjetil', 'Synnøve'],
    last: ['Hansen', 'Johansen', 'Olsen', 'Larsen', 'Berg', 'Dahl', 'Ødegård', 'Løvås', 'Sæther', 'Haugen', 'Bakke', 'Strøm', 'Kvåle', 'Nygård', 'Solberg', 'Fjeldstad', 'Grønli', 'Aasen', 'Myhre', 'Lie'],
  },
  {
    // Croatian
    first: ['Ivan', 'Ana', 'Luka', 'Marija', 'Petra', 'Matej', 'Željko', 'Ivana', 'Đuro', 'Mateja', 'Krešimir', 'Nikolina', 'Tomislav', 'Lucija', 'Hrvoje', 'Dubravka', 'Zvonimir', 'Ružica', 'Ante', 'Snježana'],
    last: ['Horvat', 'Kovačević', 'Babić', 'Marić', 'Jurić', 'Novak', 'Knežević', 'Vuković', 'Šarić', 'Perić', 'Božić', 'Grgić', 'Pavić', 'Lovrić', 'Tomić', 'Matić', 'Radić', 'Blažević', 'Kos', 'Žužul'],
  },
  {
    // Serbian (Latin script)
    first: ['Nikola', 'Jelena', 'Marko', 'Milica', 'Stefan', 'Dušan', 'Đorđe', 'Ljiljana', 'Nemanja', 'Jovana', 'Miloš', 'Tijana', 'Aleksandar', 'Dragana', 'Vuk', 'Sanja', 'Bojan', 'Gordana', 'Uroš', 'Tamara'],
    last: ['Jovanović', 'Petrović', 'Nikolić', 'Marković', 'Đorđević', 'Stojanović', 'Ilić', 'Živković', 'Pavlović', 'Todorović', 'Stanković', 'Ristić', 'Kostić', 'Lazić', 'Cvetković', 'Mitić', 'Popović', 'Savić', 'Obradović', 'Šćepanović'],
  },
  {
    // A few others
    first: ['Emma', 'Liam', 'Sofia', 'Lukas', 'Anna', 'Jonas', 'Chloé', 'José', 'Zoë', 'Mia', 'Noah', 'Aoife', 'Björn', 'Léa', 'Mateo', 'Siobhán', 'Jürgen', 'Agnieszka', 'Mehmet', 'Yuki'],
    last: ['Müller', 'Schmidt', 'García', "O'Connor", 'Smith', 'Dubois', 'Rossi', 'Nowak', 'Andersson', 'Weiß', 'Fernández', 'van der Berg', 'Kowalczyk', 'Yılmaz', 'Murphy', 'Lefèvre', 'Novák', 'Ferreira', 'Łukasiewicz', 'Jensen-Holm'],
  },
];

/** Letters that Unicode decomposition does not reduce to ASCII. */
const FOLD_SPECIAL: Readonly<Record<string, string>> = {
  ø: 'o', æ: 'ae', đ: 'dj', ß: 'ss', ł: 'l', ı: 'i', œ: 'oe', þ: 'th', ð: 'd',
};

/**
 * Lower-cases and ASCII-folds a name for an e-mail local part: strips diacritics
 * (č → c, å → a), maps ø/æ/đ/ß/ł/…, turns spaces into hyphens, and drops anything
 * outside [a-z0-9-].
 */
export function foldForEmail(name: string): string {
  return name
    .toLowerCase()
    .replace(/[øæđßłıœþð]/g, (ch) => FOLD_SPECIAL[ch] ?? '')
    .normalize('NFD')
    .replace(/\p{M}/gu, '')
    .replace(/\s+/g, '-')
    .replace(/[^a-z0-9-]/g, '');
}

interface FoldedPool {
  first: readonly (readonly [string, string])[];
  last: readonly (readonly [string, string])[];
}

const FOLDED_POOLS: readonly FoldedPool[] = NAME_POOLS.map((p) => ({
  first: p.first.map((n) => [n, foldForEmail(n)] as const),
  last: p.last.map((n) => [n, foldForEmail(n)] as const),
}));

// ---------------------------------------------------------------------------
// Identifier tables
// ---------------------------------------------------------------------------

const FIRST_YEAR = 1940;
const LAST_YEAR = 2005;

/** Every day from FIRST_YEAR-01-01 to LAST_YEAR-12-31 in order (24 107 days). */
const BIRTH_DAYS: readonly CalendarDate[] = (() => {
  const out: CalendarDate[] = [];
  for (let year = FIRST_YEAR; year <= LAST_YEAR; year++) {
    for (let month = 1; month <= 12; month++) {
      const n = daysInMonth(year, month);
      for (let day = 1; day <= n; day++) out.push({ year, month, day });
    }
  }
  return out;
})();

/** Groups of ten individual numbers per century half: 000–499 or 500–999. */
const NO_GROUPS_PER_DAY = 50;
const NO_SLOTS = BIRTH_DAYS.length * NO_GROUPS_PER_DAY;

/** Largest supported `count`; bounded by the fødselsnummer slots (1 205 350). */
export const MAX_CUSTOMERS = NO_SLOTS;

/** Serbian JMBG region codes: 71–79 central Serbia, 80–89 Vojvodina, 91–96 Kosovo and Metohija. */
const RS_REGIONS: readonly number[] = [
  ...Array.from({ length: 9 }, (_, i) => 71 + i),
  ...Array.from({ length: 10 }, (_, i) => 80 + i),
  ...Array.from({ length: 6 }, (_, i) => 91 + i),
];

const OIB_SPACE = 9_000_000_000;
const ACCOUNT_SPACE = 900_000_000;

/** Croatian bank codes: six invented digits; the seventh (MOD 11,10) is appended at load. */
const HR_BANKS: readonly string[] = ['234000', '240200', '248400', '236000', '250300', '241200'].map(
  (b) => b + iso7064Mod11_10(b),
);
/** Serbian bank codes (3 digits, invented). */
const RS_BANKS: readonly string[] = ['160', '170', '205', '265', '325', '340', '355'];

type IbanCountry = 'NO' | 'HR' | 'RS' | 'DE';
/** Country mix for IBANs: weights out of 20. */
const IBAN_MIX: readonly IbanCountry[] = [
  ...Array<IbanCountry>(6).fill('NO'),
  ...Array<IbanCountry>(5).fill('HR'),
  ...Array<IbanCountry>(5).fill('RS'),
  ...Array<IbanCountry>(4).fill('DE'),
];

function pad(n: number, width: number): string {
  return String(n).padStart(width, '0');
}

function makeAccountIban(country: IbanCountry, account: number, rng: Mulberry32): string {
  // account ∈ [0, 9·10⁸): unique per row. 100 000 000 + account has exactly 9 digits.
  const nine = String(100_000_000 + account);
  switch (country) {
    case 'NO': {
      // 11 digits: bank(4) + account(6) + MOD11 check. The first 9 digits are the unique
      // part; the 10th is the first of 10 candidates (weight 2 → at most one bad) whose
      // check digit exists.
      const start = rng.below(10);
      for (let k = 0; k < 10; k++) {
        const ten = nine + ((start + k) % 10);
        const check = norwegianAccountCheck(ten);
        if (check !== null) return makeIban('NO', ten + check);
      }
      throw new Error('unreachable: no Norwegian account check digit');
    }
    case 'HR': {
      // 17 digits: bank(7, MOD 11,10) + account(10 = 9 + MOD 11,10).
      return makeIban('HR', rng.pick(HR_BANKS) + nine + iso7064Mod11_10(nine));
    }
    case 'RS': {
      // 18 digits: bank(3) + account(13, zero-padded) + ISO 7064 MOD 97-10 check(2).
      const body = rng.pick(RS_BANKS) + pad(account, 13);
      return makeIban('RS', body + iso7064Mod97_10(body));
    }
    case 'DE': {
      // 18 digits: Bankleitzahl(8) + account(10); bank-specific account checks not modelled.
      const blz = String(1 + rng.below(8)) + pad(rng.below(10_000_000), 7);
      return makeIban('DE', blz + String(1 + rng.below(9)) + nine);
    }
  }
}

// ---------------------------------------------------------------------------
// Generator
// ---------------------------------------------------------------------------

function assertArgs(count: number, seed: number): void {
  if (!Number.isSafeInteger(count) || count < 0 || count > MAX_CUSTOMERS) {
    throw new RangeError(`count must be an integer in 0..${MAX_CUSTOMERS}, got ${count}`);
  }
  if (!Number.isSafeInteger(seed)) throw new RangeError(`seed must be a safe integer, got ${seed}`);
}

/**
 * Yields `count` synthetic customers with ids 1..count. Same (count, seed) → same rows, and
 * a shorter run is a prefix of a longer one. All identifiers are valid and unique across the
 * run (see the file header). Arguments are checked on the call, not on the first `next()`.
 */
export function generateCustomers(count: number, seed: number = DEFAULT_SEED): Generator<Customer> {
  assertArgs(count, seed);
  return customerRows(count, seed);
}

function* customerRows(count: number, seed: number): Generator<Customer> {
  const rng = new Mulberry32(deriveKey(seed, 1));
  const noPerm = new FeistelPermutation(NO_SLOTS, deriveKey(seed, 2));
  const oibPerm = new FeistelPermutation(OIB_SPACE, deriveKey(seed, 3));
  const accountPerm = new FeistelPermutation(ACCOUNT_SPACE, deriveKey(seed, 4));
  const regionKey = deriveKey(seed, 5);

  for (let i = 0; i < count; i++) {
    const id = i + 1;

    const pool = FOLDED_POOLS[rng.below(FOLDED_POOLS.length)] as FoldedPool;
    const [firstName, firstAscii] = rng.pick(pool.first);
    const [lastName, lastAscii] = rng.pick(pool.last);

    // Fødselsnummer: slot → (birth day, 10-number group); pick the last digit.
    const slot = noPerm.apply(i);
    const dayIndex = Math.floor(slot / NO_GROUPS_PER_DAY);
    const group = slot - dayIndex * NO_GROUPS_PER_DAY;
    const birth = BIRTH_DAYS[dayIndex] as CalendarDate;
    const individualBase = (birth.year >= 2000 ? 500 : 0) + group * 10;
    let nationalId: string | null = null;
    let individual = 0;
    const noStart = rng.below(10);
    for (let k = 0; k < 10 && nationalId === null; k++) {
      individual = individualBase + ((noStart + k) % 10);
      nationalId = makeNorwegianId(birth, individual);
    }
    if (nationalId === null) throw new Error('unreachable: no valid fødselsnummer in group');
    const male = individual % 2 === 1;

    // JMBG: same birth date and sex. (region index, serial-prefix parity) is a bijection
    // of `group` for a fixed day, so distinct slots give distinct JMBG bodies.
    const regionIndex = (group + (mix32(dayIndex ^ regionKey) % RS_REGIONS.length)) % RS_REGIONS.length;
    const region = RS_REGIONS[regionIndex] as number;
    const prefix = (male ? 0 : 50) + 2 * rng.below(25) + Math.floor(group / RS_REGIONS.length);
    let jmbg: string | null = null;
    const jStart = rng.below(10);
    for (let k = 0; k < 10 && jmbg === null; k++) {
      jmbg = makeJmbg(birth, region, prefix * 10 + ((jStart + k) % 10));
    }
    if (jmbg === null) throw new Error('unreachable: no valid JMBG serial');

    const oib = makeOib(String(1_000_000_000 + oibPerm.apply(i)));
    const iban = makeAccountIban(rng.pick(IBAN_MIX), accountPerm.apply(i), rng);

    yield {
      id,
      name: `${firstName} ${lastName}`,
      email: `${firstAscii}.${lastAscii}.${id}@example.test`,
      nationalId,
      oib,
      jmbg,
      iban,
    };
  }
}

// ---------------------------------------------------------------------------
// CSV
// ---------------------------------------------------------------------------

const NEEDS_QUOTES = /[",\r\n]/;

/** RFC 4180 / PostgreSQL CSV field: quoted (with "" for ") only when it contains , " CR or LF. */
export function csvField(value: string): string {
  return NEEDS_QUOTES.test(value) ? `"${value.replace(/"/g, '""')}"` : value;
}

/**
 * One line for `COPY customers (name, email, national_id, oib, jmbg, iban) FROM STDIN
 * WITH (FORMAT csv)`, terminated by '\n'. The id is not included (the table assigns it).
 */
export function customerCsvLine(c: Customer): string {
  return (
    csvField(c.name) +
    ',' +
    csvField(c.email) +
    ',' +
    csvField(c.nationalId) +
    ',' +
    csvField(c.oib) +
    ',' +
    csvField(c.jmbg) +
    ',' +
    csvField(c.iban) +
    '\n'
  );
}

const CHUNK_CHARS = 64 * 1024;

/**
 * Streams `count` customers as CSV (see {@link customerCsvLine}) to `path`, creating or
 * truncating it, in ~64 KiB chunks with backpressure; memory use is independent of count.
 * Resolves with the rows written and the file size in bytes (UTF-8).
 */
export async function writeCustomersCsv(
  path: string,
  count: number,
  seed: number = DEFAULT_SEED,
): Promise<{ rows: number; bytes: number }> {
  const customers = generateCustomers(count, seed);
  let rows = 0;
  let bytes = 0;
  function* chunks(): Generator<string> {
    let buf = '';
    for (const c of customers) {
      buf += customerCsvLine(c);
      rows++;
      if (buf.length >= CHUNK_CHARS) {
        bytes += Buffer.byteLength(buf, 'utf8');
        yield buf;
        buf = '';
      }
    }
    if (buf.length > 0) {
      bytes += Buffer.byteLength(buf, 'utf8');
      yield buf;
    }
  }
  await pipeline(Readable.from(chunks()), createWriteStream(path));
  return { rows, bytes };
}
