/**
 * Check-digit algorithms for the identifiers used by the synthetic demo data.
 *
 * Everything here is pure and synchronous. Validators take a string and return a
 * boolean; they never throw. Builders take the "payload" digits and return the full
 * identifier; they throw RangeError on malformed input and return null where the
 * standard says a payload has no valid check digit (so the caller must pick another).
 */

/** A calendar date without time zone (month 1–12, day 1–31). */
export interface CalendarDate {
  year: number;
  month: number;
  day: number;
}

const DIGITS = /^[0-9]+$/;

function isLeapYear(year: number): boolean {
  return (year % 4 === 0 && year % 100 !== 0) || year % 400 === 0;
}

/** Number of days in a month of the proleptic Gregorian calendar. */
export function daysInMonth(year: number, month: number): number {
  if (month === 2) return isLeapYear(year) ? 29 : 28;
  return month === 4 || month === 6 || month === 9 || month === 11 ? 30 : 31;
}

function isValidDate(year: number, month: number, day: number): boolean {
  return (
    Number.isInteger(year) &&
    Number.isInteger(month) &&
    Number.isInteger(day) &&
    month >= 1 &&
    month <= 12 &&
    day >= 1 &&
    day <= daysInMonth(year, month)
  );
}

function assertDate(d: CalendarDate, what: string): void {
  if (!isValidDate(d.year, d.month, d.day)) {
    throw new RangeError(`${what}: not a calendar date: ${d.year}-${d.month}-${d.day}`);
  }
}

function assertIntIn(n: number, lo: number, hi: number, what: string): void {
  if (!Number.isInteger(n) || n < lo || n > hi) throw new RangeError(`${what} must be an integer in ${lo}..${hi}, got ${n}`);
}

function pad(n: number, width: number): string {
  return String(n).padStart(width, '0');
}

/** Numeric value of the ASCII digit at position i (caller guarantees a digit). */
function digitAt(s: string, i: number): number {
  return s.charCodeAt(i) - 48;
}

// ---------------------------------------------------------------------------
// Norway: fødselsnummer
// ---------------------------------------------------------------------------

const NO_W1 = [3, 7, 6, 1, 8, 9, 4, 5, 2] as const;
const NO_W2 = [5, 4, 3, 2, 7, 6, 5, 4, 3, 2] as const;

/** Weighted-sum mod-11 check digit; null when the remainder would need digit "10". */
function mod11Check(s: string, weights: readonly number[]): number | null {
  let sum = 0;
  for (let i = 0; i < weights.length; i++) sum += digitAt(s, i) * (weights[i] as number);
  const k = 11 - (sum % 11);
  if (k === 11) return 0;
  if (k === 10) return null;
  return k;
}

/**
 * Century of a Norwegian birth year from the individual number (Folkeregisteret rules):
 * 000–499 → 1900–1999; 500–749 with YY 54–99 → 1854–1899; 500–999 with YY 00–39 →
 * 2000–2039; 900–999 with YY 40–99 → 1940–1999. Returns null for impossible pairs.
 */
function norwegianBirthYear(yy: number, individual: number): number | null {
  if (individual <= 499) return 1900 + yy;
  if (individual <= 749 && yy >= 54) return 1800 + yy;
  if (yy <= 39) return 2000 + yy;
  if (individual >= 900) return 1900 + yy;
  return null;
}

/**
 * Validates a Norwegian national identity number (fødselsnummer, Folkeregisteret):
 * 11 digits DDMMYY III K1 K2, where III (individual number) fixes the century of YY,
 * the date must exist, and K1/K2 are mod-11 check digits with weights 3,7,6,1,8,9,4,5,2
 * and 5,4,3,2,7,6,5,4,3,2 (11 → 0; 10 never occurs in a valid number).
 * D-numbers (day + 40), H-numbers (month + 40) and synthetic test numbers are not accepted.
 */
export function isValidNorwegianId(s: string): boolean {
  if (s.length !== 11 || !DIGITS.test(s)) return false;
  const day = Number(s.slice(0, 2));
  const month = Number(s.slice(2, 4));
  const yy = Number(s.slice(4, 6));
  const individual = Number(s.slice(6, 9));
  const year = norwegianBirthYear(yy, individual);
  if (year === null || !isValidDate(year, month, day)) return false;
  const k1 = mod11Check(s, NO_W1);
  if (k1 === null || k1 !== digitAt(s, 9)) return false;
  const k2 = mod11Check(s, NO_W2);
  return k2 !== null && k2 === digitAt(s, 10);
}

/**
 * Builds a Norwegian fødselsnummer (Folkeregisteret; see {@link isValidNorwegianId}) from a
 * birth date and a 3-digit individual number. Throws RangeError when the date is not a
 * date or the individual number does not encode the birth year's century (e.g. 1975 needs
 * 000–499 or 900–999, 2003 needs 500–999). Returns null when either mod-11 check digit
 * would be 10: such a number does not exist and the caller must choose another individual.
 */
export function makeNorwegianId(birthDate: CalendarDate, individual: number): string | null {
  assertDate(birthDate, 'makeNorwegianId');
  assertIntIn(individual, 0, 999, 'individual number');
  const yy = birthDate.year % 100;
  if (norwegianBirthYear(yy, individual) !== birthDate.year) {
    throw new RangeError(`individual number ${pad(individual, 3)} does not encode birth year ${birthDate.year}`);
  }
  const body = pad(birthDate.day, 2) + pad(birthDate.month, 2) + pad(yy, 2) + pad(individual, 3);
  const k1 = mod11Check(body, NO_W1);
  if (k1 === null) return null;
  const k2 = mod11Check(body + k1, NO_W2);
  if (k2 === null) return null;
  return body + k1 + k2;
}

// ---------------------------------------------------------------------------
// Croatia: OIB
// ---------------------------------------------------------------------------

/** ISO 7064 MOD 11,10 (hybrid system) check digit over a string of digits. */
export function iso7064Mod11_10(digits: string): number {
  let a = 10;
  for (let i = 0; i < digits.length; i++) {
    a = (a + digitAt(digits, i)) % 10;
    if (a === 0) a = 10;
    a = (a * 2) % 11;
  }
  const check = 11 - a;
  return check === 10 ? 0 : check;
}

/**
 * Validates a Croatian personal identification number (OIB, osobni identifikacijski broj):
 * 11 digits, the last being the ISO 7064 MOD 11,10 check digit of the first ten.
 */
export function isValidOib(s: string): boolean {
  return s.length === 11 && DIGITS.test(s) && iso7064Mod11_10(s.slice(0, 10)) === digitAt(s, 10);
}

/**
 * Builds a Croatian OIB from its first ten digits by appending the ISO 7064 MOD 11,10
 * check digit (every 10-digit payload has one). Throws RangeError unless given 10 digits.
 */
export function makeOib(first10digits: string): string {
  if (first10digits.length !== 10 || !DIGITS.test(first10digits)) {
    throw new RangeError('makeOib: expected exactly 10 digits');
  }
  return first10digits + iso7064Mod11_10(first10digits);
}

// ---------------------------------------------------------------------------
// Serbia (former Yugoslavia): JMBG
// ---------------------------------------------------------------------------

const JMBG_W = [7, 6, 5, 4, 3, 2, 7, 6, 5, 4, 3, 2] as const;

/**
 * Raw JMBG control value 11 − (Σ wᵢ·dᵢ mod 11) over the first 12 digits, weights
 * 7,6,5,4,3,2,7,6,5,4,3,2. Ranges 1..11.
 */
function jmbgRawControl(s: string): number {
  let sum = 0;
  for (let i = 0; i < 12; i++) sum += digitAt(s, i) * (JMBG_W[i] as number);
  return 11 - (sum % 11);
}

/**
 * Birth year from the JMBG's three-digit year YYY: 800–999 → 1800–1999, 000–799 → 2000–2799
 * (the conventional reading; only 1900s and 2000s occur in practice).
 */
function jmbgYear(yyy: number): number {
  return yyy >= 800 ? 1000 + yyy : 2000 + yyy;
}

/**
 * Validates a JMBG (jedinstveni matični broj građana, Unique Master Citizen Number, as
 * used in Serbia): 13 digits DDMMYYY RR BBB K with an existing date, any two-digit
 * region RR, serial BBB, and control digit K = 11 − ((7(a+g) + 6(b+h) + 5(c+i) + 4(d+j)
 * + 3(e+k) + 2(f+l)) mod 11).
 *
 * Choice for the edge cases (sources disagree): a raw result of 11 gives K = 0; a raw
 * result of 10 is treated as having no valid control digit, so such numbers are always
 * rejected here and never generated (some validators instead map 10 → 0 too; numbers we
 * produce are valid under both readings).
 */
export function isValidJmbg(s: string): boolean {
  if (s.length !== 13 || !DIGITS.test(s)) return false;
  const day = Number(s.slice(0, 2));
  const month = Number(s.slice(2, 4));
  const year = jmbgYear(Number(s.slice(4, 7)));
  if (!isValidDate(year, month, day)) return false;
  const raw = jmbgRawControl(s);
  if (raw === 10) return false;
  return (raw === 11 ? 0 : raw) === digitAt(s, 12);
}

/**
 * Builds a JMBG (see {@link isValidJmbg}) from a birth date (1800–2799), a two-digit
 * region code (Serbia: 71–79 central Serbia, 80–89 Vojvodina, 91–96 Kosovo and Metohija)
 * and a three-digit serial (000–499 male, 500–999 female). Throws RangeError on malformed
 * input; returns null when the raw control value is 10 (pick another serial).
 */
export function makeJmbg(birthDate: CalendarDate, region: number, serial: number): string | null {
  assertDate(birthDate, 'makeJmbg');
  assertIntIn(birthDate.year, 1800, 2799, 'JMBG birth year');
  assertIntIn(region, 0, 99, 'JMBG region');
  assertIntIn(serial, 0, 999, 'JMBG serial');
  const body =
    pad(birthDate.day, 2) + pad(birthDate.month, 2) + pad(birthDate.year % 1000, 3) + pad(region, 2) + pad(serial, 3);
  const raw = jmbgRawControl(body);
  if (raw === 10) return null;
  return body + (raw === 11 ? 0 : raw);
}

// ---------------------------------------------------------------------------
// IBAN (ISO 13616)
// ---------------------------------------------------------------------------

/**
 * Total IBAN lengths for the countries this project generates (SWIFT IBAN registry).
 * Other countries are checked only against the generic ISO 13616 shape.
 */
export const IBAN_LENGTHS: Readonly<Record<string, number>> = Object.freeze({
  NO: 15,
  HR: 21,
  RS: 22,
  DE: 22,
});

const IBAN_SHAPE = /^[A-Z]{2}[0-9]{2}[A-Z0-9]{11,30}$/;
const BBAN_SHAPE = /^[A-Z0-9]{1,30}$/;

/** Remainder mod 97 of the ISO 13616 numeric form of s (A=10 … Z=35), computed piecewise. */
function mod97(s: string): number {
  let r = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    r = c <= 57 ? (r * 10 + (c - 48)) % 97 : (r * 100 + (c - 55)) % 97;
  }
  return r;
}

/**
 * Validates an IBAN in electronic format (no spaces, upper case) per ISO 13616-1:
 * two-letter country, two check digits 02–98, an alphanumeric BBAN, the registry length
 * for NO/HR/RS/DE, and (BBAN + country + check digits) mod 97 = 1. National BBAN check
 * digits are not verified.
 */
export function isValidIban(s: string): boolean {
  if (!IBAN_SHAPE.test(s)) return false;
  const expected = IBAN_LENGTHS[s.slice(0, 2)];
  if (expected !== undefined && s.length !== expected) return false;
  const check = Number(s.slice(2, 4));
  if (check < 2 || check > 98) return false;
  return mod97(s.slice(4) + s.slice(0, 4)) === 1;
}

/**
 * Builds an IBAN (ISO 13616-1) from a country code and BBAN by computing the check digits
 * 98 − ((BBAN + country + "00") mod 97). Throws RangeError for a malformed country/BBAN or a
 * BBAN whose length does not match the registry for NO/HR/RS/DE.
 */
export function makeIban(countryCode: string, bban: string): string {
  if (!/^[A-Z]{2}$/.test(countryCode)) throw new RangeError(`makeIban: bad country code ${JSON.stringify(countryCode)}`);
  if (!BBAN_SHAPE.test(bban)) throw new RangeError('makeIban: BBAN must be 1–30 characters A–Z/0–9');
  const expected = IBAN_LENGTHS[countryCode];
  if (expected !== undefined && bban.length !== expected - 4) {
    throw new RangeError(`makeIban: ${countryCode} BBAN must have ${expected - 4} characters, got ${bban.length}`);
  }
  if (bban.length + 4 < 15) throw new RangeError('makeIban: IBAN would be shorter than 15 characters');
  const check = 98 - mod97(bban + countryCode + '00');
  return countryCode + pad(check, 2) + bban;
}

/**
 * ISO 7064 MOD 97-10 two-digit check for a digit string: 98 − (n·100 mod 97). Used as the
 * national check of Serbian account numbers (bank 3 + account 13 + check 2).
 */
export function iso7064Mod97_10(digits: string): string {
  if (!DIGITS.test(digits)) throw new RangeError('iso7064Mod97_10: expected digits');
  return pad(98 - mod97(digits + '00'), 2);
}

/**
 * Norwegian account-number check digit (Bankenes standard, MOD11 with weights
 * 5,4,3,2,7,6,5,4,3,2 over the first 10 of 11 digits); null when it would be 10
 * (such account numbers are not issued).
 */
export function norwegianAccountCheck(first10digits: string): number | null {
  if (first10digits.length !== 10 || !DIGITS.test(first10digits)) {
    throw new RangeError('norwegianAccountCheck: expected exactly 10 digits');
  }
  return mod11Check(first10digits, NO_W2);
}
