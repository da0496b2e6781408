/**
 * The HTTP application: routes, auth, error mapping and request logs. It does not listen; the
 * server module owns the socket, so tests can run several apps in one process.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { ApiError } from '../errors.js';
import type { Logger } from '../log.js';
import type { SandboxManager } from '../sandbox-manager.js';
import { KeyRing } from './auth.js';
import { sendJson } from './body.js';
import { addFileRoutes } from './file-routes.js';
import { addForkRoutes } from './fork-routes.js';
import { addFreezeRoutes } from './freeze-routes.js';
import { Router } from './router.js';
import { addSandboxRoutes } from './sandbox-routes.js';

export interface AppOptions {
  manager: SandboxManager;
  apiKeys: string[];
  runtimeName: string;
  maxSandboxes: number;
  log: Logger;
}

export type RequestListener = (req: IncomingMessage, res: ServerResponse) => void;

export function createApp(opts: AppOptions): RequestListener {
  const keys = new KeyRing(opts.apiKeys);
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
  addForkRoutes(router, opts.manager);
  addFreezeRoutes(router, opts.manager);

  return (req, res) => {
    const started = performance.now();
    const url = new URL(req.url ?? '/', 'http://podflare');
    void (async () => {
      try {
        const { route, params } = router.match(req.method ?? 'GET', url.pathname);
        const owner = route.auth ? keys.authenticate(req) : '';
        await route.handler({ req, res, params, query: url.searchParams, owner });
      } catch (err) {
        sendError(res, err, opts.log);
      } finally {
        opts.log.debug('request', {
          method: req.method, path: url.pathname, status: res.statusCode,
          ms: Math.round((performance.now() - started) * 100) / 100,
        });
      }
    })();
  };
}

function sendError(res: ServerResponse, err: unknown, log: Logger): void {
  const apiError = err instanceof ApiError ? err : new ApiError('internal', `internal error: ${(err as Error)?.message ?? String(err)}`);
  if (!(err instanceof ApiError)) log.error('unhandled error', { error: (err as Error)?.stack ?? String(err) });
  if (res.headersSent) {
    res.destroy();
    return;
  }
  // Drop whatever is left of the request body so the connection stays usable for keep-alive.
  res.once('finish', () => res.req.resume());
  sendJson(res, apiError.status, apiError.toBody(), apiError.headers);
}
