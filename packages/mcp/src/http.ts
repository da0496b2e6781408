/**
 * The Streamable HTTP side: one `node:http` server, one MCP endpoint (`/mcp`), and per MCP session
 * (keyed by the `mcp-session-id` header) its own transport, {@link PodflareMcpServer} and therefore
 * its own sandbox. A session ends — and its sandboxes are destroyed — when the client DELETEs it,
 * when it has been idle for `sessionIdleTimeoutMs`, or when this server closes.
 *
 * Threat model: the endpoint runs arbitrary code (in sandboxes) on behalf of whoever reaches it. On a
 * loopback address it is reachable from this machine only, and the Host/Origin checks stop a web page
 * from reaching it through DNS rebinding or a cross-site request. Any other address requires a bearer
 * token (as the Podflare server itself refuses a non-loopback bind without API keys).
 */
import { createHash, randomUUID, timingSafeEqual } from 'node:crypto';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { isInitializeRequest } from '@modelcontextprotocol/sdk/types.js';
import { hostHeaderName, isLoopbackHost, isServedHost, originOf } from '@podflare/protocol/browser-access';
import { Client } from 'podflare';
import { PodflareMcpServer } from './server.js';
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
const DEFAULT_SESSION_IDLE_TIMEOUT_MS = 30 * 60 * 1000;
/** Biggest initialize request read here (later requests are read, and capped, by the transport). */
const MAX_INIT_BODY = 1024 * 1024;

interface Session {
  transport: StreamableHTTPServerTransport;
  server: PodflareMcpServer;
  lastSeen: number;
  inFlight: number;
}

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
  const serverOptions: PodflareMcpServerOptions = { ...options, client, log };
  const idleTimeoutMs = options.sessionIdleTimeoutMs ?? DEFAULT_SESSION_IDLE_TIMEOUT_MS;
  const sessions = new Map<string, Session>();
  const tokenDigest = token === undefined ? undefined : sha256(token);
  let closing: Promise<void> | undefined;

  const closeSession = async (id: string, why: string): Promise<void> => {
    const session = sessions.get(id);
    if (!session) return;
    sessions.delete(id);
    log(`closing MCP session ${id} (${why})`);
    await session.server.close().catch((err: unknown) => log(`closing session ${id}: ${String(err)}`));
  };

  const handle = async (req: http.IncomingMessage, res: http.ServerResponse): Promise<void> => {
    const url = new URL(req.url ?? '/', 'http://localhost');
    if (url.pathname === '/healthz' && req.method === 'GET') {
      res.writeHead(200, { 'content-type': 'text/plain' }).end('ok');
      return;
    }
    if (url.pathname !== MCP_PATH) {
      sendError(res, 404, -32000, `not found: the MCP endpoint is ${MCP_PATH}`);
      return;
    }
    if (closing) {
      sendError(res, 503, -32000, 'the server is shutting down');
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

    const sessionId = req.headers['mcp-session-id'];
    if (typeof sessionId === 'string') {
      const session = sessions.get(sessionId);
      if (!session) {
        sendError(res, 404, -32001, 'session not found: it ended or never existed; initialize a new one');
        return;
      }
      track(session, res);
      await session.transport.handleRequest(req, res);
      return;
    }

    // No session yet: only an initialize request may open one.
    if (req.method !== 'POST') {
      sendError(res, 400, -32000, 'bad request: no mcp-session-id header; open a session with an initialize POST');
      return;
    }
    let body: unknown;
    try {
      body = JSON.parse((await readBody(req, MAX_INIT_BODY)).toString('utf8'));
    } catch (err) {
      if (err instanceof BodyTooLargeError) sendError(res, 413, -32000, err.message);
      else sendError(res, 400, -32700, 'parse error: the body is not JSON');
      return;
    }
    if (!isInitializeRequest(body)) {
      sendError(res, 400, -32000, 'bad request: no mcp-session-id header; open a session with an initialize request');
      return;
    }
    const server = new PodflareMcpServer(serverOptions);
    const transport: StreamableHTTPServerTransport = new StreamableHTTPServerTransport({
      sessionIdGenerator: () => randomUUID(),
      onsessioninitialized: (id) => {
        const session: Session = { transport, server, lastSeen: Date.now(), inFlight: 0 };
        sessions.set(id, session);
        track(session, res);
        log(`MCP session ${id} opened`);
      },
      // Answer the client's DELETE only once its sandboxes are gone.
      onsessionclosed: () => server.session.dispose(),
    });
    // DELETE, or the transport closing for any other reason: forget the session. The server's own
    // onclose (chained by connect) destroys its sandboxes.
    transport.onclose = () => {
      const id = transport.sessionId;
      if (id !== undefined && sessions.get(id)?.transport === transport) {
        sessions.delete(id);
        log(`MCP session ${id} closed`);
      }
    };
    await server.connect(transport);
    await transport.handleRequest(req, res, body);
    // An initialize the transport rejected never became a session.
    if (transport.sessionId === undefined) await server.close();
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

  const sweeper =
    idleTimeoutMs > 0
      ? setInterval(() => {
          const now = Date.now();
          for (const [id, s] of sessions) {
            if (s.inFlight === 0 && now - s.lastSeen > idleTimeoutMs) void closeSession(id, 'idle');
          }
        }, Math.min(60_000, Math.max(1000, Math.floor(idleTimeoutMs / 2))))
      : undefined;
  sweeper?.unref();

  return {
    url,
    get sessionCount() {
      return sessions.size;
    },
    close() {
      closing ??= (async () => {
        if (sweeper) clearInterval(sweeper);
        const stopped = new Promise<void>((resolve) => httpServer.close(() => resolve()));
        await Promise.all([...sessions.keys()].map((id) => closeSession(id, 'server shutting down')));
        httpServer.closeAllConnections();
        await stopped;
      })();
      return closing;
    },
  };
}

/** Counts a request against its session, so an open SSE stream keeps the session from going idle. */
function track(session: Session, res: http.ServerResponse): void {
  session.inFlight++;
  session.lastSeen = Date.now();
  res.once('close', () => {
    session.inFlight--;
    session.lastSeen = Date.now();
  });
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

function sendError(res: http.ServerResponse, status: number, code: number, message: string): void {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify({ jsonrpc: '2.0', error: { code, message }, id: null }));
}

class BodyTooLargeError extends Error {}

async function readBody(req: http.IncomingMessage, max: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > max) throw new BodyTooLargeError(`the initialize request is over ${max} bytes`);
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}
