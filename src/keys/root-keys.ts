/**
 * Which root key versions this process holds. The version of each configured key is
 * found by its fingerprint in keyring.root_keys (never by position); a version a value
 * may depend on with no matching material refuses the start before anything is
 * registered (case C01); an unknown fingerprint is registered as `pending`. The
 * sidecar never invents a key. Material of a destroyed version is never used at all:
 * it is kept apart (`destroyed`) so the owner can zero it (dropDestroyed).
 */
import type pg from 'pg';
import { fingerprint, type KeyPurpose, type SecretBytes } from '../crypto/index.js';
import { registerKey } from '../db/queries/register-key.js';
import { selectRootKeys, type RootKeyRow } from '../db/queries/select-root-keys.js';
import { KeyMissingError, KeyUnavailableError, NoKeysError, type MissingKey } from './errors.js';
import { KEY_PURPOSES, type RootKeyMaterial } from './material.js';

/** States in which a version may protect stored values, so its material must be present. */
const NEEDS_MATERIAL = new Set(['active', 'decrypt_only', 'disabled']);

export interface HeldKey {
  readonly purpose: KeyPurpose;
  readonly version: number;
  readonly state: string;
  readonly fingerprint: string;
  readonly label: string;
  readonly key: SecretBytes;
}

export class RootKeyStore {
  readonly #held: readonly HeldKey[];
  readonly #registry: readonly RootKeyRow[];
  readonly #fingerprints: readonly string[];
  readonly #destroyed: readonly HeldKey[];

  /** `held`: configured keys matched to versions (destroyed ones are set apart); `fingerprints`: of every configured key. */
  constructor(held: readonly HeldKey[], registry: readonly RootKeyRow[], fingerprints: readonly string[]) {
    this.#held = held.filter((h) => h.state !== 'destroyed');
    this.#destroyed = held.filter((h) => h.state === 'destroyed');
    this.#registry = registry;
    this.#fingerprints = fingerprints.filter((fp) => !this.#destroyed.some((d) => d.fingerprint === fp));
  }

  /** The registry state of a version (undefined when not registered). */
  stateOf(purpose: KeyPurpose, version: number): string | undefined {
    return this.#registry.find((r) => r.purpose === purpose && r.version === version)?.state;
  }

  /** The registered active version of `purpose`, held or not. */
  activeVersion(purpose: KeyPurpose): number | undefined {
    return this.#registry.find((r) => r.purpose === purpose && r.state === 'active')?.version;
  }

  get(purpose: KeyPurpose, version: number): HeldKey | undefined {
    return this.#held.find((h) => h.purpose === purpose && h.version === version);
  }

  /** The active version's material; KeyUnavailableError when none is active or it is not held here. */
  active(purpose: KeyPurpose): HeldKey {
    const v = this.activeVersion(purpose);
    if (v === undefined) {
      throw new KeyUnavailableError(`no ${purpose} root key version is active; activate one with keyring.activate_key('${purpose}', <version>)`);
    }
    return this.require(purpose, v);
  }

  /** Material of one version; KeyUnavailableError (retryable) when this process does not hold it. */
  require(purpose: KeyPurpose, version: number): HeldKey {
    if (this.stateOf(purpose, version) === 'destroyed') throw new KeyUnavailableError(`${purpose} root key version ${version} was destroyed`);
    const h = this.get(purpose, version);
    if (h === undefined) throw new KeyUnavailableError(`${purpose} root key version ${version} is not held by this sidecar`);
    return h;
  }

  /** Configured keys of destroyed versions: never used; the owner zeroes them (dropDestroyed). */
  get destroyed(): readonly HeldKey[] {
    return this.#destroyed;
  }

  /** Fingerprints of every configured root key but destroyed ones, both purposes (for keyring.sidecars). */
  get fingerprints(): readonly string[] {
    return this.#fingerprints;
  }

  get held(): readonly HeldKey[] {
    return this.#held;
  }

  get registry(): readonly RootKeyRow[] {
    return this.#registry;
  }
}

export interface ResolveOptions {
  /** Register unknown fingerprints as pending versions (the sidecar does; a read-only CLI does not). */
  readonly register: boolean;
}

/**
 * Matches configured material with the registry. Throws KeyMissingError when a version
 * in state active, decrypt_only or disabled has no matching material (checked before
 * registering anything), NoKeysError when no encrypt key would be held at all.
 */
export async function resolveRootKeys(
  client: pg.ClientBase,
  material: RootKeyMaterial,
  opts: ResolveOptions,
): Promise<RootKeyStore> {
  // A disposed key is one this process already dropped (a destroyed version; the same
  // material object may be shared by several sidecars in one process, as in tests).
  const configured = KEY_PURPOSES.flatMap((purpose) =>
    material[purpose].filter((k) => !k.key.disposed)
      .map((k) => ({ purpose, label: k.label, key: k.key, fingerprint: fingerprint(k.key, purpose) })),
  );
  let registry = await selectRootKeys(client);
  const known = (purpose: KeyPurpose, fp: string) => registry.find((r) => r.purpose === purpose && r.fingerprint === fp);

  const missing: MissingKey[] = registry
    .filter((r) => NEEDS_MATERIAL.has(r.state) && !configured.some((c) => c.purpose === r.purpose && c.fingerprint === r.fingerprint))
    .map((r) => ({ purpose: r.purpose, version: r.version, state: r.state, fingerprint: r.fingerprint }));
  const unknown = configured.filter((c) => known(c.purpose, c.fingerprint) === undefined);
  if (missing.length > 0) throw new KeyMissingError(missing, unknown.map((c) => c.label));

  if (opts.register && unknown.length > 0) {
    for (const c of unknown) await registerKey(client, c.purpose, c.fingerprint);
    registry = await selectRootKeys(client);
  }
  const held: HeldKey[] = [];
  for (const c of configured) {
    const r = known(c.purpose, c.fingerprint);
    if (r) held.push({ purpose: c.purpose, version: r.version, state: r.state, fingerprint: c.fingerprint, label: c.label, key: c.key });
  }
  if (!held.some((h) => h.purpose === 'encrypt' && h.state !== 'destroyed' && h.state !== 'retired')) {
    throw new NoKeysError(
      'no usable encrypt root key is configured (KEYRING_ENCRYPT_KEYS or the key file\'s "encrypt" list); ' +
        'generate one with `keyring keygen`',
    );
  }
  return new RootKeyStore(held, registry, configured.map((c) => c.fingerprint));
}

/**
 * The configured material matched to a registry read just now, with none of
 * resolveRootKeys' start-up checks: for a long-lived reader (the library) that re-reads
 * the registry to follow activations; a version it lacks fails only the call that needs it.
 */
export function matchRootKeys(material: RootKeyMaterial, registry: readonly RootKeyRow[]): RootKeyStore {
  const configured = KEY_PURPOSES.flatMap((purpose) =>
    material[purpose].filter((k) => !k.key.disposed)
      .map((k) => ({ purpose, label: k.label, key: k.key, fingerprint: fingerprint(k.key, purpose) })),
  );
  const held: HeldKey[] = [];
  for (const c of configured) {
    const r = registry.find((x) => x.purpose === c.purpose && x.fingerprint === c.fingerprint);
    if (r) held.push({ purpose: c.purpose, version: r.version, state: r.state, fingerprint: c.fingerprint, label: c.label, key: c.key });
  }
  return new RootKeyStore(held, registry, configured.map((c) => c.fingerprint));
}

/**
 * `material` without the keys of destroyed versions, which are zeroed here: a sidecar
 * drops a destroyed version from memory as soon as the registry says so. Returns
 * `material` itself when nothing was dropped.
 */
export function dropDestroyed(material: RootKeyMaterial, store: RootKeyStore): RootKeyMaterial {
  if (store.destroyed.length === 0) return material;
  const gone = new Set(store.destroyed.map((h) => h.key));
  for (const k of gone) k.dispose();
  return Object.freeze({
    source: material.source,
    encrypt: Object.freeze(material.encrypt.filter((k) => !gone.has(k.key))),
    index: Object.freeze(material.index.filter((k) => !gone.has(k.key))),
  });
}
