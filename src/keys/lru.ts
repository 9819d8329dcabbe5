/**
 * Least-recently-used map of secrets (or records holding one). Entries are zeroed (dispose) when evicted or
 * cleared. Eviction happens in `trim()`, which the owner calls between batches, not in
 * `set()`: a key fetched early in a batch must stay usable until the batch ends, so the
 * bound is `capacity` plus the keys of one batch.
 */
export class SecretLru<V> {
  readonly #map = new Map<string, V>();
  readonly #capacity: number;
  readonly #dispose: (v: V) => void;
  #evictions = 0;

  constructor(capacity: number, dispose: (v: V) => void) {
    this.#capacity = Math.max(1, capacity);
    this.#dispose = dispose;
  }

  get(id: string): V | undefined {
    const v = this.#map.get(id);
    if (v === undefined) return undefined;
    this.#map.delete(id); // re-insert: Map iteration order is insertion order, oldest first
    this.#map.set(id, v);
    return v;
  }

  set(id: string, value: V): void {
    const old = this.#map.get(id);
    if (old !== undefined && old !== value) this.#dispose(old);
    this.#map.delete(id);
    this.#map.set(id, value);
  }

  delete(id: string): void {
    const old = this.#map.get(id);
    if (old !== undefined) this.#dispose(old);
    this.#map.delete(id);
  }

  trim(): void {
    for (const [id, v] of this.#map) {
      if (this.#map.size <= this.#capacity) break;
      this.#dispose(v);
      this.#map.delete(id);
      this.#evictions++;
    }
  }

  clear(): void {
    for (const v of this.#map.values()) this.#dispose(v);
    this.#map.clear();
  }

  get size(): number {
    return this.#map.size;
  }

  get evictions(): number {
    return this.#evictions;
  }
}
