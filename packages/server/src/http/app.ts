/**
 * The HTTP application: routes, auth, error mapping and request logs. It does not listen; the
 * server module owns the socket, so tests can run several apps in one process.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { BrowserAccess } from '@podflare/protocol/browser-access';
import { ApiError, toApiError } from './api-error.js';
import type { Logger } from '../log.js';
import type { SandboxManager } from '../sandbox-manager.js';
import { bearerKey, KeyRing } from './auth.js';
import { sendJson } from './body.js';
import { BrowserGuard } from './browser-guard.js';
import { addDashboardRoutes } from './dashboard-routes.js';
import { addFileRoutes } from './file-routes.js';
import { addArchiveRoutes } from './archive-routes.js';
import { addForkRoutes } from './fork-routes.js';
import { addMetricsRoutes } from './metrics-routes.js';
import type { HttpMount } from './mounts.js';
import { observeRequest } from './observe.js';
import { RateLimiter, type RateLimitOptions } from './rate-limit.js';
import { addFreezeRoutes } from './freeze-routes.js';
import { addProcessRoutes } from './process-routes.js';
import { matchPortTarget, PortProxy } from './port-proxy.js';
import { addPortRoutes } from './port-routes.js';
import { matchPtyTarget, PtySockets } from './pty-socket.js';
import type { Duplex } from 'node:stream';
import { addCheckpointRoutes } from './checkpoint-routes.js';
import { Router } from './router.js';
import { addSandboxRoutes } from './sandbox-routes.js';

export interface AppOptions {
  manager: SandboxManager;
  apiKeys: string[];
  runtimeName: string;
  maxSandboxes: number;
  /** Per-key request rate limit (off when absent). */
  rateLimit?: RateLimitOptions;
  /** Host names and origins answered besides loopback names, IP literals and the server's own origin. */
  browserAccess?: BrowserAccess;
  /** Handlers mounted beside the API (e.g. MCP at /mcp), behind the same guard, keys and rate limit. */
  mounts?: readonly HttpMount[];
  /** This server's API as reachable from this process; known once it listens (for mounts). */
  loopbackUrl?: () => string;
  log: Logger;
}

export type RequestListener = (req: IncomingMessage, res: ServerResponse) => void;
/** The `upgrade` listener of the HTTP server: WebSockets to exposed ports (http/port-proxy.ts). */
export type UpgradeListener = (req: IncomingMessage, socket: Duplex, head: Buffer) => void;

export function createApp(opts: AppOptions): RequestListener & { upgrade: UpgradeListener } {
  const keys = new KeyRing(opts.apiKeys);
  const limiter = new RateLimiter(opts.rateLimit ?? { perSecond: 0, burst: 0 });
  const guard = new BrowserGuard(opts.browserAccess ?? { allowedHosts: [], allowedOrigins: [] });
  const router = new Router();
  router.add('GET', '/v1/healthz', ({ res }) => {
    res.writeHead(200, { 'Content-Type': 'text/plain' });
    res.end('ok');
  }, { auth: false });
  router.add('GET', '/v1/capacity', ({ res }) => {
    const pools = opts.manager.poolStats;
    const main = pools[0];
    sendJson(res, 200, {
      pool: main ? { template: main.template, ready: main.ready, target: main.target, starting: main.starting, hits: main.hits, misses: main.misses } : null,
      pools,
      sandboxes: { active: opts.manager.liveCount, max: opts.maxSandboxes, ...opts.manager.counters },
      runtime: opts.runtimeName,
    });
  });
  addSandboxRoutes(router, opts.manager);
  addFileRoutes(router, opts.manager);
  addArchiveRoutes(router, opts.manager);
  addForkRoutes(router, opts.manager);
  addMetricsRoutes(router, opts.manager);
  addDashboardRoutes(router, opts.manager);
  addFreezeRoutes(router, opts.manager);
  addProcessRoutes(router, opts.manager);
  const ptys = new PtySockets(opts.manager, keys, guard, opts.log);
  const portProxy = new PortProxy(opts.manager, keys, guard, opts.log);
  addPortRoutes(router, opts.manager);
  addCheckpointRoutes(router, opts.manager);
  for (const mount of opts.mounts ?? []) {
    for (const method of mount.methods) {
      router.add(method, mount.path, ({ req, res, owner }) =>
        mount.handle(req, res, { owner, apiKey: keys.enabled ? bearerKey(req) : undefined, loopbackUrl: opts.loopbackUrl?.() ?? '' }));
    }
  }

  const listener: RequestListener = (req, res) => {
    const observed = observeRequest(req, res, opts.log, opts.manager.metrics);
    let url: URL | undefined;
    void (async () => {
      try {
        // An exposed port: the rest of the path belongs to the sandbox's server, not to our routes.
        const portTarget = matchPortTarget(req.url);
        if (portTarget) return await portProxy.handleRequest(req, res, portTarget);
        // Before anything else, auth included: a web page must not learn even which requests fail.
        if (guard.check(req, res) === 'answered') return;
        url = parseTarget(req.url);
        const { route, params } = router.match(req.method ?? 'GET', url.pathname);
        const owner = route.auth ? keys.authenticate(req) : '';
        // Rate limits are per key: without keys (a loopback server) there is one trusted caller.
        if (route.auth && keys.enabled) limiter.take(owner);
        await route.handler({ req, res, params, query: url.searchParams, owner });
      } catch (err) {
        sendError(res, err, opts.log);
      } finally {
        observed.done(url?.pathname ?? req.url);
      }
    })();
  };
  const upgrade: UpgradeListener = (req, socket, head) => {
    const pty = matchPtyTarget(req.url);
    if (pty) return void ptys.handleUpgrade(req, socket, head, pty);
    const target = matchPortTarget(req.url);
    if (!target) {
      socket.end('HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n');
      return;
    }
    void portProxy.handleUpgrade(req, socket, head, target);
  };
  return Object.assign(listener, { upgrade });
}

/** The request target as a URL; only origin-form targets ("/v1/…") are served. */
function parseTarget(target: string | undefined): URL {
  if (!target?.startsWith('/') || target.startsWith('//')) throw new ApiError('bad_request', 'the request target must be a path starting with /v1/');
  try {
    return new URL(target, 'http://podflare');
  } catch {
    throw new ApiError('bad_request', 'the request target is not a valid URL path');
  }
}

function sendError(res: ServerResponse, err: unknown, log: Logger): void {
  // The client hung up mid-request (its body cut short): nobody to answer, nothing went wrong here.
  if (res.req.destroyed && (err as NodeJS.ErrnoException)?.code === 'ECONNRESET') {
    log.debug('client went away', { error: (err as Error).message });
    res.destroy();
    return;
  }
  const known = toApiError(err);
  const apiError = known ?? new ApiError('internal', `internal error: ${(err as Error)?.message ?? String(err)}`);
  if (!known) log.error('unhandled error', { error: (err as Error)?.stack ?? String(err) });
  if (res.headersSent) {
    res.destroy();
    return;
  }
  // A body over the cap is not worth reading to its end: answer and close the connection.
  // Otherwise drop what is left of the body so the connection stays usable for keep-alive.
  const close = apiError.code === 'payload_too_large';
  if (!close) res.once('finish', () => res.req.resume());
  sendJson(res, apiError.status, apiError.toBody(), close ? { ...apiError.headers, Connection: 'close' } : apiError.headers);
}
