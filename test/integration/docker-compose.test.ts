/**
 * docker-compose.yml matches the code and the documentation: Postgres 17, a migrate job
 * and a sidecar built from the Dockerfile; the sidecar's environment uses only variables
 * the sidecar reads (CONFIG_VARIABLES, src/config.ts), wires the database and both key
 * lists from the shell (never a literal key), and every variable it sets is documented in
 * README.md's configuration table.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { COMMANDS } from '../../src/cli/main.js';
import { CONFIG_VARIABLES } from '../../src/config.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));

interface Service {
  image?: string;
  build?: string | { context?: string; dockerfile?: string };
  command?: string[] | string;
  environment?: Record<string, string | number | boolean | null> | string[];
  depends_on?: string[] | Record<string, { condition?: string }>;
  ports?: string[];
}

const compose = parse(readFileSync(join(ROOT, 'docker-compose.yml'), 'utf8')) as { services: Record<string, Service> };
const services = compose.services;

/** A service's environment as name → value, whichever of the two compose forms it uses. */
function envOf(s: Service): Map<string, string> {
  const env = s.environment ?? {};
  if (Array.isArray(env)) {
    return new Map(env.map((e) => {
      const i = e.indexOf('=');
      return i < 0 ? [e, ''] : [e.slice(0, i), e.slice(i + 1)];
    }));
  }
  return new Map(Object.entries(env).map(([k, v]) => [k, v === null ? '' : String(v)]));
}

function dockerfileOf(s: Service): string {
  const b = s.build;
  expect(b, 'build').toBeDefined();
  const context = typeof b === 'string' ? b : b!.context ?? '.';
  const file = typeof b === 'string' ? 'Dockerfile' : b!.dockerfile ?? 'Dockerfile';
  return join(ROOT, context, file);
}

const commandOf = (s: Service): string[] => (Array.isArray(s.command) ? s.command : (s.command ?? '').split(/\s+/).filter(Boolean));

/** Variable names in the first column of the README table under a "Configuration" heading. */
function readmeConfigTable(): Set<string> {
  const lines = readFileSync(join(ROOT, 'README.md'), 'utf8').split('\n');
  const start = lines.findIndex((l) => /^#{2,4}\s.*configuration/i.test(l));
  const names = new Set<string>();
  if (start < 0) return names;
  for (const line of lines.slice(start + 1)) {
    if (/^#{1,4}\s/.test(line)) break;
    if (!line.trim().startsWith('|')) continue;
    const first = line.split('|')[1] ?? '';
    for (const m of first.matchAll(/`?([A-Z][A-Z0-9_]+)`?/g)) names.add(m[1]!);
  }
  return names;
}

describe('docker-compose.yml', () => {
  it('has postgres (postgres:17), migrate and sidecar, both built from the Dockerfile', () => {
    expect(Object.keys(services)).toEqual(expect.arrayContaining(['postgres', 'migrate', 'sidecar']));
    expect(services.postgres!.image).toBe('postgres:17');
    for (const name of ['migrate', 'sidecar']) {
      const s = services[name]!;
      expect(s.image, name).toBeUndefined();
      expect(existsSync(dockerfileOf(s)), `${name}: ${dockerfileOf(s)}`).toBe(true);
    }
    // The image's entry point is the CLI; each service runs one of its commands.
    expect(readFileSync(dockerfileOf(services.sidecar!), 'utf8')).toMatch(/^ENTRYPOINT \["node", "bin\/keyring\.js"\]$/m);
    const names = COMMANDS.map((c) => c.name);
    expect(commandOf(services.migrate!)).toEqual(['migrate']);
    expect(commandOf(services.sidecar!)).toEqual(['sidecar']);
    expect(names).toEqual(expect.arrayContaining(['migrate', 'sidecar']));
  });

  it('starts the sidecar only after migrate succeeded, and migrate after postgres is healthy', () => {
    const dep = (s: Service, on: string) => (Array.isArray(s.depends_on) ? undefined : s.depends_on?.[on]?.condition);
    expect(dep(services.migrate!, 'postgres')).toBe('service_healthy');
    expect(dep(services.sidecar!, 'migrate')).toBe('service_completed_successfully');
  });

  it('sets only variables the sidecar reads, and wires the database and both key lists from the shell', () => {
    const known = new Set(CONFIG_VARIABLES.map((v) => v.name));
    const env = envOf(services.sidecar!);
    expect([...env.keys()].filter((k) => !known.has(k))).toEqual([]);
    for (const name of ['DATABASE_URL', 'KEYRING_ENCRYPT_KEYS', 'KEYRING_INDEX_KEYS']) expect(env.has(name), name).toBe(true);
    expect(env.get('DATABASE_URL')).toMatch(/^postgres(ql)?:\/\/[^@]+@postgres:5432\/\w+$/);
    // Keys come from the environment of `docker compose up`, required, never written here.
    expect(env.get('KEYRING_ENCRYPT_KEYS')).toMatch(/^\$\{KEYRING_ENCRYPT_KEYS:\?[^}]*\}$/);
    expect(env.get('KEYRING_INDEX_KEYS')).toMatch(/^\$\{KEYRING_INDEX_KEYS:\?[^}]*\}$/);
    expect(readFileSync(join(ROOT, 'docker-compose.yml'), 'utf8')).not.toMatch(/[0-9a-fA-F]{64}/);
    // migrate talks to the same database.
    expect(envOf(services.migrate!).get('DATABASE_URL')).toBe(env.get('DATABASE_URL'));
    // The health port the sidecar listens on is the one published.
    expect(services.sidecar!.ports ?? []).toContain(`${env.get('KEYRING_HEALTH_PORT')}:${env.get('KEYRING_HEALTH_PORT')}`);
  });

  it("documents every variable the sidecar service sets in README.md's configuration table", () => {
    const documented = readmeConfigTable();
    const env = envOf(services.sidecar!);
    const wanted = [...new Set(['DATABASE_URL', 'KEYRING_ENCRYPT_KEYS', 'KEYRING_INDEX_KEYS', ...env.keys()])];
    expect(wanted.filter((v) => !documented.has(v)), 'missing from the README configuration table').toEqual([]);
    // And the table documents every variable the sidecar reads (test-only ones aside).
    const all = CONFIG_VARIABLES.filter((v) => !v.testOnly).map((v) => v.name);
    expect(all.filter((v) => !documented.has(v)), 'missing from the README configuration table').toEqual([]);
  });
});
