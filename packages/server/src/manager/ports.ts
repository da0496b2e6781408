/**
 * Exposed ports: a server listening inside a sandbox, reached through the Podflare server (HTTP and
 * WebSocket, proxied in http/port-proxy.ts). Access is by API key (the sandbox's owner) or by a
 * signed URL: a token naming one sandbox, one port and an expiry, HMAC-signed with a secret this
 * server draws at start (so its URLs end with it). The token is a capability: whoever holds it
 * reaches that one port of that one sandbox until it expires, and nothing else.
 *
 * The connection is made by the runtime inside the sandbox's own network namespace, to its own
 * 127.0.0.1 (runtime/namespace/port-connector.ts): never to another sandbox, never to the host (the
 * server's API included). Inbound only, so it works with egress off. A runtime that cannot dial
 * into its sandboxes (the VM runtime) gets a relay process in the sandbox instead (port-relay.ts),
 * which dials the same 127.0.0.1 from inside.
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import type { Duplex } from 'node:stream';
import { SANDBOX_ID_PATTERN } from '@podflare/protocol';
import { SandboxError } from '@podflare/runtime';
import type { LiveSandbox } from './live-sandbox.js';
import { relayPort } from './port-relay.js';
import type { SandboxProcesses } from './processes.js';

/** Default lifetime of a signed URL. */
export const DEFAULT_PORT_URL_TTL_SECONDS = 3600;
export const MAX_PORT_URL_TTL_SECONDS = 7 * 24 * 3600;

export interface PortGrant {
  sandboxId: string;
  port: number;
  /** Epoch seconds. */
  expiresAt: number;
}

export class SandboxPorts {
  private readonly secret = randomBytes(32);

  constructor(
    /** Where the runtime cannot dial in: the relay process is one of the sandbox's (port-relay.ts). */
    private readonly processes?: SandboxProcesses,
    private readonly now: () => number = Date.now,
  ) {}

  /** A token for one port of one sandbox, valid `ttlSeconds`. */
  sign(sandboxId: string, port: number, ttlSeconds = DEFAULT_PORT_URL_TTL_SECONDS): { token: string; expiresAt: number } {
    const expiresAt = Math.floor(this.now() / 1000) + ttlSeconds;
    const payload = `${sandboxId}.${port}.${expiresAt}`;
    return { token: `${payload}.${this.mac(payload)}`, expiresAt };
  }

  /** What a token grants; 401 for a forged, malformed or expired one. */
  verify(token: string): PortGrant {
    const parts = token.split('.');
    const [sandboxId, portText, expText, mac] = parts;
    const bad = () => new SandboxError('unauthorized', 'invalid or expired port URL: ask for a new one (getHost / get_host)');
    if (parts.length !== 4 || !SANDBOX_ID_PATTERN.test(sandboxId!) || !/^\d{1,5}$/.test(portText!) || !/^\d{1,12}$/.test(expText!)) throw bad();
    const expected = Buffer.from(this.mac(`${sandboxId}.${portText}.${expText}`));
    const given = Buffer.from(mac!);
    if (given.length !== expected.length || !timingSafeEqual(given, expected)) throw bad();
    const expiresAt = Number(expText);
    if (expiresAt * 1000 < this.now()) throw bad();
    return { sandboxId: sandboxId!, port: checkPort(Number(portText)), expiresAt };
  }

  /** A socket connected to `port` inside the sandbox; marks the sandbox as used. */
  async connect(s: LiveSandbox, port: number): Promise<Duplex> {
    s.record.lastActiveAt = Date.now();
    if (s.rt.connectPort) return s.rt.connectPort(checkPort(port));
    if (!this.processes) throw new SandboxError('conflict', `the ${s.record.runtime} runtime cannot expose ports (the namespace runtime can)`);
    return relayPort(this.processes, s, checkPort(port));
  }

  private mac(payload: string): string {
    return createHmac('sha256', this.secret).update(payload).digest('base64url');
  }
}

export function checkPort(port: number): number {
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new SandboxError('bad_request', `port: must be 1-65535, got ${port}`, { field: 'port' });
  return port;
}
