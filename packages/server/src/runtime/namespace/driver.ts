/** The namespace runtime's driver: usable wherever bubblewrap runs; built from the driver context. */
import { execFile } from 'node:child_process';
import type { ServerDriver } from '../driver-context.js';
import { NamespaceRuntime } from './namespace-runtime.js';

function runs(cmd: string, args: string[]): Promise<boolean> {
  return new Promise((resolve) => execFile(cmd, args, { timeout: 10_000 }, (err) => resolve(!err)));
}

export const namespaceDriver: ServerDriver = {
  startsTemplates: true,
  async detect() {
    if (!(await runs('bwrap', ['--version']))) return { usable: false, reason: 'needs bubblewrap (bash scripts/setup.sh installs it)' };
    return { usable: true };
  },
  async create(ctx, name) {
    const { settings } = ctx;
    const runtime = new NamespaceRuntime({
      name,
      stateDir: settings.stateDir,
      lowerDirs: [ctx.image.agent, ctx.image.base],
      layersFor: ctx.layersFor,
      startTimeoutMs: settings.startTimeoutMs,
      interruptGraceMs: settings.interruptGraceMs,
      uidBase: settings.sandboxUidBase,
      diskVolumeBytes: settings.diskVolumeBytes,
      log: ctx.log,
      egress: ctx.egress,
      hostHelper: settings.hostHelper,
      spawner: ctx.spawner,
      onIncompatible: settings.onIncompatible,
      watchServer: settings.onStop !== 'keep',
    });
    return {
      runtime,
      gauges: [{
        name: 'podflare_host_helper_restarts_total',
        help: 'Host helper workers replaced: died on their own (exit), missed a call\'s timeout (timeout), or killed for a fault (fault).',
        kind: 'counter',
        read: () => runtime.hostHelperRestarts().map(({ reason, count }) => ({ labels: { reason }, value: count })),
      }],
    };
  },
};
