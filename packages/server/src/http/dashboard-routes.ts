/**
 * The dashboard: its static page (public: it holds no data) and the data it reads, behind the same
 * API keys as the rest of the API and scoped to the caller's sandboxes.
 *
 *   GET /                          the page (index.html); /ui/<file> its bundle
 *   GET /v1/dashboard/sandboxes    live and recently ended sandboxes, with memory and lineage
 *   GET /v1/dashboard/events       server-sent events: `sandboxes` on every change, `exec` steps as
 *                                  they happen, `host` every few seconds
 *   GET /v1/dashboard/host         pool, latency histograms, counters and the host's load
 *   GET /v1/sandboxes/:id/execs    the exec history of a sandbox (bounded, newest last)
 */
import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import type { DashboardSandbox } from '@podflare/protocol';
import { ApiError } from './api-error.js';
import type { ExecUpdate } from '../exec-history.js';
import type { SandboxManager } from '../sandbox-manager.js';
import type { SandboxRecord } from '../store/store.js';
import { sendJson } from './body.js';
import type { RequestContext, Router } from './router.js';
import { sandboxId } from './sandbox-routes.js';

/** Ended sandboxes stay in view (marked) this long, so a tree keeps its merged and retired nodes. */
const ENDED_VISIBLE_MS = 60 * 60 * 1000;
const MAX_ENDED_SHOWN = 200;
const MEMORY_TTL_MS = 4000;
const HOST_EVERY_MS = 3000;
/** Changes within this window go out as one snapshot (a busy server flips states constantly). */
const SNAPSHOT_COALESCE_MS = 250;
/** Beyond this much unsent data to a slow watcher, exec output is skipped (the page refetches history). */
const MAX_BUFFERED_BYTES = 4 * 1024 * 1024;
/**
 * Beyond this much unsent data, a watcher that does not read is dropped (its page reconnects and
 * starts from a fresh snapshot): per watcher the server holds at most this plus one event (an exec
 * record: ≤ 1 MiB of output and 64 KiB of code, or a snapshot).
 */
export const MAX_WATCHER_BUFFERED_BYTES = 8 * 1024 * 1024;

const CONTENT_TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.svg': 'image/svg+xml',
  '.map': 'application/json',
};

/**
 * The page may show output of untrusted code: rich HTML results go into sandboxed iframes without
 * scripts, images only as data URLs, and nothing loads from anywhere but this server.
 */
const PAGE_HEADERS = {
  'Content-Security-Policy': "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; object-src 'none'; base-uri 'none'; form-action 'none'",
  'X-Content-Type-Options': 'nosniff',
  'Referrer-Policy': 'no-referrer',
  'Cache-Control': 'no-cache',
};

/** The built page: packages/dashboard/dist, found through the workspace package. */
function dashboardDir(): string | null {
  try {
    return path.join(path.dirname(createRequire(import.meta.url).resolve('@podflare/dashboard/package.json')), 'dist');
  } catch {
    return null;
  }
}

export function addDashboardRoutes(router: Router, manager: SandboxManager): void {
  const dir = dashboardDir();
  const files = new Map<string, Buffer>();
  // Every open dashboard listens to both emitters.
  manager.changes.setMaxListeners(0);
  manager.history.setMaxListeners(0);

  const serveFile = async (ctx: RequestContext, name: string) => {
    if (!/^[\w][\w.-]*$/.test(name) || !(path.extname(name) in CONTENT_TYPES)) throw new ApiError('not_found', `no such file: ${name}`);
    if (!dir) throw new ApiError('unavailable', 'the dashboard is not built: run `npm run build`');
    let body = files.get(name);
    if (!body) {
      body = await readFile(path.join(dir, name)).catch((err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOENT') {
          throw name === 'index.html'
            ? new ApiError('unavailable', 'the dashboard is not built: run `npm run build`')
            : new ApiError('not_found', `no such file: ${name}`);
        }
        throw err;
      });
      files.set(name, body);
    }
    ctx.res.writeHead(200, { 'Content-Type': CONTENT_TYPES[path.extname(name)]!, 'Content-Length': body.length, ...PAGE_HEADERS });
    ctx.res.end(ctx.req.method === 'HEAD' ? undefined : body);
  };

  router.add('GET', '/', (ctx) => serveFile(ctx, 'index.html'), { auth: false });
  router.add('GET', '/ui/:file', (ctx) => serveFile(ctx, ctx.params.file ?? ''), { auth: false });

  const memory = new Map<string, { bytes: number; at: number }>();
  const memoryOf = async (id: string): Promise<number | null> => {
    const cached = memory.get(id);
    if (cached && Date.now() - cached.at < MEMORY_TTL_MS) return cached.bytes;
    const bytes = await manager.memoryOf(id).catch(() => 0);
    memory.set(id, { bytes, at: Date.now() });
    return bytes;
  };

  const snapshot = async (owner: string | undefined) => {
    const now = Date.now();
    const records = await manager.records({ all: true }, owner);
    const live = records.filter((r) => r.endedAt === null);
    const ended = records.filter((r) => r.endedAt !== null && now - r.endedAt < ENDED_VISIBLE_MS)
      .sort((a, b) => b.endedAt! - a.endedAt!).slice(0, MAX_ENDED_SHOWN);
    for (const id of memory.keys()) if (!live.some((r) => r.id === id)) memory.delete(id);
    const sandboxes: DashboardSandbox[] = await Promise.all([...live, ...ended].map(async (r) => ({
      id: r.id, template: r.template, runtime: r.runtime, state: r.state, egress: r.egress, parent: r.parentId,
      created_at: r.createdAt, last_active_at: r.lastActiveAt, ended_at: r.endedAt, end_reason: r.endReason,
      idle_timeout_seconds: r.idleTimeoutSeconds, metadata: r.metadata,
      memory_bytes: r.endedAt === null ? await memoryOf(r.id) : null,
    })));
    sandboxes.sort((a, b) => a.created_at - b.created_at);
    return { now, sandboxes };
  };

  const host = () => ({
    now: Date.now(),
    pools: manager.poolStats,
    sandboxes: { live: manager.liveCount, ...manager.counters },
    metrics: manager.metrics.snapshot(),
    history_bytes: manager.history.bytes,
    host: {
      hostname: os.hostname(), cpus: os.availableParallelism(), loadavg: os.loadavg(),
      total_memory: os.totalmem(), free_memory: os.freemem(), uptime_seconds: os.uptime(),
      node: process.version, server_rss: process.memoryUsage().rss,
    },
  });

  router.add('GET', '/v1/dashboard/sandboxes', async (ctx) => {
    sendJson(ctx.res, 200, await snapshot(ctx.owner || undefined));
  });

  router.add('GET', '/v1/dashboard/host', (ctx) => {
    sendJson(ctx.res, 200, host());
  });

  router.add('GET', '/v1/sandboxes/:id/execs', async (ctx) => {
    const id = sandboxId(ctx);
    const owner = ctx.owner || undefined;
    const execs = manager.history.list(id, owner);
    // Nothing recorded: 404 unless the sandbox exists (and is the caller's).
    if (execs.length === 0) await manager.info(id, owner);
    sendJson(ctx.res, 200, { execs });
  });

  router.add('GET', '/v1/dashboard/events', async (ctx) => {
    const { res } = ctx;
    const owner = ctx.owner || undefined;
    res.writeHead(200, { 'Content-Type': 'text/event-stream; charset=utf-8', 'Cache-Control': 'no-store', 'X-Accel-Buffering': 'no' });
    res.flushHeaders();
    const send = (event: string, data: unknown) => {
      if (res.writableEnded || res.destroyed) return;
      if (res.writableLength > MAX_WATCHER_BUFFERED_BYTES) {
        // It does not read: no more queueing for it (the 'close' below cleans up its listeners).
        res.destroy();
        return;
      }
      res.write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
    };

    // Snapshots are coalesced: a burst of changes (a fork(5), an exec's state flips) sends one.
    let timer: NodeJS.Timeout | null = null;
    let sending = false;
    let again = false;
    const push = async () => {
      if (sending) return void (again = true);
      sending = true;
      try {
        send('sandboxes', await snapshot(owner));
      } catch (err) {
        send('problem', { message: (err as Error).message });
      } finally {
        sending = false;
        if (again) { again = false; schedule(); }
      }
    };
    const schedule = () => {
      timer ??= setTimeout(() => { timer = null; void push(); }, SNAPSHOT_COALESCE_MS);
    };
    const onExec = (u: ExecUpdate) => {
      if (owner !== undefined && u.owner !== owner) return;
      if (u.phase === 'output' && res.writableLength > MAX_BUFFERED_BYTES) return;
      const { owner: _owner, ...update } = u;
      send('exec', update);
    };
    manager.changes.on('change', schedule);
    manager.history.on('exec', onExec);
    const hostTimer = setInterval(() => { send('host', host()); schedule(); }, HOST_EVERY_MS);
    try {
      send('host', host());
      await push();
      await new Promise<void>((resolve) => {
        if (res.destroyed) return resolve();
        res.once('close', () => resolve());
      });
    } finally {
      manager.changes.off('change', schedule);
      manager.history.off('exec', onExec);
      clearInterval(hostTimer);
      if (timer) clearTimeout(timer);
      if (!res.writableEnded) res.end();
    }
  });
}
