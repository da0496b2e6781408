/**
 * The MCP side of a Streamable HTTP endpoint, without a listener of its own: given a request that
 * already passed its server's access checks (Host/Origin, bearer key), it answers it in one of two
 * ways.
 *
 * - **Sessions** (the official MCP clients): an `initialize` POST opens a session, keyed by the
 *   `mcp-session-id` header, with its own transport, {@link PodflareMcpServer} and own sandbox. A
 *   session ends — and its sandboxes are destroyed — when the client DELETEs it, when it has been
 *   idle for `sessionIdleTimeoutMs`, or when the handler closes.
 * - **Stateless** (a plain JSON-RPC POST without a session, as `curl` or the hosted product's agent
 *   skill send): each POST stands alone, answered by the SDK's stateless transport
 *   (`sessionIdGenerator: undefined`) with a JSON body. Nothing outlives the request but the
 *   sandboxes themselves: tools need `sandbox_id` (from `create_sandbox`), and sandboxes persist
 *   across calls until `destroy_sandbox` or the Podflare server's idle timeout.
 *
 * Both the standalone `podflare-mcp --http` server (http.ts) and `podflare serve` (which mounts this
 * at `/mcp`, behind its own API keys) use it.
 */
import { randomUUID } from 'node:crypto';
import type * as http from 'node:http';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { isInitializeRequest } from '@modelcontextprotocol/sdk/types.js';
import type { Client } from 'podflare';
import { PodflareMcpServer } from './server.js';
import type { PodflareMcpServerOptions } from './server.js';

/** Options of {@link createMcpHttpHandler}: the tools' options (its `client` is chosen per request). */
export interface McpHttpHandlerOptions extends Omit<PodflareMcpServerOptions, 'client' | 'host' | 'apiKey'> {
  /**
   * A session with no request in flight for this long is closed and its sandboxes destroyed (clients
   * that vanish without a DELETE would otherwise keep them forever). 0 disables it.
   * @default 1800000 (30 minutes)
   */
  sessionIdleTimeoutMs?: number;
}

/** Who is calling, as the server in front of the handler established it. */
export interface McpCaller {
  /** The Podflare client the tools use for this caller (e.g. one holding the caller's API key). */
  client: Client;
  /**
   * The caller's identity (e.g. a digest of its key; '' when there is only one). A session answers
   * only requests of the identity that opened it, so a session id alone is not a credential.
   */
  identity: string;
}

/** Answers MCP requests; see the module comment. */
export interface McpHttpHandler {
  /** Answers one request (GET, POST or DELETE) that passed the server's access checks. */
  handle(req: http.IncomingMessage, res: http.ServerResponse, caller: McpCaller): Promise<void>;
  /** How many MCP sessions are open. */
  readonly sessionCount: number;
  /** Refuses further requests (503), closes every session (destroying their sandboxes) and resolves when done. */
  close(): Promise<void>;
}

const DEFAULT_SESSION_IDLE_TIMEOUT_MS = 30 * 60 * 1000;
/** Biggest request body read here before the transport sees it: the SDK transport's own default cap. */
const MAX_BODY = 4 * 1024 * 1024;

interface Session {
  transport: StreamableHTTPServerTransport;
  server: PodflareMcpServer;
  identity: string;
  lastSeen: number;
  inFlight: number;
}

/**
 * Makes the MCP request handler.
 *
 * @example
 * ```ts
 * const mcp = createMcpHttpHandler({ log: console.error });
 * const client = new Client({ host: 'http://127.0.0.1:7070' });
 * http.createServer((req, res) => void mcp.handle(req, res, { client, identity: '' })).listen(7071);
 * ```
 */
export function createMcpHttpHandler(options: McpHttpHandlerOptions = {}): McpHttpHandler {
  const log = options.log ?? ((message: string) => process.stderr.write(`podflare-mcp: ${message}\n`));
  const idleTimeoutMs = options.sessionIdleTimeoutMs ?? DEFAULT_SESSION_IDLE_TIMEOUT_MS;
  const sessions = new Map<string, Session>();
  let closing: Promise<void> | undefined;

  const closeSession = async (id: string, why: string): Promise<void> => {
    const session = sessions.get(id);
    if (!session) return;
    sessions.delete(id);
    log(`closing MCP session ${id} (${why})`);
    await session.server.close().catch((err: unknown) => log(`closing session ${id}: ${String(err)}`));
  };

  const openSession = async (req: http.IncomingMessage, res: http.ServerResponse, body: unknown, caller: McpCaller) => {
    const server = new PodflareMcpServer({ ...options, client: caller.client, log });
    const transport: StreamableHTTPServerTransport = new StreamableHTTPServerTransport({
      sessionIdGenerator: () => randomUUID(),
      onsessioninitialized: (id) => {
        const session: Session = { transport, server, identity: caller.identity, lastSeen: Date.now(), inFlight: 0 };
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

  /** One POST on its own: a fresh server and transport, both gone once the answer is sent. */
  const answerStateless = async (req: http.IncomingMessage, res: http.ServerResponse, body: unknown, caller: McpCaller) => {
    const server = new PodflareMcpServer({ ...options, client: caller.client, log, stateless: true });
    const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined, enableJsonResponse: true });
    // A client hanging up mid-call aborts its tool call (the SDK passes the abort on as extra.signal).
    res.once('close', () => void server.close().catch((err: unknown) => log(`closing a stateless request: ${String(err)}`)));
    await server.connect(transport);
    await transport.handleRequest(req, res, body);
  };

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
    get sessionCount() {
      return sessions.size;
    },

    async handle(req, res, caller) {
      if (closing) {
        sendError(res, 503, -32000, 'the server is shutting down');
        return;
      }
      const sessionId = req.headers['mcp-session-id'];
      if (typeof sessionId === 'string') {
        const session = sessions.get(sessionId);
        // Another caller's session is answered as unknown: its id is not to be probed.
        if (!session || session.identity !== caller.identity) {
          sendError(res, 404, -32001, 'session not found: it ended or never existed; initialize a new one');
          return;
        }
        track(session, res);
        await session.transport.handleRequest(req, res);
        return;
      }
      if (req.method !== 'POST') {
        res.setHeader('allow', 'POST');
        sendError(res, 405, -32000,
          `${req.method ?? 'this method'} needs an mcp-session-id header: open a session with an initialize POST, ` +
          'or POST JSON-RPC requests (tools/list, tools/call) on their own without one');
        return;
      }
      let body: unknown;
      try {
        body = JSON.parse((await readBody(req, MAX_BODY)).toString('utf8'));
      } catch (err) {
        if (err instanceof BodyTooLargeError) sendError(res, 413, -32000, err.message);
        else sendError(res, 400, -32700, 'parse error: the body is not JSON');
        return;
      }
      if (isInitializeRequest(body)) await openSession(req, res, body, caller);
      else await answerStateless(req, res, body, caller);
    },

    close() {
      closing ??= (async () => {
        if (sweeper) clearInterval(sweeper);
        await Promise.all([...sessions.keys()].map((id) => closeSession(id, 'server shutting down')));
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

/** Answers with a JSON-RPC error body (id null: the request's id may be unknown). */
export function sendError(res: http.ServerResponse, status: number, code: number, message: string): void {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify({ jsonrpc: '2.0', error: { code, message }, id: null }));
}

class BodyTooLargeError extends Error {}

async function readBody(req: http.IncomingMessage, max: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > max) throw new BodyTooLargeError(`the request body is over ${max} bytes`);
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}
