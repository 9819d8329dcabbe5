#!/usr/bin/env node
// Executable entry for a real sidecar process (`tsx sidecar/bin.ts`): used by tests that
// kill it with SIGKILL or SIGTERM. The CLI's `keyring sidecar` calls runSidecar too.
import { runSidecar } from './main.js';

process.exit(await runSidecar(process.env));
