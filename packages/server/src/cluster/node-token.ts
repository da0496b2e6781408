/**
 * Gateways authenticate to nodes with a shared token (`X-Podflare-Node-Token`), on top of the
 * caller's API key that the gateway forwards: a node answers only its gateways, so nothing reaches
 * a host's sandboxes around the gateways' placement and routing. Compared in constant time.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Duplex } from 'node:stream';

export const NODE_TOKEN_HEADER = 'x-podflare-node-token';

type Listener = (req: IncomingMessage, res: ServerResponse) => void;

const digest = (s: string) => createHash('sha256').update(s).digest();

/** Throws unless the token is long enough to be a secret. */
export function checkNodeToken(token: string | undefined): string {
  if (!token || token.length < 16) {
    throw new Error('cluster mode needs a shared node token of at least 16 characters: --node-token or PODFLARE_NODE_TOKEN');
  }
  return token;
}

/** Wraps a node's HTTP handler: requests without the gateways' token get 401 (health checks excepted). */
export function requireNodeToken(token: string): (handler: Listener) => Listener {
  const expected = digest(token);
  return (handler) => (req, res) => {
    if (req.url === '/v1/healthz') return handler(req, res);
    const sent = req.headers[NODE_TOKEN_HEADER];
    if (typeof sent === 'string' && timingSafeEqual(digest(sent), expected)) return handler(req, res);
    res.writeHead(401, { 'Content-Type': 'application/json', Connection: 'close' });
    res.end(JSON.stringify({ error: 'this is a cluster node: it answers only its gateways (missing or wrong node token)', code: 'unauthorized' }));
    req.resume();
  };
}

type UpgradeListener = (req: IncomingMessage, socket: Duplex, head: Buffer) => void;

/** The same for a node's WebSocket upgrades (terminals, exposed ports): 401 and closed without the token. */
export function requireNodeTokenOnUpgrade(token: string): (listener: UpgradeListener) => UpgradeListener {
  const expected = digest(token);
  return (listener) => (req, socket, head) => {
    const sent = req.headers[NODE_TOKEN_HEADER];
    if (typeof sent === 'string' && timingSafeEqual(digest(sent), expected)) return listener(req, socket, head);
    const body = JSON.stringify({ error: 'this is a cluster node: it answers only its gateways (missing or wrong node token)', code: 'unauthorized' });
    socket.on('error', () => {});
    socket.end(`HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n` +
      `Connection: close\r\n\r\n${body}`);
  };
}
