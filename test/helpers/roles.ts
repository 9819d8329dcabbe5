import pg from 'pg';

/** The application login role of the tests: a member of keyring_writer and nothing else. */
export const APP_ROLE = 'keyring_test_app';
/** A DBA login role that is not a superuser: a member of keyring_admin. */
export const DBA_ROLE = 'keyring_test_dba';
// The embedded server uses password authentication, the system one trust on loopback:
// a password works with both.
const PASSWORD = 'keyring-test-login';

/** SQLSTATEs two test files hit when both create or grant the same cluster-wide role. */
const CONCURRENT_CATALOG_UPDATE = new Set(['23505', '42710', 'XX000', '40001', '40P01']);

/**
 * Creates a cluster-wide LOGIN role that is a member of `memberOf` if it is missing, and
 * returns a connection string for it to the database of `dbUrl`. Test files run in
 * parallel and roles are cluster-wide, so a concurrent creation or grant ("tuple
 * concurrently updated", duplicate_object) is retried, not an error.
 */
export async function loginRoleUrl(dbUrl: string, role: string, memberOf: string): Promise<string> {
  if (!/^[a-z_][a-z0-9_]*$/.test(role + memberOf)) throw new Error(`not a plain role name: ${role}, ${memberOf}`);
  const client = new pg.Client({ connectionString: dbUrl });
  await client.connect();
  try {
    for (let attempt = 1; ; attempt++) {
      try {
        await client.query(`DO $$
          BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '${role}') THEN
              CREATE ROLE ${role} LOGIN PASSWORD '${PASSWORD}';
            END IF;
            IF NOT pg_has_role('${role}', '${memberOf}', 'MEMBER') THEN
              GRANT ${memberOf} TO ${role};
            END IF;
          END $$`);
        break;
      } catch (err) {
        const code = (err as { code?: string }).code ?? '';
        if (attempt >= 10 || !CONCURRENT_CATALOG_UPDATE.has(code)) throw err;
        await new Promise((r) => setTimeout(r, 50 * attempt));
      }
    }
  } finally {
    await client.end();
  }
  const url = new URL(dbUrl);
  url.username = role;
  url.password = PASSWORD;
  return url.toString();
}

/** Connection string for keyring_test_app (LOGIN, member of keyring_writer only). */
export function appRoleUrl(dbUrl: string): Promise<string> {
  return loginRoleUrl(dbUrl, APP_ROLE, 'keyring_writer');
}

/** A connected client for `url` whose socket errors are ignored (tests end connections abruptly). */
export async function connect(url: string, applicationName?: string): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: url, ...(applicationName ? { application_name: applicationName } : {}) });
  client.on('error', () => undefined);
  await client.connect();
  return client;
}

/** A connected client logged in as the application role. */
export async function connectAsApp(dbUrl: string): Promise<pg.Client> {
  return connect(await appRoleUrl(dbUrl));
}

/** A connected client logged in as keyring_test_dba (LOGIN, member of keyring_admin, not superuser). */
export async function connectAsDba(dbUrl: string): Promise<pg.Client> {
  return connect(await loginRoleUrl(dbUrl, DBA_ROLE, 'keyring_admin'));
}
