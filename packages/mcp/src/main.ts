#!/usr/bin/env node
/**
 * The `podflare-mcp` command: MCP over stdio (the default, for desktop clients that spawn it) or
 * Streamable HTTP (`--http`). Under stdio, stdout is the protocol channel: every diagnostic goes to
 * stderr. The session's sandboxes are destroyed before the process exits, whichever way the
 * session ends (stdin closed, SIGTERM/SIGINT/SIGHUP, the client hanging up).
 */
import { parseArgs } from 'node:util';
import { StdioServerTransport } from '@modelcontextprotocol/sdk/server/stdio.js';
import { Client } from 'podflare';
import { DEFAULT_HTTP_PORT, MCP_PATH, startPodflareMcpHttpServer } from './http.js';
import { SERVER_VERSION, createPodflareMcpServer } from './server.js';
import type { PodflareMcpServerOptions } from './server.js';

const EXIT_OK = 0;
const EXIT_FAILURE = 1;
const EXIT_USAGE = 2;
/** How long shutdown may take (destroying sandboxes) before the process exits anyway. */
const SHUTDOWN_TIMEOUT_MS = 10_000;

const HELP = `Usage: podflare-mcp [--server URL] [--http [--port N] [--host ADDR]]

Podflare's MCP server: sandboxes with a persistent Python interpreter, fork, diff and merge as tools
for Claude Desktop, Cursor, Zed and any MCP client. Speaks MCP over stdio unless --http is given.

Options:
  --server URL             Podflare server (default: $PODFLARE_HOST, else $PODFLARE_HOSTD_URL, else http://127.0.0.1:7070)
  --http                   Serve Streamable HTTP at http://ADDR:PORT${MCP_PATH} instead of stdio
  --port N                 HTTP port (default ${DEFAULT_HTTP_PORT}; 0 picks a free one)
  --host ADDR              HTTP listen address (default 127.0.0.1; any other needs PODFLARE_MCP_TOKEN)
  --idle-timeout SECONDS   Idle timeout of the sandboxes it creates (default: the Podflare server's)
  --no-session-sandbox     No per-session sandbox: every tool call must name its sandbox_id
  -h, --help               This help
  -v, --version            The version

Environment:
  PODFLARE_HOST            Podflare server URL (overridden by --server)
  PODFLARE_HOSTD_URL       the same, under the hosted SDKs' name (read when PODFLARE_HOST is unset)
  PODFLARE_API_KEY         API key for the Podflare server
  PODFLARE_MCP_TOKEN       Bearer token HTTP clients must send (required off loopback)
`;

class UsageError extends Error {}

const log = (message: string): void => {
  process.stderr.write(`podflare-mcp: ${message}\n`);
};

interface Cli {
  http: boolean;
  port: number;
  listenHost: string;
  server: PodflareMcpServerOptions;
}

function parse(argv: string[]): Cli | 'help' | 'version' {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        server: { type: 'string' },
        http: { type: 'boolean' },
        port: { type: 'string' },
        host: { type: 'string' },
        'idle-timeout': { type: 'string' },
        'no-session-sandbox': { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
        version: { type: 'boolean', short: 'v' },
      },
    }));
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  if (values.help) return 'help';
  if (values.version) return 'version';
  if (!values.http && (values.port !== undefined || values.host !== undefined)) {
    throw new UsageError('--port and --host only apply with --http');
  }
  const port = values.port === undefined ? DEFAULT_HTTP_PORT : integer('--port', values.port, 0, 65535);
  const idle = values['idle-timeout'] === undefined ? undefined : integer('--idle-timeout', values['idle-timeout'], 1, 7 * 24 * 3600);
  let client: Client;
  try {
    client = new Client({ host: values.server });
  } catch (err) {
    throw new UsageError(`--server / PODFLARE_HOST: ${(err as Error).message}`);
  }
  return {
    http: values.http === true,
    port,
    listenHost: values.host ?? '127.0.0.1',
    server: { client, sessionSandbox: values['no-session-sandbox'] !== true, idleTimeoutSeconds: idle, log },
  };
}

function integer(flag: string, text: string, min: number, max: number): number {
  const n = Number(text);
  if (!/^\d+$/.test(text) || n < min || n > max) throw new UsageError(`${flag} must be an integer from ${min} to ${max}, got "${text}"`);
  return n;
}

/** Stops once, whatever asks first; `stop` may be called again (e.g. a second signal) harmlessly. */
function onceShutdown(close: () => Promise<void>): (why: string) => void {
  let stopping = false;
  return (why) => {
    if (stopping) return;
    stopping = true;
    log(`shutting down (${why})`);
    const force = setTimeout(() => {
      log(`shutdown took over ${SHUTDOWN_TIMEOUT_MS} ms; exiting without waiting for the sandboxes`);
      process.exit(EXIT_FAILURE);
    }, SHUTDOWN_TIMEOUT_MS);
    force.unref();
    close().then(
      () => process.exit(EXIT_OK),
      (err: unknown) => {
        log(`shutdown failed: ${String(err)}`);
        process.exit(EXIT_FAILURE);
      },
    );
  };
}

async function runStdio(cli: Cli): Promise<void> {
  const server = createPodflareMcpServer(cli.server);
  const transport = new StdioServerTransport();
  const stop = onceShutdown(() => server.close());
  // Set before connect(), which chains it: the transport closing for any reason ends the process.
  transport.onclose = () => stop('transport closed');
  await server.connect(transport);
  // The client closing our stdin (or dying) is the usual end of a stdio session.
  process.stdin.once('end', () => stop('stdin closed'));
  process.stdin.once('close', () => stop('stdin closed'));
  process.stdout.on('error', (err) => stop(`stdout: ${err.message}`));
  for (const signal of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) process.on(signal, () => stop(signal));
  log(`serving MCP over stdio (Podflare server ${cli.server.client!.host})`);
  warnIfUnreachable(cli.server.client!);
}

async function runHttp(cli: Cli): Promise<void> {
  const http = await startPodflareMcpHttpServer({ ...cli.server, port: cli.port, listenHost: cli.listenHost });
  const stop = onceShutdown(() => http.close());
  for (const signal of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) process.on(signal, () => stop(signal));
  log(`listening on ${http.url} (Podflare server ${cli.server.client!.host})`);
  warnIfUnreachable(cli.server.client!);
}

/** Says so early when the Podflare server is down; the MCP server still starts (it may come up later). */
function warnIfUnreachable(client: Client): void {
  client.health().catch((err: unknown) => log(`warning: ${err instanceof Error ? err.message : String(err)}`));
}

export async function main(argv: string[]): Promise<number | undefined> {
  let cli: ReturnType<typeof parse>;
  try {
    cli = parse(argv);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`podflare-mcp: ${err.message}\n\n${HELP}`);
    return EXIT_USAGE;
  }
  if (cli === 'help') {
    process.stdout.write(HELP);
    return EXIT_OK;
  }
  if (cli === 'version') {
    process.stdout.write(`podflare-mcp ${SERVER_VERSION}\n`);
    return EXIT_OK;
  }
  // A bug in one tool call must not take the session (and its sandbox) down with it.
  process.on('uncaughtException', (err) => log(`unexpected error: ${err.stack ?? err.message}`));
  process.on('unhandledRejection', (reason) => log(`unexpected rejection: ${reason instanceof Error ? reason.stack ?? reason.message : String(reason)}`));
  try {
    if (cli.http) await runHttp(cli);
    else await runStdio(cli);
  } catch (err) {
    log(err instanceof Error ? err.message : String(err));
    return EXIT_FAILURE;
  }
  // Serving: the process lives until a shutdown path calls process.exit.
  return undefined;
}

main(process.argv.slice(2)).then(
  (code) => {
    if (code !== undefined) process.exitCode = code;
  },
  (err: unknown) => {
    log(err instanceof Error ? err.stack ?? err.message : String(err));
    process.exitCode = EXIT_FAILURE;
  },
);
