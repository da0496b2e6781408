/** `podflare node`: one host of a cluster (its sandboxes and warm pool), reached through gateways. */
import os from 'node:os';
import { createProgressReporter, loadConfig } from '@podflare/server';
import { parse, UsageError, type Command } from '../args.js';
import { CLUSTER_HELP, CLUSTER_OPTIONS, clusterValues, untilSignal } from './cluster-common.js';
import { OPTIONS as SERVE_OPTIONS, serveOverrides } from './serve.js';

const HELP = `Usage: podflare node --db URL --advertise HOST:PORT [options]

Runs one host of a Podflare cluster in the foreground: the sandboxes and warm pool of this host,
its records in the cluster's PostgreSQL, a heartbeat every second. It answers only gateways
(the shared node token); users talk to \`podflare gateway\`. Takes every \`podflare serve\` option
(--host, --port, --state-dir, --pool-size, ...); bind --host to an address the gateways reach.
As with \`serve\`, a stop keeps the live sandboxes for the next node process (--on-stop keep).

Options:
${CLUSTER_HELP}
  --advertise HOST:PORT
                     where gateways reach this node (default: $PODFLARE_ADVERTISE)
  --node-id ID       this host's id, stable across restarts (default: $PODFLARE_NODE_ID, else
                     the host name)
  (and podflare serve's options: run \`podflare serve --help\`)
  -h, --help         show this help
`;

const OPTIONS = { ...SERVE_OPTIONS, ...CLUSTER_OPTIONS, advertise: { type: 'string' }, 'node-id': { type: 'string' } } as const;

export const nodeCommand: Command = {
  name: 'node',
  summary: 'run one host of a cluster (behind gateways)',
  help: HELP,
  async run(argv) {
    const { values } = parse('node', argv, OPTIONS);
    const { db, nodeToken } = clusterValues(values, 'node');
    const advertise = values.advertise ?? process.env.PODFLARE_ADVERTISE;
    if (!advertise) throw new UsageError('--advertise HOST:PORT (or PODFLARE_ADVERTISE) is required', 'node');
    const hostId = values['node-id'] ?? process.env.PODFLARE_NODE_ID ?? os.hostname();
    // As `serve`: a stop keeps the sandboxes for the next node process on this host (it re-adopts them).
    const overrides = serveOverrides(values, 'node');
    if (overrides.onStop === undefined && !process.env.PODFLARE_ON_STOP) overrides.onStop = 'keep';
    const config = loadConfig(overrides);
    const reporter = createProgressReporter();
    // Loaded here, not at the CLI's start: `podflare serve` should not pay for the cluster's modules.
    const { startNode } = await import('@podflare/server/cluster');
    const node = await startNode(config, { db, advertise, hostId, nodeToken }, { onImageProgress: reporter.onProgress })
      .finally(() => reporter.finish());
    process.stdout.write(`podflare node ${hostId} listening on ${node.server.url} (advertised as ${advertise})\n`);
    return untilSignal(() => node.close());
  },
};
