import { createSecretKey, randomFillSync, timingSafeEqual, type KeyObject } from 'node:crypto';
import { KeyringError } from './errors.js';

const REDACTED = 'SecretBytes(<redacted>)';

// Best effort: zero the bytes of a SecretBytes that was dropped without
// dispose(). The registry holds the Buffer, not the SecretBytes, so the
// wrapper itself can still be collected.
const zeroOnDrop = new FinalizationRegistry<Buffer>((buf) => {
  buf.fill(0);
});

/**
 * Key material as a type that cannot leak by accident: it has no enumerable
 * fields, prints and serialises as `SecretBytes(<redacted>)` (console.log,
 * JSON.stringify, util.inspect, template literals, pino), compares in constant
 * time, and is zeroed on dispose() or, best effort, when garbage-collected.
 *
 * Not guaranteed: a KeyObject made by keyObject() holds a copy in OpenSSL
 * memory that JavaScript cannot zero; it is dropped on dispose() and freed
 * when collected. Bytes passed out through use() are the caller's to keep
 * private.
 */
export class SecretBytes {
  #buf: Buffer;
  #key: KeyObject | undefined;
  #disposed = false;

  private constructor(buf: Buffer) {
    this.#buf = buf;
    zeroOnDrop.register(this, buf, this);
  }

  /** Copies `buf` into memory owned by the new SecretBytes, then zero-fills `buf`. */
  static from(buf: Buffer): SecretBytes {
    // Buffer.alloc never hands out a slice of Node's shared allocation pool,
    // so zeroing it later cannot touch (or miss) anyone else's bytes.
    const own = Buffer.alloc(buf.length);
    buf.copy(own);
    buf.fill(0);
    return new SecretBytes(own);
  }

  /** `n` bytes from the operating system CSPRNG. */
  static random(n: number): SecretBytes {
    return new SecretBytes(randomFillSync(Buffer.alloc(n)));
  }

  get length(): number {
    return this.#live().length;
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  /** Lends the raw bytes to `fn`. `fn` must not keep or copy them beyond the call. */
  use<T>(fn: (bytes: Buffer) => T): T {
    return fn(this.#live());
  }

  /** A cached secret KeyObject: createCipheriv/createHmac skip re-importing the key on every call. */
  keyObject(): KeyObject {
    const buf = this.#live();
    this.#key ??= createSecretKey(buf);
    return this.#key;
  }

  /** Constant-time comparison (timingSafeEqual); false when the lengths differ. */
  equals(other: SecretBytes): boolean {
    const a = this.#live();
    return other.use((b) => a.length === b.length && timingSafeEqual(a, b));
  }

  /** Zero-fills the bytes; any later use throws. Idempotent. */
  dispose(): void {
    if (this.#disposed) return;
    this.#buf.fill(0);
    this.#key = undefined;
    this.#disposed = true;
    zeroOnDrop.unregister(this);
  }

  toString(): string {
    return REDACTED;
  }

  toJSON(): string {
    return REDACTED;
  }

  [Symbol.for('nodejs.util.inspect.custom')](): string {
    return REDACTED;
  }

  #live(): Buffer {
    if (this.#disposed) {
      throw new KeyringError('SECRET_DISPOSED', 'keyring: key material was disposed and cannot be used');
    }
    return this.#buf;
  }
}
