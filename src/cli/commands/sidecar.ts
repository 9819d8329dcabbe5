import { runSidecar } from '../../../sidecar/main.js';
import { parse, type Command } from '../command.js';
import { CONFIG_VARIABLES } from '../../config.js';

export const sidecarCommand: Command = {
  name: 'sidecar',
  summary: 'run the sidecar: encrypt queued values, maintain blind indexes (until SIGTERM)',
  help: `Usage: keyring sidecar

Runs until SIGTERM/SIGINT. Configuration comes from the environment only:
${CONFIG_VARIABLES.filter((v) => !v.testOnly).map((v) => `  ${v.name.padEnd(28)} ${v.default === undefined ? '' : `(default ${v.default}) `}${v.description}`).join('\n')}

Refuses to start (exit 1, one line naming the key version) when the material of a
registered active or decrypt-only version is missing or does not match its fingerprint.`,
  async run(args, env, out) {
    parse(args, {});
    return runSidecar(env, { error: (l) => out.error(l) });
  },
};
