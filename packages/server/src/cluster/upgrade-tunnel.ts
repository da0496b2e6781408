/**
 * HTTP Upgrades through a gateway (WebSockets: a sandbox's exposed port, the PTY): the handshake is
 * written anew to the node on a fresh TCP connection of its own (never a pooled keep-alive one), with
 * the node token and the node's Host, then the bytes flow both ways untouched until either side
 * closes. The gateway has checked the caller (Host, Origin, key) before; the node checks again
 * (key, token signature) and answers the handshake itself, 101 or an error, which passes through.
 */
import type { IncomingMessage } from 'node:http';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { NODE_TOKEN_HEADER } from './node-token.js';
import { NodeUnreachableError } from './proxy.js';

/** Request headers not passed to the node: ours to set, or checked here already (Origin: against the gateway's own Host). */
const DROPPED = new Set(['host', 'origin', NODE_TOKEN_HEADER]);

export interface TunnelTarget {
  address: string;
  nodeToken: string;
  connectTimeoutMs: number;
}

/** Connects to the node, sends the handshake and splices the two sockets; rejects if the node cannot be reached. */
export function tunnelUpgrade(req: IncomingMessage, client: Duplex, head: Buffer, target: TunnelTarget): Promise<void> {
  const at = target.address.lastIndexOf(':');
  const host = target.address.slice(0, at).replace(/^\[|\]$/g, '');
  const port = Number(target.address.slice(at + 1));
  return new Promise((resolve, reject) => {
    const upstream = net.connect({ host, port, noDelay: true });
    const timer = setTimeout(() => upstream.destroy(new NodeUnreachableError(`no connection to ${target.address} within ${target.connectTimeoutMs} ms`)),
      target.connectTimeoutMs);
    const failed = (err: Error) => {
      clearTimeout(timer);
      reject(err instanceof NodeUnreachableError ? err : new NodeUnreachableError(`${target.address}: ${err.message}`));
    };
    upstream.once('error', failed);
    upstream.once('connect', () => {
      clearTimeout(timer);
      upstream.off('error', failed);
      let text = `${req.method} ${req.url} HTTP/1.1\r\n`;
      for (let i = 0; i + 1 < req.rawHeaders.length; i += 2) {
        if (!DROPPED.has(req.rawHeaders[i]!.toLowerCase())) text += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
      }
      text += `Host: ${target.address}\r\n${NODE_TOKEN_HEADER}: ${target.nodeToken}\r\n\r\n`;
      upstream.write(text);
      if (head.length) upstream.write(head);
      upstream.on('error', () => client.destroy());
      client.on('error', () => upstream.destroy());
      upstream.on('close', () => client.destroy());
      client.on('close', () => upstream.destroy());
      upstream.pipe(client);
      client.pipe(upstream);
      resolve();
    });
  });
}

/** Answers a refused upgrade with a JSON error body (the API's shape, made by the caller) and closes the socket. */
export function refuseUpgrade(client: Duplex, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body);
  let head = `HTTP/1.1 ${status} ${status === 503 ? 'Service Unavailable' : 'Refused'}\r\nContent-Type: application/json\r\n` +
    `Content-Length: ${Buffer.byteLength(text)}\r\nConnection: close\r\n`;
  for (const [k, v] of Object.entries(headers)) head += `${k}: ${v}\r\n`;
  client.end(`${head}\r\n${text}`);
}
