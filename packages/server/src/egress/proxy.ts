/**
 * The egress policy proxy of one sandbox with an allowlist. Its listening sockets live in the
 * sandbox's network namespace (which has nothing else: no route, no other interface), but the
 * code serving them runs here, in the server: nothing inside the sandbox takes part in enforcing
 * the policy. Three doors, all on the sandbox's own addresses:
 *   - an HTTP proxy (plain requests by absolute URL, and CONNECT for TLS and anything else);
 *   - a SOCKS5 proxy (CONNECT);
 *   - a DNS stub that answers allowed names only (NXDOMAIN otherwise), so denied names are never
 *     even looked up outside.
 * Every attempt the policy stops becomes an `egress_denied` event of the sandbox.
 */
import type dgram from 'node:dgram';
import http from 'node:http';
import net from 'node:net';
import { isHostName, type EgressEventData } from '@podflare/protocol';
import type { Logger } from '../log.js';
import type { SandboxEventBody } from '../sandbox-events.js';
import { buildAnswer, formatError, parseQuery, QTYPE, RCODE } from './dns-wire.js';
import { normalizeAddress, type EgressMatcher } from './policy.js';
import type { NameResolver } from './resolver.js';
import { socksHandshake, socksReply, SOCKS_REPLY } from './socks5.js';
import { scanClientHello } from './tls-sni.js';

/** The sandbox-side DNS address (see runtime/namespace/netns-addresses.ts). */
const EGRESS_DNS_HOST = '10.0.2.3';

export interface EgressProxyListeners {
  http: net.Server;
  socks: net.Server;
  dns: dgram.Socket;
  /** Direct connections to port 80 / 443 of any address (see netns-addresses.ts). */
  transparentHttp: net.Server;
  transparentTls: net.Server;
}

export interface EgressProxyOptions {
  matcher: EgressMatcher;
  resolver: NameResolver;
  record: (event: SandboxEventBody) => void;
  log: Logger;
  connectTimeoutMs?: number;
  /** Open connections a sandbox may hold through the proxy at once. */
  maxConnections?: number;
}

type Target = { ok: true; addresses: string[] } | { ok: false; denied: boolean; reason: string };
type Via = EgressEventData['via'];

/** Headers that describe one hop, not the request (RFC 9110 §7.6.1), plus the proxy's own. */
const HOP_BY_HOP = new Set(['connection', 'proxy-connection', 'keep-alive', 'proxy-authorization', 'proxy-authenticate', 'te', 'trailer', 'transfer-encoding', 'upgrade']);

export class EgressProxy {
  private readonly http: http.Server;
  private readonly sockets = new Set<net.Socket>();
  private readonly recentDenials = new Map<string, number>();
  private closed = false;

  constructor(private readonly listeners: EgressProxyListeners, private readonly o: EgressProxyOptions) {
    // No whole-request deadline: uploads through the proxy and CONNECT tunnels may last (a
    // sandbox can only tie up its own connections, which are capped).
    this.http = http.createServer({ requireHostHeader: false, requestTimeout: 0 });
    this.http.on('request', (req, res) => this.guard(this.onRequest(req, res), req.socket));
    this.http.on('connect', (req: http.IncomingMessage, socket: net.Socket, head: Buffer) => this.guard(this.onConnect(req, socket, head), socket));
    this.http.on('clientError', (_err, socket) => socket.destroy());
    listeners.http.on('connection', (socket: net.Socket) => {
      if (this.admit(socket)) this.http.emit('connection', socket);
    });
    listeners.socks.on('connection', (socket: net.Socket) => {
      if (this.admit(socket)) this.guard(this.onSocks(socket), socket);
    });
    listeners.transparentHttp.on('connection', (socket: net.Socket) => {
      if (this.admit(socket)) this.guard(this.onTransparent(socket, 'http'), socket);
    });
    listeners.transparentTls.on('connection', (socket: net.Socket) => {
      if (this.admit(socket)) this.guard(this.onTransparent(socket, 'tls'), socket);
    });
    listeners.dns.on('message', (msg, rinfo) => this.guard(this.onDns(msg, rinfo)));
    listeners.dns.on('error', (err) => this.o.log.warn('egress dns socket error', { error: err.message }));
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.listeners.http.close();
    this.listeners.socks.close();
    this.listeners.transparentHttp.close();
    this.listeners.transparentTls.close();
    try { this.listeners.dns.close(); } catch { /* already closed */ }
    for (const s of this.sockets) s.destroy();
    this.http.close();
  }

  /** Whatever a sandbox sends, a failure ends its connection, never the server. */
  private guard(work: Promise<void>, socket?: net.Socket): void {
    work.catch((err: Error) => {
      this.o.log.warn('egress proxy error', { error: err.message });
      socket?.destroy();
    });
  }

  /** Counts the connection against the sandbox's cap; refuses it over the cap. */
  private admit(socket: net.Socket): boolean {
    if (this.closed || this.sockets.size >= (this.o.maxConnections ?? 256)) {
      socket.destroy();
      return false;
    }
    this.track(socket);
    return true;
  }

  private track(socket: net.Socket): void {
    this.sockets.add(socket);
    socket.once('close', () => this.sockets.delete(socket));
    socket.on('error', () => socket.destroy());
  }

  /** Decides whether `host:port` may be reached, and at which addresses. Records denials. */
  private async target(host: string, port: number | null, via: Via): Promise<Target> {
    const h = host.replace(/^\[(.*)\]$/, '$1').toLowerCase().replace(/\.$/, '');
    const deny = (reason: string): Target => {
      this.deniedEvent({ host: h, port, via, reason });
      return { ok: false, denied: true, reason };
    };
    if (net.isIP(h)) {
      const v = this.o.matcher.addressVerdict(h, port, null);
      return v.allowed ? { ok: true, addresses: [h] } : deny(v.reason);
    }
    if (!isHostName(h)) return deny(`"${host}" is not a host name or address`);
    // Always the host's loopback (RFC 6761), whatever a resolver says: only an address rule opens it.
    if (h === 'localhost' || h.endsWith('.localhost')) return deny(`${h} is the host's loopback: allow it with an address rule`);
    if (!this.o.matcher.nameAllowed(h)) return deny(`${h} is not in the allowlist`);
    let addresses: string[];
    try {
      addresses = await this.o.resolver.resolve(h, 0);
    } catch (err) {
      return { ok: false, denied: false, reason: `cannot resolve ${h}: ${(err as Error).message}` };
    }
    if (addresses.length === 0) return { ok: false, denied: false, reason: `${h} does not resolve` };
    const verdicts = addresses.map((a) => ({ a, v: this.o.matcher.addressVerdict(a, port, h) }));
    const usable = verdicts.filter((x) => x.v.allowed).map((x) => x.a);
    if (usable.length === 0) {
      const first = verdicts[0]!.v as { reason: string };
      return deny(`${h} resolves to ${verdicts.map((x) => x.a).join(', ')}: ${first.reason}`);
    }
    return { ok: true, addresses: usable };
  }

  private deniedEvent(data: EgressEventData): void {
    if (this.closed) return;
    // A resolver asks for A and AAAA at once, and clients retry: one event per attempt is enough.
    const key = `${data.via}|${data.host}|${data.port}|${data.reason}`;
    const now = Date.now();
    const last = this.recentDenials.get(key);
    if (last !== undefined && now - last < 1000) return;
    if (this.recentDenials.size > 1000) this.recentDenials.clear();
    this.recentDenials.set(key, now);
    this.o.log.debug('egress denied', { ...data });
    this.o.record({ type: 'egress_denied', data });
  }

  /** Connects to the first address that answers. */
  private async connect(addresses: string[], port: number): Promise<net.Socket> {
    let last: Error = new Error('no address');
    for (const address of addresses) {
      try {
        return await new Promise<net.Socket>((resolve, reject) => {
          const socket = net.connect({ host: address, port, timeout: this.o.connectTimeoutMs ?? 10_000 });
          socket.once('connect', () => { socket.setTimeout(0); resolve(socket); });
          socket.once('timeout', () => { socket.destroy(); reject(new Error(`connecting to ${address}:${port} timed out`)); });
          socket.once('error', reject);
        });
      } catch (err) {
        last = err as Error;
      }
    }
    throw last;
  }

  private async open(host: string, port: number, via: Via): Promise<{ ok: true; upstream: net.Socket } | { ok: false; denied: boolean; reason: string }> {
    const t = await this.target(host, port, via);
    if (!t.ok) return t;
    try {
      const upstream = await this.connect(t.addresses, port);
      if (this.closed) {
        upstream.destroy();
        return { ok: false, denied: false, reason: 'the sandbox is gone' };
      }
      this.track(upstream);
      this.o.record({ type: 'egress_allowed', data: { host: host.replace(/^\[(.*)\]$/, '$1').toLowerCase(), port, via, address: upstream.remoteAddress } });
      return { ok: true, upstream };
    } catch (err) {
      return { ok: false, denied: false, reason: (err as Error).message };
    }
  }

  /**
   * Relays a tunnel. When the client asked for a name and starts TLS, the server name in its
   * ClientHello must be allowed too: otherwise a tunnel to an allowed name on a shared front (a
   * CDN) could ask that front for any other site. The far side flows at once (some protocols speak
   * first); the client's bytes wait until its ClientHello is read.
   */
  private tunnel(client: net.Socket, upstream: net.Socket, host: string, port: number, via: Via, initial: Buffer): void {
    upstream.pipe(client);
    client.once('close', () => upstream.destroy());
    upstream.once('close', () => client.destroy());
    const name = host.replace(/^\[(.*)\]$/, '$1').toLowerCase().replace(/\.$/, '');
    let buffered = initial;
    const forward = () => {
      if (buffered.length) upstream.write(buffered);
      client.pipe(upstream);
      client.resume();
    };
    if (net.isIP(name)) return forward(); // an address rule allowed it: whatever name TLS asks for goes there
    const timer = setTimeout(() => decide(true), 10_000);
    const onData = (d: Buffer) => {
      buffered = Buffer.concat([buffered, d]);
      decide(false);
    };
    const decide = (timedOut: boolean) => {
      const scan = scanClientHello(buffered);
      if (scan.kind === 'incomplete' && !timedOut) return;
      clearTimeout(timer);
      client.off('data', onData);
      client.pause();
      if (scan.kind === 'not-tls' || (scan.kind === 'hello' && (scan.sni === null || scan.sni === name || this.o.matcher.nameAllowed(scan.sni)))) return forward();
      const reason = scan.kind === 'hello'
        ? `TLS server name ${scan.sni} is not in the allowlist (tunnel to ${name})`
        : `unreadable TLS ClientHello in the tunnel to ${name}`;
      this.deniedEvent({ host: scan.kind === 'hello' ? scan.sni! : name, port, via, reason });
      client.destroy();
      upstream.destroy();
    };
    client.on('data', onData);
    client.resume();
    decide(false);
  }

  private async onRequest(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    let url: URL;
    try {
      url = new URL(req.url ?? '');
    } catch {
      return plain(res, 400, 'this is an HTTP proxy: ask for absolute http:// URLs, or use CONNECT');
    }
    if (url.protocol !== 'http:') return plain(res, 400, `${url.protocol} URLs go through CONNECT`);
    const port = Number(url.port || 80);
    const opened = await this.open(url.hostname, port, 'http');
    if (!opened.ok) return plain(res, opened.denied ? 403 : 502, `podflare egress: ${opened.reason}`);
    const headers: http.OutgoingHttpHeaders = {};
    for (const [name, value] of Object.entries(req.headers)) if (!HOP_BY_HOP.has(name) && value !== undefined) headers[name] = value;
    // The server reached is the one the URL names: a different Host header would let a shared
    // front (a CDN) route the request to a host the policy never saw.
    headers.host = url.host;
    headers.connection = 'close';
    const upstream = http.request({
      method: req.method, path: `${url.pathname}${url.search}`, headers, setHost: false,
      createConnection: () => opened.upstream,
    });
    upstream.on('response', (up) => {
      const out: http.OutgoingHttpHeaders = {};
      for (const [name, value] of Object.entries(up.headers)) if (!HOP_BY_HOP.has(name) && value !== undefined) out[name] = value;
      res.writeHead(up.statusCode ?? 502, up.statusMessage, out);
      up.pipe(res);
    });
    upstream.on('error', (err) => {
      if (!res.headersSent) plain(res, 502, `podflare egress: ${err.message}`);
      else res.destroy();
    });
    res.on('close', () => upstream.destroy());
    req.pipe(upstream);
  }

  private async onConnect(req: http.IncomingMessage, socket: net.Socket, head: Buffer): Promise<void> {
    const m = /^(\[[^\]]+\]|[^:]+):(\d{1,5})$/.exec(req.url ?? '');
    if (!m || Number(m[2]) > 65535) return void socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n');
    const opened = await this.open(m[1]!, Number(m[2]), 'connect');
    if (!opened.ok) {
      const status = opened.denied ? '403 Forbidden' : '502 Bad Gateway';
      const body = `podflare egress: ${opened.reason}\n`;
      return void socket.end(`HTTP/1.1 ${status}\r\nContent-Type: text/plain\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
    }
    socket.write('HTTP/1.1 200 Connection Established\r\n\r\n');
    this.tunnel(socket, opened.upstream, m[1]!, Number(m[2]), 'connect', head);
  }

  private async onSocks(socket: net.Socket): Promise<void> {
    const request = await socksHandshake(socket);
    if (!request) return;
    const opened = await this.open(request.host, request.port, 'socks');
    if (!opened.ok) return socksReply(socket, opened.denied ? SOCKS_REPLY.notAllowed : SOCKS_REPLY.hostUnreachable, true);
    socksReply(socket, SOCKS_REPLY.succeeded);
    this.tunnel(socket, opened.upstream, request.host, request.port, 'socks', request.rest);
  }

  /**
   * A direct connection to port 80 or 443 of some address. Where it was going is the connection's
   * local address (every address is local in the namespace); the name is the Host header or the
   * TLS server name. With a name, the name rules decide and the proxy resolves it itself; without
   * one, the address rules decide on the address.
   */
  private async onTransparent(client: net.Socket, kind: 'http' | 'tls'): Promise<void> {
    const destination = normalizeAddress(client.localAddress ?? '');
    const port = client.localPort ?? 0;
    const head = await readUntil(client, kind === 'http'
      ? (b) => b.includes('\r\n\r\n') || b.length > 16 * 1024
      : (b) => scanClientHello(b).kind !== 'incomplete', 10_000);
    // The sandbox's own loopback and DNS address are its own business, not egress.
    if (destination.startsWith('127.') || destination === EGRESS_DNS_HOST || head.length === 0) return void client.destroy();
    let name: string | null = null;
    if (kind === 'http') {
      const host = /^host:[ \t]*([^\r\n]+)/im.exec(head.toString('latin1'))?.[1]?.trim() ?? '';
      name = host.startsWith('[') ? null : host.replace(/:\d+$/, '') || null;
    } else {
      const scan = scanClientHello(head);
      name = scan.kind === 'hello' ? scan.sni : null;
    }
    if (name !== null && net.isIP(name)) name = null;
    const opened = await this.open(name ?? destination, port, 'transparent');
    if (!opened.ok) {
      if (kind === 'http') {
        const body = `podflare egress: ${opened.reason}\n`;
        client.end(`HTTP/1.1 ${opened.denied ? '403 Forbidden' : '502 Bad Gateway'}\r\nContent-Type: text/plain\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
      } else client.destroy();
      return;
    }
    const upstream = opened.upstream;
    upstream.write(head);
    upstream.pipe(client);
    client.pipe(upstream);
    client.resume();
    client.once('close', () => upstream.destroy());
    upstream.once('close', () => client.destroy());
  }

  private async onDns(msg: Buffer, rinfo: dgram.RemoteInfo): Promise<void> {
    const send = (answer: Buffer | null) => {
      if (answer && !this.closed) this.listeners.dns.send(answer, rinfo.port, rinfo.address, () => undefined);
    };
    const q = parseQuery(msg);
    if (!q) return send(formatError(msg));
    if (!isHostName(q.name) || !this.o.matcher.nameAllowed(q.name)) {
      this.deniedEvent({ host: q.name, port: null, via: 'dns', reason: `${q.name} is not in the allowlist` });
      return send(buildAnswer(q, RCODE.nxDomain));
    }
    if (q.qclass !== 1 || (q.type !== QTYPE.A && q.type !== QTYPE.AAAA)) return send(buildAnswer(q, RCODE.noError));
    try {
      const addresses = await this.o.resolver.resolve(q.name, q.type === QTYPE.A ? 4 : 6);
      // Only addresses a connection could go to: the rest would fail at the proxy anyway.
      send(buildAnswer(q, RCODE.noError, addresses.filter((a) => this.o.matcher.addressVerdict(a, null, q.name).allowed)));
    } catch {
      send(buildAnswer(q, RCODE.servFail));
    }
  }
}

/** Collects what a client sends until `enough` says so, it stops, or time runs out; leaves it paused. */
function readUntil(socket: net.Socket, enough: (b: Buffer) => boolean, timeoutMs: number): Promise<Buffer> {
  return new Promise((resolve) => {
    let buf = Buffer.alloc(0);
    const finish = () => {
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('end', finish);
      socket.pause();
      resolve(buf);
    };
    const onData = (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      if (enough(buf)) finish();
    };
    const timer = setTimeout(finish, timeoutMs);
    socket.on('data', onData);
    socket.once('end', finish);
  });
}

function plain(res: http.ServerResponse, status: number, text: string): void {
  if (res.headersSent) return void res.destroy();
  res.writeHead(status, { 'Content-Type': 'text/plain', Connection: 'close' });
  res.end(text + '\n');
}
