/** `podflare serve`: run the sandbox server in the foreground. */
import path from 'node:path';
import { AUTO_RUNTIME, builtinRuntimes, createProgressReporter, loadConfig, startServer, type ServerConfig } from '@podflare/server';
import { enumOption, EXIT_OK, intOption, parse, type Command } from '../args.js';
import { createMcpMount } from '../mcp-mount.js';

const HELP = `Usage: podflare serve [options]

Runs the Podflare server in the foreground until SIGINT/SIGTERM. Builds the sandbox image
first if it is missing (about a minute, once). Serves the REST API, the dashboard at /, and
MCP (Streamable HTTP, with or without sessions) at /mcp, all behind the same API keys.

Options:
  --host HOST        address to bind (default: $PODFLARE_BIND_HOST, else 127.0.0.1);
                     a non-loopback address needs API keys in $PODFLARE_API_KEYS
  --port N           port (default: $PODFLARE_PORT, else 7070; 0 picks a free one)
  --state-dir DIR    sandboxes' layers and the database (default: $PODFLARE_STATE_DIR, else /var/lib/podflare)
  --images-dir DIR   built images (default: $PODFLARE_IMAGES_DIR, else <state dir>/images)
  --pool-size N      warm sandboxes kept ready (default: $PODFLARE_POOL_SIZE, else 2 per core)
  --disk-volume-mb N
                     MB of the sandboxes' disk volume, reserved in the state directory at start;
                     the server refuses to start without that much free (default:
                     $PODFLARE_DISK_VOLUME_MB, else 8192)
  --runtime NAME     ns, vm or auto (default: $PODFLARE_RUNTIME, else ns)
  --on-stop MODE     keep or destroy: what SIGTERM/SIGINT does with live sandboxes. keep leaves
                     them running for the next server on the state directory, which adopts them
                     (a restart or an upgrade loses no interpreter state; warm-pool sandboxes are
                     rebuilt); destroy ends them (default: $PODFLARE_ON_STOP, else keep)
  --on-incompatible MODE
                     clean or refuse: what to do at start with live sandboxes of an earlier build
                     whose agent protocol has another major version: end them (recorded lost) or
                     refuse to start (default: $PODFLARE_ON_INCOMPATIBLE, else clean)
  --log-level LEVEL  debug, info, warn, error or silent (default: $PODFLARE_LOG_LEVEL, else info)
  --allowed-host NAME
                     a host name the API answers to besides localhost and IP addresses, e.g. the
                     public name of a proxy in front of it (repeatable; also $PODFLARE_ALLOWED_HOSTS)
  --allowed-origin ORIGIN
                     a web origin (https://app.example.com) whose pages may call the API
                     cross-origin (repeatable; also $PODFLARE_ALLOWED_ORIGINS)
  -h, --help         show this help
`;

/** serve's options; `podflare node` takes them too. */
export const OPTIONS = {
  host: { type: 'string' },
  port: { type: 'string' },
  'state-dir': { type: 'string' },
  'images-dir': { type: 'string' },
  'pool-size': { type: 'string' },
  'disk-volume-mb': { type: 'string' },
  runtime: { type: 'string' },
  'on-stop': { type: 'string' },
  'on-incompatible': { type: 'string' },
  'log-level': { type: 'string' },
  'allowed-host': { type: 'string', multiple: true },
  'allowed-origin': { type: 'string', multiple: true },
} as const;

/** The CLI flags as loadConfig overrides (unset flags left out, so the environment applies). */
export function serveOverrides(values: Record<string, string | string[] | boolean | undefined>, command: string): Partial<ServerConfig> {
  const str = (k: string) => (typeof values[k] === 'string' ? (values[k] as string) : undefined);
  // Repeatable, and each may hold a comma-separated list (as the environment variables do).
  const strs = (k: string) => {
    const v = values[k];
    return Array.isArray(v) ? v.flatMap((s) => s.split(',')).map((s) => s.trim()).filter(Boolean) : undefined;
  };
  const overrides: Partial<ServerConfig> = {
    host: str('host'),
    port: intOption(str('port'), 'port', 0, 65535, command),
    stateDir: str('state-dir') ? path.resolve(str('state-dir')!) : undefined,
    imagesDir: str('images-dir') ? path.resolve(str('images-dir')!) : undefined,
    poolSize: intOption(str('pool-size'), 'pool-size', 0, 1024, command),
    diskVolumeBytes: mb(intOption(str('disk-volume-mb'), 'disk-volume-mb', 256, 16 * 1024 * 1024, command)),
    runtime: enumOption(str('runtime'), 'runtime', [...builtinRuntimes().names(), AUTO_RUNTIME], command),
    onStop: enumOption(str('on-stop'), 'on-stop', ['keep', 'destroy'] as const, command),
    onIncompatible: enumOption(str('on-incompatible'), 'on-incompatible', ['clean', 'refuse'] as const, command),
    logLevel: enumOption(str('log-level'), 'log-level', ['debug', 'info', 'warn', 'error', 'silent'] as const, command),
    allowedHosts: strs('allowed-host'),
    allowedOrigins: strs('allowed-origin'),
  };
  for (const key of Object.keys(overrides) as (keyof ServerConfig)[]) if (overrides[key] === undefined) delete overrides[key];
  return overrides;
}

function mb(n: number | undefined): number | undefined {
  return n === undefined ? undefined : n * 1024 * 1024;
}

export const serveCommand: Command = {
  name: 'serve',
  summary: 'run the sandbox server',
  help: HELP,
  async run(argv) {
    const { values } = parse('serve', argv, OPTIONS);
    // As a service, a stop keeps the sandboxes for the next server unless told otherwise.
    const overrides = serveOverrides(values, 'serve');
    if (overrides.onStop === undefined && !process.env.PODFLARE_ON_STOP) overrides.onStop = 'keep';
    const config = loadConfig(overrides);
    const reporter = createProgressReporter();
    const mcp = createMcpMount((message) => process.stderr.write(`podflare mcp: ${message}\n`));
    const server = await startServer(config, { onImageProgress: reporter.onProgress, mounts: [mcp] }).finally(() => reporter.finish());
    // The stop handlers first, then the announcement: whoever reads the URL may signal at once.
    const stopped = new Promise<number>((resolve) => {
      let stopping = false;
      const stop = (signal: NodeJS.Signals) => {
        if (stopping) {
          process.stderr.write(`${signal} again: exiting without waiting for sandboxes to stop\n`);
          process.exit(1);
        }
        stopping = true;
        const fate = config.onStop === 'keep' ? 'sandboxes are kept running for the next server' : 'sandboxes are being destroyed';
        process.stderr.write(`${signal}: stopping (${fate}; ${signal} again to force)\n`);
        server.close().then(
          () => resolve(EXIT_OK),
          (err: unknown) => {
            process.stderr.write(`podflare: error while stopping: ${(err as Error).message}\n`);
            resolve(1);
          },
        );
      };
      process.on('SIGINT', stop);
      process.on('SIGTERM', stop);
    });
    process.stdout.write(`podflare listening on ${server.url} (runtime ${server.runtime}, state ${config.stateDir})\n`);
    process.stdout.write(`dashboard: ${server.url}/\n`);
    process.stdout.write(`mcp: ${server.url}${mcp.path}\n`);
    return stopped;
  },
};
