/**
 * The exposed-port proxy (docs/ports.md): HTTP requests and WebSocket upgrades under
 *   /v1/sandboxes/:id/ports/:port/proxy/…   with the API key of the sandbox's owner, or
 *   /v1/ports/:token/…                      with a signed URL (SandboxPorts.sign),
 * forwarded, streamed both ways, to 127.0.0.1:port inside that sandbox.
 *
 * Threat model. The caller may be anyone on the network, the sandbox's server is hostile:
 * - Which sandbox and port is decided only by the path's id (checked against the key's owner) or the
 *   token's HMAC; the connection is made inside that sandbox's network namespace to its own loopback.
 *   A path can never lead to the server's API: what follows the prefix goes, unnormalized, to the
 *   sandbox, and the server's routes are never consulted for it. `..` in it is the sandbox's business.
 * - The request is parsed by Node's strict HTTP parser and written anew to the sandbox (one fresh
 *   connection per request, `Connection: close`): no smuggling of a second request through framing
 *   (conflicting Content-Length / Transfer-Encoding are refused by the parser), and the caller's API
 *   key (`Authorization`) never reaches the sandbox.
 * - The response is the sandbox's and is served from the server's own origin: it gets
 *   `Content-Security-Policy: sandbox …` (an opaque origin: its scripts can read neither the
 *   dashboard's storage nor call the API as the dashboard), and its `Set-Cookie` is dropped (cookies
 *   would land on the server's origin). Hop-by-hop headers are dropped both ways.
 */
import http, { type IncomingMessage, type ServerResponse } from 'node:http';
import type { Duplex } from 'node:stream';
import { SANDBOX_ID_SOURCE } from '@podflare/protocol/sandbox';
import { ApiError, toApiError } from './api-error.js';
import type { Logger } from '../log.js';
import type { LiveSandbox, SandboxManager } from '../sandbox-manager.js';
import type { KeyRing } from './auth.js';
import type { BrowserGuard } from './browser-guard.js';

const KEY_PATH = new RegExp(`^/v1/sandboxes/(${SANDBOX_ID_SOURCE})/ports/(\\d{1,5})/proxy(/[^?#]*)?(\\?.*)?$`);
const SIGNED_PATH = /^\/v1\/ports\/([^/?#]{1,300})(\/[^?#]*)?(\?.*)?$/;
/** Headers that describe one connection, not the message (RFC 9110 7.6.1), plus ours to drop. */
const HOP_BY_HOP = new Set([
  'connection', 'keep-alive', 'proxy-connection', 'proxy-authenticate', 'proxy-authorization', 'te', 'trailer',
  'transfer-encoding', 'upgrade', 'host',
]);
/** An opaque origin for whatever the sandbox serves: it may run scripts, not as the server's origin. */
const RESPONSE_CSP = 'sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads allow-pointer-lock';

/** A request for an exposed port, as read from its target. */
export type PortTarget =
  | { kind: 'key'; sandboxId: string; port: number; path: string }
  | { kind: 'signed'; token: string; path: string };

/** The exposed-port target of a raw request target, or null when it is not one. */
export function matchPortTarget(target: string | undefined): PortTarget | null {
  if (!target) return null;
  let m = KEY_PATH.exec(target);
  if (m) return { kind: 'key', sandboxId: m[1]!, port: Number(m[2]), path: (m[3] || '/') + (m[4] ?? '') };
  m = SIGNED_PATH.exec(target);
  if (m) return { kind: 'signed', token: m[1]!, path: (m[2] || '/') + (m[3] ?? '') };
  return null;
}

export class PortProxy {
  constructor(
    private readonly manager: SandboxManager,
    private readonly keys: KeyRing,
    private readonly guard: BrowserGuard,
    private readonly log: Logger,
  ) {}

  /** Which sandbox and port a request may reach (401/403/404 otherwise). */
  private async resolve(req: IncomingMessage, target: PortTarget): Promise<{ s: LiveSandbox; port: number; dropAuth: boolean }> {
    // A foreign Host is refused as everywhere (DNS rebinding). The key route also refuses a foreign
    // Origin: a server without keys would otherwise let any web page the user visits reach every
    // sandbox's ports (browsers send Origin on cross-origin requests; the SDKs and curl do not).
    // The signed-URL route is the one made for browsers: its token is the credential.
    if (target.kind === 'key') {
      this.guard.checkUpgrade(req);
      const owner = this.keys.authenticate(req);
      return { s: await this.manager.get(target.sandboxId, owner || undefined), port: target.port, dropAuth: true };
    }
    this.guard.checkHost(req);
    const grant = this.manager.ports.verify(target.token);
    return { s: await this.manager.get(grant.sandboxId), port: grant.port, dropAuth: false };
  }

  /** Forwards one HTTP request; throws an ApiError (answered by the app) before anything was sent. */
  async handleRequest(req: IncomingMessage, res: ServerResponse, target: PortTarget): Promise<void> {
    const { s, port, dropAuth } = await this.resolve(req, target);
    const socket = await this.manager.ports.connect(s, port);
    const headers = forwardHeaders(req.rawHeaders, dropAuth);
    headers.push('Host', `localhost:${port}`, 'Connection', 'close');
    await new Promise<void>((resolve, reject) => {
      const upstream = http.request({ createConnection: () => socket, method: req.method, path: target.path, headers, setHost: false });
      const abort = () => { upstream.destroy(); socket.destroy(); };
      res.once('close', abort);
      upstream.once('error', (err) => {
        res.off('close', abort);
        if (!res.headersSent) reject(new ApiError('unavailable', `the sandbox's server on port ${port} failed: ${err.message}`));
        else { res.destroy(); resolve(); }
      });
      upstream.once('response', (up) => {
        const out: string[] = [];
        for (let i = 0; i + 1 < up.rawHeaders.length; i += 2) {
          const name = up.rawHeaders[i]!;
          const lower = name.toLowerCase();
          if (HOP_BY_HOP.has(lower) || lower === 'set-cookie' || lower === 'content-security-policy-report-only') continue;
          out.push(name, up.rawHeaders[i + 1]!);
        }
        out.push('Content-Security-Policy', RESPONSE_CSP);
        res.writeHead(up.statusCode ?? 502, up.statusMessage, out);
        up.pipe(res);
        up.once('end', resolve);
        up.once('error', () => { res.destroy(); resolve(); });
      });
      req.pipe(upstream);
    });
  }

  /** A WebSocket (or any Upgrade) request: the handshake and then the bytes, both ways. */
  async handleUpgrade(req: IncomingMessage, client: Duplex, head: Buffer, target: PortTarget): Promise<void> {
    let upstream: Duplex;
    try {
      const { s, port, dropAuth } = await this.resolve(req, target);
      upstream = await this.manager.ports.connect(s, port);
      const headers = forwardHeaders(req.rawHeaders, dropAuth, ['connection', 'upgrade']);
      headers.push('Host', `localhost:${port}`);
      let text = `${req.method} ${target.path} HTTP/1.1\r\n`;
      for (let i = 0; i < headers.length; i += 2) text += `${headers[i]}: ${headers[i + 1]}\r\n`;
      upstream.write(text + '\r\n');
      if (head.length) upstream.write(head);
    } catch (err) {
      return refuseUpgrade(client, err, this.log);
    }
    upstream.on('error', () => client.destroy());
    client.on('error', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
    client.on('close', () => upstream.destroy());
    // A client that ends its side is done (WebSockets do not half-close): what the sandbox's
    // server still sends has a moment to arrive, then both sides go, whether or not that server
    // ever closes its end (a held connection, a relay process in the sandbox, otherwise).
    client.once('end', () => setTimeout(() => { upstream.destroy(); client.destroy(); }, UPGRADE_END_GRACE_MS).unref());
    upstream.pipe(client);
    client.pipe(upstream);
  }
}

/** The request's headers for the sandbox: hop-by-hop ones dropped (but `keep`), and the API key. */
function forwardHeaders(raw: string[], dropAuth: boolean, keep: string[] = []): string[] {
  const out: string[] = [];
  for (let i = 0; i + 1 < raw.length; i += 2) {
    const lower = raw[i]!.toLowerCase();
    if (HOP_BY_HOP.has(lower) && !keep.includes(lower)) continue;
    if (dropAuth && lower === 'authorization') continue;
    out.push(raw[i]!, raw[i + 1]!);
  }
  return out;
}

/** How long a proxied upgrade lives on after its client ended its side. */
const UPGRADE_END_GRACE_MS = 2000;

/** Answers a refused upgrade with the API's JSON error and closes the socket. */
function refuseUpgrade(client: Duplex, err: unknown, log: Logger): void {
  const apiError = toApiError(err) ?? new ApiError('internal', `internal error: ${(err as Error)?.message ?? String(err)}`);
  if (!toApiError(err)) log.error('port upgrade failed', { error: (err as Error)?.stack ?? String(err) });
  const body = JSON.stringify(apiError.toBody());
  client.end(`HTTP/1.1 ${apiError.status} ${http.STATUS_CODES[apiError.status] ?? 'Error'}\r\n` +
    `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
}
