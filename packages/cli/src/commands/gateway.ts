/** `podflare gateway`: the stateless front of a cluster (auth, placement, routing). */
import { loadConfig, type ServerConfig } from '@podflare/server';
import { enumOption, intOption, parse, type Command } from '../args.js';
import { createMcpMount } from '../mcp-mount.js';
import { CLUSTER_HELP, CLUSTER_OPTIONS, clusterValues, untilSignal } from './cluster-common.js';

const HELP = `Usage: podflare gateway --db URL [options]

Runs a stateless gateway of a Podflare cluster in the foreground (run as many as you like behind
a load balancer). It checks API keys, places new sandboxes on the nodes (a warm slot first, else
the least loaded of a few), and routes every other call to the node that runs the sandbox,
streaming answers through. Serves the same API as \`podflare serve\`, and MCP at /mcp.

Options:
${CLUSTER_HELP}
  --host HOST        address to bind (default: $PODFLARE_BIND_HOST, else 127.0.0.1);
                     a non-loopback address needs API keys in $PODFLARE_API_KEYS
  --port N           port (default: $PODFLARE_PORT, else 7070)
  --host-ttl-ms N    a node silent this long takes no placements and its sandboxes answer 503
                     node_unavailable (default: 3000)
  --connect-timeout-ms N
                     connecting to a node longer than this answers 503 (default: 2000)
  --log-level LEVEL  debug, info, warn, error or silent
  --allowed-host NAME, --allowed-origin ORIGIN  as for podflare serve
  -h, --help         show this help
`;

const OPTIONS = {
  ...CLUSTER_OPTIONS,
  host: { type: 'string' },
  port: { type: 'string' },
  'host-ttl-ms': { type: 'string' },
  'connect-timeout-ms': { type: 'string' },
  'log-level': { type: 'string' },
  'allowed-host': { type: 'string', multiple: true },
  'allowed-origin': { type: 'string', multiple: true },
} as const;

export const gatewayCommand: Command = {
  name: 'gateway',
  summary: 'run a stateless gateway of a cluster',
  help: HELP,
  async run(argv) {
    const { values } = parse('gateway', argv, OPTIONS);
    const { db, nodeToken } = clusterValues(values, 'gateway');
    const overrides: Partial<ServerConfig> = {
      host: values.host,
      port: intOption(values.port, 'port', 0, 65535, 'gateway'),
      logLevel: enumOption(values['log-level'], 'log-level', ['debug', 'info', 'warn', 'error', 'silent'] as const, 'gateway'),
      allowedHosts: values['allowed-host']?.flatMap((s) => s.split(',')),
      allowedOrigins: values['allowed-origin']?.flatMap((s) => s.split(',')),
    };
    for (const key of Object.keys(overrides) as (keyof ServerConfig)[]) if (overrides[key] === undefined) delete overrides[key];
    const config = loadConfig(overrides);
    if (!['127.0.0.1', '::1', 'localhost'].includes(config.host) && config.apiKeys.length === 0) {
      throw new Error(`refusing to listen on ${config.host} without API keys: set PODFLARE_API_KEYS (or bind 127.0.0.1)`);
    }
    const mcp = createMcpMount((message) => process.stderr.write(`podflare mcp: ${message}\n`));
    // Loaded here, not at the CLI's start: `podflare serve` should not pay for the cluster's modules.
    const { startGateway } = await import('@podflare/server/cluster');
    const gateway = await startGateway(config, {
      db, nodeToken, mounts: [mcp],
      hostTtlMs: intOption(values['host-ttl-ms'], 'host-ttl-ms', 500, 600_000, 'gateway'),
      connectTimeoutMs: intOption(values['connect-timeout-ms'], 'connect-timeout-ms', 100, 60_000, 'gateway'),
    });
    process.stdout.write(`podflare gateway listening on ${gateway.url}\n`);
    process.stdout.write(`mcp: ${gateway.url}${mcp.path}\n`);
    return untilSignal(() => gateway.close());
  },
};
