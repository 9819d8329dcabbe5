import { describe, expect, it } from 'vitest';
import { SecretBytes } from '../../src/crypto/index.js';
import { SecretLru } from '../../src/keys/lru.js';

describe('SecretLru', () => {
  it('evicts the least recently used entries on trim and zeroes them', () => {
    const lru = new SecretLru<SecretBytes>(2, (k) => k.dispose());
    const a = SecretBytes.random(32);
    const b = SecretBytes.random(32);
    const c = SecretBytes.random(32);
    lru.set('a', a);
    lru.set('b', b);
    lru.set('c', c);
    // Over capacity until trim: a key fetched early in a batch stays usable.
    expect(lru.size).toBe(3);
    expect(a.disposed).toBe(false);
    lru.get('a'); // a is now the most recently used
    lru.trim();
    expect(lru.size).toBe(2);
    expect(b.disposed).toBe(true);
    expect(a.disposed).toBe(false);
    expect(lru.get('b')).toBeUndefined();
    expect(lru.evictions).toBe(1);
  });

  it('zeroes a replaced entry, a deleted entry and everything on clear', () => {
    const lru = new SecretLru<SecretBytes>(10, (k) => k.dispose());
    const a = SecretBytes.random(32);
    const a2 = SecretBytes.random(32);
    const b = SecretBytes.random(32);
    lru.set('a', a);
    lru.set('a', a2);
    expect(a.disposed).toBe(true);
    lru.set('b', b);
    lru.delete('b');
    expect(b.disposed).toBe(true);
    lru.clear();
    expect(a2.disposed).toBe(true);
    expect(lru.size).toBe(0);
  });
});
