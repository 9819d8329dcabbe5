#!/usr/bin/env node
// Launcher for the `keyring` CLI: runs the TypeScript sources through tsx, so that
// `npx keyring …` works straight after `npm ci` with no build step.
import { register } from 'tsx/esm/api';

register();
const { main } = await import('../src/cli/main.ts');
process.exitCode = await main(process.argv.slice(2), process.env);
