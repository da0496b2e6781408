/**
 * A browser's WebSocket cannot carry an `Authorization` header: the dashboard's terminal offers its
 * API key as a subprotocol instead (`podflare.key.<base64url key>`, beside `podflare.pty`), the
 * way Kubernetes' API server takes bearer tokens on WebSockets. The server answers with
 * `podflare.pty` only: the key is never echoed back. A key in the header wins over one here.
 */
import type { IncomingMessage } from 'node:http';

/** The subprotocol the PTY socket answers with when the client offers it. */
export const PTY_PROTOCOL = 'podflare.pty';
const KEY_PREFIX = 'podflare.key.';

/** The subprotocols a WebSocket handshake offers. */
export function offeredProtocols(req: IncomingMessage): string[] {
  const header = req.headers['sec-websocket-protocol'];
  const text = Array.isArray(header) ? header.join(',') : header ?? '';
  return text.split(',').map((p) => p.trim()).filter(Boolean).slice(0, 8);
}

/** The API key offered as a subprotocol, if any (undefined for a malformed one: the request then has no key). */
export function keyFromProtocols(req: IncomingMessage): string | undefined {
  const entry = offeredProtocols(req).find((p) => p.startsWith(KEY_PREFIX));
  const encoded = entry?.slice(KEY_PREFIX.length);
  if (!encoded || !/^[A-Za-z0-9_-]{1,700}$/.test(encoded)) return undefined;
  const key = Buffer.from(encoded, 'base64url').toString('utf8');
  return /^\S{1,512}$/.test(key) ? key : undefined;
}
