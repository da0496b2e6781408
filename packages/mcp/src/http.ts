/**
 * The standalone Streamable HTTP server (`podflare-mcp --http`): one `node:http` listener whose MCP
 * endpoint answers at both `/mcp` and `/` (the hosted product's clients POST to the server URL
 * itself). Sessions for the clients that open them, and stateless JSON-RPC POSTs for those that do
 * not, are http-handler.ts's job; this module adds the listener and its access checks.
 *
 * Threat model: the endpoint runs arbitrary code (in sandboxes) on behalf of whoever reaches it. On a
 * loopback address it is reachable from this machine only, and the Host/Origin checks stop a web page
 * from reaching it through DNS rebinding or a cross-site request. Any other address requires a bearer
 * token (as the Podflare server itself refuses a non-loopback bind without API keys).
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import { hostHeaderName, isLoopbackHost, isServedHost, originOf } from '@podflare/protocol/browser-access';
import { Client } from 'podflare';
import { createMcpHttpHandler, sendError } from './http-handler.js';
import type { PodflareMcpServerOptions } from './server.js';
/** Options of {@link startPodflareMcpHttpServer}: the per-session server options plus where to listen. */
export interface PodflareMcpHttpOptions extends PodflareMcpServerOptions {
  /**
   * TCP port; 0 picks a free one (see {@link PodflareMcpHttpServer.url}).
   * @default 7071
   */
  port?: number;
  /**
   * Address to listen on. Anything but a loopback address requires `token`.
   * @default '127.0.0.1'
   */
  listenHost?: string;
  /**
   * Bearer token clients must send (`Authorization: Bearer <token>`).
   * @default process.env.PODFLARE_MCP_TOKEN (none: only allowed on loopback)
   */
  token?: string;
  /**
   * A session with no request in flight for this long is closed and its sandboxes destroyed (clients
   * that vanish without a DELETE would otherwise keep them forever). 0 disables it.
   * @default 1800000 (30 minutes)
   */
  sessionIdleTimeoutMs?: number;
}

/** A running Streamable HTTP MCP server. */
export interface PodflareMcpHttpServer {
  /** The MCP endpoint, e.g. `http://127.0.0.1:7071/mcp`. */
  readonly url: string;
  /** How many MCP sessions are open. */
  readonly sessionCount: number;
  /** Stops listening, closes every session (destroying their sandboxes) and resolves when done. */
  close(): Promise<void>;
}

export const DEFAULT_HTTP_PORT = 7071;
export const MCP_PATH = '/mcp';
/** Paths the MCP endpoint answers at: the hosted product's clients POST to the server URL itself. */
const MCP_PATHS: ReadonlySet<string> = new Set([MCP_PATH, '/']);

/**
 * Starts the Streamable HTTP MCP server.
 *
 * @example
 * ```ts
 * const mcp = await startPodflareMcpHttpServer({ port: 0, host: 'http://127.0.0.1:7070' });
 * console.log(mcp.url);   // http://127.0.0.1:41235/mcp
 * await mcp.close();
 * ```
 */
export async function startPodflareMcpHttpServer(options: PodflareMcpHttpOptions = {}): Promise<PodflareMcpHttpServer> {
  const listenHost = options.listenHost ?? '127.0.0.1';
  const loopback = isLoopback(listenHost);
  const token = options.token ?? (process.env.PODFLARE_MCP_TOKEN || undefined);
  if (!loopback && token === undefined) {
    throw new Error(
      `refusing to listen on ${listenHost} without a token: anyone who reaches the endpoint can run code. ` +
        'Set PODFLARE_MCP_TOKEN (clients then send "Authorization: Bearer <token>"), or listen on 127.0.0.1.',
    );
  }
  const log = options.log ?? ((message: string) => process.stderr.write(`podflare-mcp: ${message}\n`));
  // One connection pool to the Podflare server for all sessions.
  const client = options.client ?? new Client({ host: options.host, apiKey: options.apiKey });
  const mcp = createMcpHttpHandler({ ...options, log });
  const caller = { client, identity: '' };
  const tokenDigest = token === undefined ? undefined : sha256(token);
  let closing: Promise<void> | undefined;

  const handle = async (req: http.IncomingMessage, res: http.ServerResponse): Promise<void> => {
    const url = new URL(req.url ?? '/', 'http://localhost');
    if (url.pathname === '/healthz' && req.method === 'GET') {
      res.writeHead(200, { 'content-type': 'text/plain' }).end('ok');
      return;
    }
    if (!MCP_PATHS.has(url.pathname)) {
      sendError(res, 404, -32000, `not found: the MCP endpoint is ${MCP_PATH} (or /)`);
      return;
    }
    const refusal = loopback ? checkLocalRequest(req, listenHost) : undefined;
    if (refusal) {
      sendError(res, 403, -32000, refusal);
      return;
    }
    if (tokenDigest && !hasToken(req, tokenDigest)) {
      res.setHeader('www-authenticate', 'Bearer');
      sendError(res, 401, -32001, 'unauthorized: send "Authorization: Bearer <token>" (PODFLARE_MCP_TOKEN)');
      return;
    }
    await mcp.handle(req, res, caller);
  };

  const httpServer = http.createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      log(`HTTP ${req.method} ${req.url}: ${err instanceof Error ? err.stack ?? err.message : String(err)}`);
      if (!res.headersSent) sendError(res, 500, -32603, 'internal error');
      else res.end();
    });
  });
  // SSE streams are long-lived; keep-alive frames keep them open, so no request timeout here.
  httpServer.requestTimeout = 0;

  await new Promise<void>((resolve, reject) => {
    httpServer.once('error', reject);
    httpServer.listen(options.port ?? DEFAULT_HTTP_PORT, listenHost, () => {
      httpServer.off('error', reject);
      resolve();
    });
  });
  const address = httpServer.address() as AddressInfo;
  const hostForUrl = address.family === 'IPv6' ? `[${address.address}]` : address.address;
  const url = `http://${hostForUrl}:${address.port}${MCP_PATH}`;

  return {
    url,
    get sessionCount() {
      return mcp.sessionCount;
    },
    close() {
      closing ??= (async () => {
        const stopped = new Promise<void>((resolve) => httpServer.close(() => resolve()));
        await mcp.close();
        httpServer.closeAllConnections();
        await stopped;
      })();
      return closing;
    },
  };
}

/**
 * DNS-rebinding and cross-site protection for a loopback listener (the threat model is in
 * @podflare/protocol's browser-access, shared with the Podflare API): the Host must name this
 * machine (a loopback name or an IP literal: rebinding needs a name), and a browser's Origin (when
 * sent) must be local too. Unlike the API, which serves a dashboard of its own, any local origin
 * may call: browser-based MCP clients run on local pages of their own.
 */
function checkLocalRequest(req: http.IncomingMessage, listenHost: string): string | undefined {
  if (!isServedHost(req.headers.host, [listenHost])) return `forbidden: Host header ${JSON.stringify(req.headers.host ?? '')} is not local`;
  const origin = req.headers.origin;
  if (origin !== undefined && origin !== 'null') {
    const serialized = originOf(origin);
    const originHost = serialized === undefined ? undefined : hostHeaderName(new URL(serialized).host);
    const local = originHost !== undefined && (isLoopbackHost(originHost) || originHost === listenHost);
    if (!local) return `forbidden: Origin ${JSON.stringify(origin)} is not local`;
  }
  return undefined;
}

/** A listen address that is loopback for sure (a `*.localhost` name would go through the resolver). */
function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}

function sha256(text: string): Buffer {
  return createHash('sha256').update(text).digest();
}

/** Compares digests so the comparison takes the same time whatever the token's length. */
function hasToken(req: http.IncomingMessage, digest: Buffer): boolean {
  const match = /^Bearer\s+(.+)$/i.exec(req.headers.authorization ?? '');
  return match !== null && timingSafeEqual(sha256(match[1]!.trim()), digest);
}
