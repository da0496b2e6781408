/**
 * `podflare gateway`: stateless front of a cluster (run any number). It authenticates callers (the
 * same API keys as the nodes), places creates (placement.ts), and routes every other sandbox call
 * to the node that owns the sandbox through an id → host cache. PostgreSQL is the truth: a cache
 * miss reads it, NOTIFY only wakes the host table, a node's "not here" (404) forces a re-read. The
 * exec path makes no database call: a cache hit and the in-memory host table decide. Answers
 * stream through unbuffered (proxy.ts).
 *
 * Idempotent creates: a create with an `Idempotency-Key` header is recorded (owner, key) before it
 * is placed and stamps the key into the sandbox's metadata (`podflare:idempotency-key`), so a retry
 * of the same create — through this gateway or another, even after the first gateway died mid-way —
 * answers the sandbox the first attempt made instead of making a second.
 */
import { randomBytes } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Duplex } from 'node:stream';
import pg from 'pg';
import { SANDBOX_ID_PATTERN, type ClusterHost } from '@podflare/protocol';
import type { ServerConfig } from '../config.js';
import { ApiError } from '../http/api-error.js';
import { bearerKey, KeyRing } from '../http/auth.js';
import { readJson, sendJson } from '../http/body.js';
import { BrowserGuard } from '../http/browser-guard.js';
import type { HttpMount } from '../http/mounts.js';
import { matchPortTarget, type PortTarget } from '../http/port-proxy.js';
import { matchPtyTarget } from '../http/pty-socket.js';
import { createLogger, type Logger } from '../log.js';
import { migrate } from '../store/pg-migrations.js';
import { openPgPool } from '../store/pg-pool.js';
import { HostTable, type HostView } from './host-table.js';
import { acquireLease, LEASE_GUARD } from './lease.js';
import { checkNodeToken } from './node-token.js';
import { NodeProber } from './node-prober.js';
import { claimSlot, pickByLoad } from './placement.js';
import { NodeUnreachableError, pipeAnswer, readAnswer, sendToNode, type ForwardRequest } from './proxy.js';
import { refuseUpgrade, tunnelUpgrade } from './upgrade-tunnel.js';
import { serveClusterDashboardEvents } from './dashboard-events.js';

export const IDEMPOTENCY_METADATA_KEY = 'podflare:idempotency-key';

export interface GatewayOptions {
  db: string;
  nodeToken: string;
  /** A node whose heartbeat is older than this takes no placements and its sandboxes answer 503. @default 3000 */
  hostTtlMs?: number;
  /** @default 2000 */
  connectTimeoutMs?: number;
  /** Hosts a create tries before answering 503 no_capacity. @default 4 */
  createAttempts?: number;
  mounts?: readonly HttpMount[];
}

export interface RunningGateway {
  url: string;
  id: string;
  hosts: HostTable;
  close(): Promise<void>;
}

interface Counters {
  creates: number;
  createRetries: number;
  slotHits: number;
  routed: number;
  routeMisses: number;
  nodeUnavailable: number;
  idempotentReplays: number;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function startGateway(config: ServerConfig, opts: GatewayOptions): Promise<RunningGateway> {
  const nodeToken = checkNodeToken(opts.nodeToken);
  const log = createLogger(config.logLevel, { role: 'gateway' });
  const id = `gw-${randomBytes(4).toString('hex')}`;
  const db = openPgPool(opts.db, { max: 16 });
  db.on('error', () => {});
  try {
    await migrate(db);
  } catch (err) {
    await db.end();
    throw err;
  }
  const hosts = new HostTable(db, { hostTtlMs: opts.hostTtlMs, onError: (err) => log.debug('host table read failed', { error: err.message }) });
  await hosts.start();
  const gateway = new Gateway(config, opts, nodeToken, db, hosts, log);
  gateway.prober.start();
  const server = http.createServer({ noDelay: true, keepAliveTimeout: 65_000, maxHeaderSize: 16 * 1024 }, (req, res) => gateway.handle(req, res));
  server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => gateway.upgrade(req, socket, head));
  server.headersTimeout = 30_000;
  server.requestTimeout = 0;
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(config.port, config.host, () => resolve());
  });
  const address = server.address() as AddressInfo;
  const host = address.family === 'IPv6' ? `[${address.address}]` : address.address;
  const url = `http://${host}:${address.port}`;
  gateway.selfUrl = `http://${address.address === '0.0.0.0' ? '127.0.0.1' : address.address === '::' ? '[::1]' : host}:${address.port}`;
  const janitor = setInterval(() => void gateway.leaderJobs(id), 2000);
  log.info('podflare gateway listening', { url, id });
  let closing: Promise<void> | null = null;
  return {
    url, id, hosts,
    close() {
      closing ??= (async () => {
        clearInterval(janitor);
        gateway.prober.close();
        await Promise.all((opts.mounts ?? []).map((m) => m.close?.().catch(() => {})));
        const closed = new Promise<void>((resolve) => server.close(() => resolve()));
        server.closeIdleConnections();
        server.closeAllConnections();
        await closed;
        gateway.destroyAgents();
        await hosts.close();
        await db.end();
      })();
      return closing;
    },
  };
}

class Gateway {
  /** Keep-alive connections per host, dropped whole when the host becomes unreachable from here. */
  private readonly agents = new Map<string, http.Agent>();
  readonly prober: NodeProber;
  private readonly keys: KeyRing;
  private readonly guard: BrowserGuard;
  /** Sandbox id → host id. Sandboxes never move between hosts, so an entry stays right while its sandbox lives. */
  private readonly routes = new Map<string, string>();
  private readonly inFlight = new Map<string, number>();
  readonly counters: Counters = { creates: 0, createRetries: 0, slotHits: 0, routed: 0, routeMisses: 0, nodeUnavailable: 0, idempotentReplays: 0 };
  selfUrl = '';

  constructor(
    private readonly config: ServerConfig,
    private readonly opts: GatewayOptions,
    private readonly nodeToken: string,
    private readonly db: pg.Pool,
    private readonly hosts: HostTable,
    private readonly log: Logger,
  ) {
    this.keys = new KeyRing(config.apiKeys);
    this.guard = new BrowserGuard({ allowedHosts: config.allowedHosts, allowedOrigins: config.allowedOrigins });
    this.prober = new NodeProber(hosts, {
      timeoutMs: opts.connectTimeoutMs ?? 2000,
      onUnreachable: (hostId) => {
        log.warn('a node is unreachable from this gateway; its sandboxes answer 503 until it is back', { host: hostId });
        // Requests in flight there (and idle pooled sockets) would wait forever across a partition.
        this.agents.get(hostId)?.destroy();
        this.agents.delete(hostId);
      },
    });
  }

  private agentFor(hostId: string): http.Agent {
    let agent = this.agents.get(hostId);
    if (!agent) {
      agent = new http.Agent({ keepAlive: true, maxSockets: 256, keepAliveMsecs: 10_000, noDelay: true });
      this.agents.set(hostId, agent);
    }
    return agent;
  }

  destroyAgents(): void {
    for (const agent of this.agents.values()) agent.destroy();
    this.agents.clear();
  }

  handle(req: IncomingMessage, res: ServerResponse): void {
    void (async () => {
      try {
        // Exposed ports: their own checks (as on a node: the key route Host + Origin + key, a signed URL Host only).
        const portTarget = matchPortTarget(req.url);
        if (portTarget) {
          // A signed URL naming no sandbox is refused like a forged one (as a node does), not a 404.
          const notFound = portTarget.kind === 'signed' ? badPortUrl : undefined;
          return await this.route(req, res, this.portSandbox(req, portTarget), { appAnswers: true, notFound });
        }
        if (this.guard.check(req, res) === 'answered') return;
        const url = new URL(req.url ?? '/', 'http://gateway');
        const path = url.pathname;
        const method = req.method ?? 'GET';
        if (path === '/v1/healthz') return void res.writeHead(200, { 'Content-Type': 'text/plain' }).end('ok');
        // The dashboard's page and assets carry no data: any live node serves them.
        if (method === 'GET' && (path === '/' || path.startsWith('/ui/'))) return await this.toFirstLiveHost(req, res);
        const owner = this.keys.authenticate(req);
        const mount = this.opts.mounts?.find((m) => path === m.path || path === `${m.path}/`);
        if (mount) {
          if (!mount.methods.includes(method)) throw new ApiError('method_not_allowed', `${method} not allowed on ${path}`);
          return await mount.handle(req, res, { owner, apiKey: this.keys.enabled ? bearerKey(req) : undefined, loopbackUrl: this.selfUrl });
        }
        if (path === '/v1/sandboxes' && method === 'POST') return await this.create(req, res, owner);
        if (path === '/v1/sandboxes' && method === 'GET') return await this.fanOutList(req, res, 'sandboxes');
        if (path === '/v1/dashboard/sandboxes' && method === 'GET') return await this.fanOutList(req, res, 'sandboxes');
        if (path === '/v1/cluster/hosts' && method === 'GET') return this.hostsAnswer(res);
        if (path === '/v1/capacity' && method === 'GET') return this.capacityAnswer(res);
        if (path === '/v1/metrics' && method === 'GET') return this.metricsAnswer(res);
        const m = /^\/v1\/sandboxes\/([^/]+)(\/.*)?$/.exec(path);
        if (m) return await this.route(req, res, decodeURIComponent(m[1]!));
        if (path === '/v1/dashboard/events' && method === 'GET') {
          return await serveClusterDashboardEvents(req, res, {
            hosts: this.hosts, isReachable: (id) => this.prober.isReachable(id), target: (h) => this.target(h), clusterHosts: () => this.clusterHosts(),
          });
        }
        if (path.startsWith('/v1/dashboard/')) return await this.toFirstLiveHost(req, res);
        throw new ApiError('not_found', `no route ${method} ${path}`);
      } catch (err) {
        this.sendError(res, err);
      }
    })();
  }

  /** WebSockets (a sandbox's exposed port, the PTY): checked here, then tunnelled to the sandbox's node. */
  upgrade(req: IncomingMessage, socket: Duplex, head: Buffer): void {
    socket.on('error', () => {});
    void (async () => {
      try {
        const pty = matchPtyTarget(req.url);
        const port = pty ? null : matchPortTarget(req.url);
        let id: string;
        if (pty) {
          this.guard.checkUpgrade(req);
          this.keys.authenticate(req);
          id = pty.sandboxId;
        } else if (port) {
          id = this.portSandbox(req, port);
        } else {
          throw new ApiError('not_found', `no WebSocket route ${req.url ?? ''}`);
        }
        const hostId = await this.hostOf(id).catch((err: unknown) => { throw databaseUnavailable(err); });
        if (!hostId) throw port?.kind === 'signed' ? badPortUrl() : new ApiError('not_found', `no sandbox ${id}`);
        const h = await this.liveHost(hostId);
        await tunnelUpgrade(req, socket, head, this.target(h)).catch((err: unknown) => {
          throw err instanceof NodeUnreachableError ? this.unavailable(hostId, `cannot be reached (${err.message})`) : err;
        });
        this.counters.routed++;
      } catch (err) {
        const apiError = err instanceof ApiError ? err : new ApiError('internal', `gateway error: ${(err as Error)?.message ?? String(err)}`);
        if (!(err instanceof ApiError)) this.log.error('gateway upgrade error', { error: (err as Error)?.stack ?? String(err) });
        refuseUpgrade(socket, apiError.status, apiError.toBody(), apiError.headers);
      }
    })();
  }

  /**
   * The sandbox an exposed-port request is for, after the checks a node makes first: the key route
   * wants the Host, a same-site Origin and the key; a signed URL only the Host (its token is the
   * credential, verified by the node that signed it: the id in it only routes).
   */
  private portSandbox(req: IncomingMessage, target: PortTarget): string {
    if (target.kind === 'key') {
      this.guard.checkUpgrade(req);
      this.keys.authenticate(req);
      return target.sandboxId;
    }
    this.guard.checkHost(req);
    const id = target.token.split('.')[0] ?? '';
    if (!SANDBOX_ID_PATTERN.test(id)) throw badPortUrl();
    return id;
  }

  private sendError(res: ServerResponse, err: unknown): void {
    const apiError = err instanceof ApiError ? err : new ApiError('internal', `gateway error: ${(err as Error)?.message ?? String(err)}`);
    if (!(err instanceof ApiError)) this.log.error('gateway error', { error: (err as Error)?.stack ?? String(err) });
    if (res.headersSent) return void res.destroy();
    res.once('finish', () => res.req.resume());
    sendJson(res, apiError.status, apiError.toBody(), apiError.headers);
  }

  private target(h: HostView) {
    return { address: h.address, nodeToken: this.nodeToken, agent: this.agentFor(h.id), connectTimeoutMs: this.opts.connectTimeoutMs ?? 2000 };
  }

  private unavailable(hostId: string, why: string): ApiError {
    this.counters.nodeUnavailable++;
    return new ApiError('node_unavailable', `the host that runs this sandbox (${hostId}) ${why}; the sandbox is kept: retry shortly`, undefined,
      { 'Retry-After': '1' });
  }

  // ---- routing ------------------------------------------------------------------------------

  /** The host of a sandbox: the cache, else PostgreSQL (undefined: no such sandbox). */
  private async hostOf(id: string, reread = false): Promise<string | undefined> {
    if (!reread) {
      const cached = this.routes.get(id);
      if (cached) return cached;
    }
    this.counters.routeMisses++;
    const { rows } = await this.db.query<{ host_id: string | null }>('SELECT host_id FROM sandboxes WHERE id=$1', [id]);
    const hostId = rows[0]?.host_id ?? undefined;
    if (hostId) this.routes.set(id, hostId);
    else this.routes.delete(id);
    return hostId;
  }

  /** `appAnswers`: the answer is the sandbox's own server's (an exposed port): its 404 says nothing about routing. */
  private async route(req: IncomingMessage, res: ServerResponse, id: string,
    opts: { appAnswers?: boolean; notFound?: () => ApiError } = {}): Promise<void> {
    const cached = this.routes.has(id);
    let hostId: string | undefined;
    try {
      hostId = await this.hostOf(id);
    } catch (err) {
      throw new ApiError('unavailable', `cannot look up sandbox ${id}: the cluster database is unreachable (${(err as Error).message})`, undefined,
        { 'Retry-After': '2' });
    }
    if (!hostId) throw opts.notFound?.() ?? new ApiError('not_found', `no sandbox ${id}`);
    const hasBody = req.headers['transfer-encoding'] !== undefined || (req.headers['content-length'] ?? '0') !== '0';
    const request: ForwardRequest = { method: req.method ?? 'GET', path: req.url ?? '/', headers: req.headers, body: hasBody ? req : null };
    let answer = await this.forwardTo(hostId, request);
    if (answer.statusCode === 404 && cached && !hasBody && !opts.appAnswers) {
      // "Not here": the cache may be stale. PostgreSQL decides; ask the host it names, once.
      const notHere = await readAnswer(answer);
      const again = await this.hostOf(id, true).catch(() => hostId);
      if (again && again !== hostId) answer = await this.forwardTo(again, request);
      else return void res.writeHead(404, { 'Content-Type': 'application/json' }).end(notHere);
    }
    if (answer.statusCode === 429 && request.method === 'POST' && /\/fork$/.test(new URL(request.path, 'http://x').pathname)) {
      // Fork children stay on the parent's host: when it is full, say so (503 + Retry-After), not "slow down".
      const refusal = await readAnswer(answer);
      if (isHostRefusal(429, refusal)) {
        throw new ApiError('no_capacity', `the parent's host (${hostId}) is full and fork children must run beside their parent: ` +
          `${refusal.toString('utf8').slice(0, 300)}`, undefined, { 'Retry-After': '5' });
      }
      return void res.writeHead(429, stripHop(answer.headers)).end(refusal);
    }
    this.counters.routed++;
    if (answer.statusCode === 200 && request.method === 'POST' && /^\/v1\/sandboxes\/[^/]+\/ports\/\d+\/url$/.test(new URL(request.path, 'http://x').pathname)) {
      return this.signedUrlAnswer(req, res, answer);
    }
    pipeAnswer(answer, res);
  }

  /** A node signs port URLs with its own address: the caller must get this gateway's instead. */
  private async signedUrlAnswer(req: IncomingMessage, res: ServerResponse, answer: IncomingMessage): Promise<void> {
    const body = JSON.parse((await readAnswer(answer)).toString('utf8')) as { token: string; host: string; url: string };
    body.host = `${req.headers.host}/v1/ports/${body.token}`;
    body.url = `http://${body.host}/`;
    sendJson(res, 200, body);
  }

  private async forwardTo(hostId: string, request: ForwardRequest): Promise<IncomingMessage> {
    const h = await this.liveHost(hostId);
    try {
      return await sendToNode(this.target(h), request);
    } catch (err) {
      if (err instanceof NodeUnreachableError) throw this.unavailable(hostId, `cannot be reached (${err.message})`);
      throw err;
    }
  }

  /** The host, if it heartbeats and this gateway reaches it; else 503 node_unavailable. */
  private async liveHost(hostId: string): Promise<HostView> {
    let h = this.hosts.get(hostId);
    if (!h || !this.hosts.isFresh(h)) {
      // Only on the failure path: the view may be up to one refresh behind a node that came back.
      await this.hosts.refresh();
      h = this.hosts.get(hostId);
    }
    if (!h) throw this.unavailable(hostId, 'is not registered');
    if (!this.hosts.isFresh(h)) throw this.unavailable(hostId, `stopped heartbeating ${Math.round(this.hosts.ageOf(h) / 1000)} s ago`);
    if (!this.prober.isReachable(hostId)) throw this.unavailable(hostId, 'cannot be reached from this gateway (its health probes fail)');
    return h;
  }

  private async toFirstLiveHost(req: IncomingMessage, res: ServerResponse): Promise<void> {
    // The first live host by id, not a random one: the dashboard's pool and event views then stay
    // on one node instead of jumping between nodes from one poll to the next.
    const h = this.hosts.placeable().filter((x) => this.prober.isReachable(x.id)).sort((a, b) => a.id.localeCompare(b.id))[0];
    if (!h) throw new ApiError('no_capacity', 'no host of the cluster is up', undefined, { 'Retry-After': '2' });
    pipeAnswer(await sendToNode(this.target(h), { method: req.method ?? 'GET', path: req.url ?? '/', headers: req.headers, body: null }), res);
  }

  /** A list from every live host, merged in creation order; hosts that did not answer are named. */
  private async fanOutList(req: IncomingMessage, res: ServerResponse, field: string): Promise<void> {
    const all = this.hosts.all();
    const unavailable: string[] = [];
    const lists = await Promise.all(all.map(async (h) => {
      if (!this.hosts.isFresh(h) || !this.prober.isReachable(h.id)) { unavailable.push(h.id); return []; }
      try {
        const answer = await sendToNode(this.target(h), { method: 'GET', path: req.url ?? '/', headers: req.headers, body: null });
        const body = JSON.parse((await readAnswer(answer, 64 * 1024 * 1024)).toString('utf8')) as Record<string, unknown>;
        if (answer.statusCode !== 200) { unavailable.push(h.id); return []; }
        const items = (body[field] ?? []) as Array<{ id: string; created_at?: string }>;
        for (const item of items) this.routes.set(item.id, h.id);
        return items.map((item) => ({ ...item, host: h.id }));
      } catch {
        unavailable.push(h.id);
        return [];
      }
    }));
    const merged = lists.flat().sort((a, b) => String(a.created_at).localeCompare(String(b.created_at)));
    sendJson(res, 200, { [field]: merged, ...(unavailable.length ? { unavailable_hosts: unavailable.sort() } : {}) });
  }

  // ---- placement ----------------------------------------------------------------------------

  private async create(req: IncomingMessage, res: ServerResponse, owner: string): Promise<void> {
    const body = await readJson(req);
    if (body === null || typeof body !== 'object' || Array.isArray(body)) throw new ApiError('bad_request', 'request body must be a JSON object');
    const spec = body as Record<string, unknown>;
    const key = req.headers['idempotency-key'];
    if (key !== undefined) {
      if (typeof key !== 'string' || key.length < 1 || key.length > 200) throw new ApiError('bad_request', 'Idempotency-Key: 1 to 200 characters');
      const replay = await this.claimIdempotencyKey(owner, key).catch((err: unknown) => {
        throw err instanceof ApiError ? err : databaseUnavailable(err);
      });
      if (replay) {
        this.counters.idempotentReplays++;
        return sendJson(res, 201, { id: replay.id, state: replay.state, pool: { hit: true } }, { 'Idempotent-Replayed': 'true' });
      }
      const metadata = spec.metadata && typeof spec.metadata === 'object' ? spec.metadata as Record<string, unknown> : {};
      spec.metadata = { ...metadata, [IDEMPOTENCY_METADATA_KEY]: key };
    }
    const template = typeof spec.template === 'string' ? spec.template : 'default';
    const payload = Buffer.from(JSON.stringify(spec));
    const headers = { ...req.headers, 'content-type': 'application/json' };
    // Hosts this gateway cannot reach take nothing from it, whatever their heartbeats say.
    const excluded: string[] = this.hosts.all().filter((h) => !this.prober.isReachable(h.id)).map((h) => h.id);
    this.counters.creates++;
    let lastRefusal: { status: number; body: Buffer; headers: http.IncomingHttpHeaders } | null = null;
    for (let attempt = 0; attempt < (this.opts.createAttempts ?? 4); attempt++) {
      if (attempt > 0) this.counters.createRetries++;
      const picked = await this.pickHost(template, excluded);
      if (!picked) break;
      const { hostId } = picked;
      const h = this.hosts.get(hostId);
      if (!h) { excluded.push(hostId); continue; }
      this.inFlight.set(hostId, (this.inFlight.get(hostId) ?? 0) + 1);
      try {
        const answer = await sendToNode(this.target(h), { method: 'POST', path: '/v1/sandboxes', headers, body: payload });
        const answerBody = await readAnswer(answer);
        const status = answer.statusCode ?? 502;
        if (status === 201) {
          const created = JSON.parse(answerBody.toString('utf8')) as { id: string };
          this.routes.set(created.id, hostId);
          // The slot row's id, when one was claimed: operators (and the failover test) can check no slot went twice.
          res.writeHead(201, { 'Content-Type': 'application/json', 'X-Podflare-Host': hostId, ...(picked.slotId ? { 'X-Podflare-Slot': picked.slotId } : {}) });
          return void res.end(answerBody);
        }
        if (!isHostRefusal(status, answerBody)) {
          if (key !== undefined) await this.releaseIdempotencyKey(owner, key);
          return void res.writeHead(status, stripHop(answer.headers)).end(answerBody);
        }
        // The node's admission said no (full, shutting down, failed to start one): try another.
        lastRefusal = { status, body: answerBody, headers: answer.headers };
        this.log.debug('a node refused a create', { host: hostId, status });
      } catch (err) {
        if (!(err instanceof NodeUnreachableError)) throw err;
        this.log.debug('a node could not be reached for a create', { host: hostId, error: err.message });
      } finally {
        this.inFlight.set(hostId, (this.inFlight.get(hostId) ?? 1) - 1);
      }
      excluded.push(hostId);
      void this.hosts.refresh();
    }
    if (key !== undefined) await this.releaseIdempotencyKey(owner, key);
    const why = lastRefusal ? `; the last refusal: ${lastRefusal.body.toString('utf8').slice(0, 300)}` : '';
    throw new ApiError('no_capacity', `no host of the cluster could take the sandbox (${excluded.length} excluded)${why}`, undefined, { 'Retry-After': '2' });
  }

  /**
   * A warm slot's host, else the best of a few by load; null when no host is left. Without the
   * database (a failover under way) no node could record a sandbox either: 503 at once, not after
   * every node tried and failed.
   */
  private async pickHost(template: string, excluded: string[]): Promise<{ hostId: string; slotId?: string } | null> {
    let slot;
    try {
      slot = await claimSlot(this.db, template, this.hosts.hostTtlMs, excluded);
    } catch (err) {
      throw databaseUnavailable(err);
    }
    if (slot) { this.counters.slotHits++; return slot; }
    const h = pickByLoad(this.hosts, this.inFlight, excluded);
    return h ? { hostId: h.id } : null;
  }

  /**
   * Records (owner, key) before a create. Returns the sandbox an earlier create with the key made,
   * or null when this request is to create it. Waits while another attempt with the key is under
   * way; an attempt silent for 15 s (its gateway died before placing) is taken over.
   */
  private async claimIdempotencyKey(owner: string, key: string): Promise<{ id: string; state: string } | null> {
    const deadline = Date.now() + 30_000;
    for (;;) {
      const made = await this.db.query<{ id: string; state: string; host_id: string }>(
        `SELECT id, state, host_id FROM sandboxes WHERE owner=$1 AND metadata->>'${IDEMPOTENCY_METADATA_KEY}' = $2 ORDER BY created_at LIMIT 1`,
        [owner, key]);
      if (made.rows[0]) {
        this.routes.set(made.rows[0].id, made.rows[0].host_id);
        return made.rows[0];
      }
      const claimed = await this.db.query(
        `INSERT INTO idempotency_keys (owner, key) VALUES ($1, $2)
         ON CONFLICT (owner, key) DO UPDATE SET created_at = now() WHERE idempotency_keys.created_at < now() - interval '15 seconds'
         RETURNING 1`, [owner, key]);
      if (claimed.rowCount) return null;
      if (Date.now() > deadline) throw new ApiError('conflict', 'a create with this Idempotency-Key is still under way', undefined, { 'Retry-After': '2' });
      await sleep(100);
    }
  }

  private async releaseIdempotencyKey(owner: string, key: string): Promise<void> {
    await this.db.query('DELETE FROM idempotency_keys WHERE owner=$1 AND key=$2', [owner, key]).catch(() => {});
  }

  // ---- leader-only jobs ---------------------------------------------------------------------

  /** Under the 'janitor' lease: forget old idempotency keys, drop the slots of hosts that stopped heartbeating. */
  async leaderJobs(holder: string): Promise<void> {
    try {
      const lease = await acquireLease(this.db, 'janitor', holder, 10_000);
      if (!lease) return;
      const args = [lease.name, lease.holder, lease.epoch];
      await this.db.query(`DELETE FROM idempotency_keys WHERE created_at < now() - interval '1 day' AND ${LEASE_GUARD}`, args);
      await this.db.query(
        `DELETE FROM slots WHERE host_id IN (SELECT id FROM hosts WHERE heartbeat_at < now() - make_interval(secs => $4::float8 / 1000))
         AND ${LEASE_GUARD}`, [...args, this.hosts.hostTtlMs]);
    } catch (err) {
      this.log.debug('leader jobs skipped', { error: (err as Error).message });
    }
  }

  // ---- cluster views ------------------------------------------------------------------------

  private clusterHosts(): ClusterHost[] {
    return this.hosts.all().sort((a, b) => a.id.localeCompare(b.id)).map((h) => ({
      id: h.id, address: h.address, ready: h.ready, draining: h.draining, fresh: this.hosts.isFresh(h), reachable: this.prober.isReachable(h.id),
      heartbeat_age_ms: Math.round(this.hosts.ageOf(h)), live: h.live, capacity: h.capacity,
      pool: { ready: h.poolReady, target: h.poolTarget },
    }));
  }

  private hostsAnswer(res: ServerResponse): void {
    sendJson(res, 200, { hosts: this.clusterHosts() });
  }

  private capacityAnswer(res: ServerResponse): void {
    const live = this.hosts.all().filter((h) => this.hosts.isFresh(h));
    const sum = (f: (h: HostView) => number) => live.reduce((a, h) => a + f(h), 0);
    sendJson(res, 200, {
      pool: { template: 'default', ready: sum((h) => h.poolReady), target: sum((h) => h.poolTarget) },
      sandboxes: { active: sum((h) => h.live), max: sum((h) => h.capacity) },
      hosts: { fresh: live.length, total: this.hosts.all().length },
      runtime: 'cluster',
    });
  }

  private metricsAnswer(res: ServerResponse): void {
    const lines: string[] = [];
    const metric = (name: string, help: string, type: string, values: Array<[labels: string, value: number]>) => {
      lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
      for (const [labels, value] of values) lines.push(`${name}${labels} ${value}`);
    };
    const hosts = this.hosts.all();
    const label = (h: HostView) => `{host="${h.id}"}`;
    metric('podflare_cluster_host_up', 'Whether the host heartbeats within the TTL.', 'gauge', hosts.map((h) => [label(h), this.hosts.isFresh(h) ? 1 : 0]));
    metric('podflare_cluster_host_sandboxes', 'Live sandboxes per host (its last heartbeat).', 'gauge', hosts.map((h) => [label(h), h.live]));
    metric('podflare_cluster_host_capacity', 'Sandboxes a host admits.', 'gauge', hosts.map((h) => [label(h), h.capacity]));
    metric('podflare_cluster_host_pool_ready', 'Warm sandboxes ready per host.', 'gauge', hosts.map((h) => [label(h), h.poolReady]));
    const c = this.counters;
    metric('podflare_gateway_creates_total', 'Creates placed by this gateway.', 'counter', [['', c.creates]]);
    metric('podflare_gateway_create_retries_total', 'Creates tried on another host after one refused or failed.', 'counter', [['', c.createRetries]]);
    metric('podflare_gateway_slot_claims_total', 'Creates that claimed a warm slot.', 'counter', [['', c.slotHits]]);
    metric('podflare_gateway_route_misses_total', 'Routing lookups that read PostgreSQL.', 'counter', [['', c.routeMisses]]);
    metric('podflare_gateway_node_unavailable_total', 'Answers 503 node_unavailable.', 'counter', [['', c.nodeUnavailable]]);
    metric('podflare_gateway_idempotent_replays_total', 'Creates answered with the sandbox of an earlier attempt.', 'counter', [['', c.idempotentReplays]]);
    metric('podflare_gateway_routes_cached', 'Sandbox ids in the routing cache.', 'gauge', [['', this.routes.size]]);
    res.writeHead(200, { 'Content-Type': 'text/plain; version=0.0.4' });
    res.end(lines.join('\n') + '\n');
  }
}

/** A node's answer that means "not on this host, try another": full, shutting down, or it failed to start one. */
function isHostRefusal(status: number, body: Buffer): boolean {
  if (status === 503 || status === 500) return true;
  // The node's own cap (not a per-key limit or a request rate): admission control said no.
  return status === 429 && body.toString('utf8').includes('the server runs');
}

/** What a node answers for a forged, altered or expired port URL. */
function badPortUrl(): ApiError {
  return new ApiError('unauthorized', 'invalid or expired port URL: ask for a new one (getHost / get_host)');
}

/** 503 + Retry-After for a create while PostgreSQL cannot be written (down, or mid-failover). */
function databaseUnavailable(err: unknown): ApiError {
  return new ApiError('unavailable', `the cluster database cannot be written just now (${(err as Error)?.message ?? String(err)}); ` +
    'existing sandboxes keep running: retry the create shortly', undefined, { 'Retry-After': '2' });
}

function stripHop(headers: http.IncomingHttpHeaders): http.OutgoingHttpHeaders {
  const out: http.OutgoingHttpHeaders = {};
  for (const [k, v] of Object.entries(headers)) if (!['connection', 'keep-alive', 'transfer-encoding'].includes(k) && v !== undefined) out[k] = v;
  return out;
}
