/**
 * Background process endpoints (docs/api.md, "Background processes"): start, list, get, output
 * (NDJSON, from any offset, optionally following), stdin, signal, kill. A fork's children do not
 * get their parent's processes.
 */
import { ProcessSignalBody, ProcessStdinBody, StartProcessBody, TerminalSize, type ProcessOutputEvent } from '@podflare/protocol';
import { ApiError } from './api-error.js';
import type { SandboxManager } from '../sandbox-manager.js';
import { readBody, sendEmpty, sendJson } from './body.js';
import { drainedOrClosed } from './drain.js';
import { flagParam } from './params.js';
import type { RequestContext, Router } from './router.js';
import { sandboxId } from './sandbox-routes.js';

function pidParam(ctx: RequestContext): number {
  const text = ctx.params.pid ?? '';
  if (!/^[1-9]\d{0,6}$/.test(text) || Number(text) > 4_194_304) throw new ApiError('bad_request', `"${text}" is not a process id`, 'pid');
  return Number(text);
}

function offsetParam(ctx: RequestContext): number {
  const text = ctx.query.get('offset');
  if (text === null) return 0;
  if (!/^\d{1,15}$/.test(text)) throw new ApiError('bad_request', 'offset: must be a non-negative integer', 'offset');
  return Number(text);
}

export function addProcessRoutes(router: Router, manager: SandboxManager): void {
  const processes = manager.processes;
  const sandbox = (ctx: RequestContext) => manager.get(sandboxId(ctx), ctx.owner || undefined);

  router.add('POST', '/v1/sandboxes/:id/processes', async (ctx) => {
    const body = await readBody(ctx.req, StartProcessBody);
    sendJson(ctx.res, 201, await processes.start(await sandbox(ctx), body));
  });

  router.add('GET', '/v1/sandboxes/:id/processes', async (ctx) => {
    sendJson(ctx.res, 200, { processes: await processes.list(await sandbox(ctx)) });
  });

  router.add('GET', '/v1/sandboxes/:id/processes/:pid', async (ctx) => {
    sendJson(ctx.res, 200, await processes.info(await sandbox(ctx), pidParam(ctx)));
  });

  router.add('DELETE', '/v1/sandboxes/:id/processes/:pid', async (ctx) => {
    await processes.signal(await sandbox(ctx), pidParam(ctx), 'SIGKILL');
    sendEmpty(ctx.res);
  });

  router.add('POST', '/v1/sandboxes/:id/processes/:pid/signal', async (ctx) => {
    const body = await readBody(ctx.req, ProcessSignalBody);
    sendJson(ctx.res, 200, { delivered: await processes.signal(await sandbox(ctx), pidParam(ctx), body.signal ?? 'SIGTERM') });
  });

  router.add('POST', '/v1/sandboxes/:id/processes/:pid/resize', async (ctx) => {
    const body = await readBody(ctx.req, TerminalSize);
    await processes.resize(await sandbox(ctx), pidParam(ctx), body);
    sendEmpty(ctx.res);
  });

  router.add('POST', '/v1/sandboxes/:id/processes/:pid/stdin', async (ctx) => {
    const body = await readBody(ctx.req, ProcessStdinBody);
    await processes.writeStdin(await sandbox(ctx), pidParam(ctx), body.data ?? '', body.eof ?? false);
    sendEmpty(ctx.res);
  });

  router.add('GET', '/v1/sandboxes/:id/processes/:pid/output', async (ctx) => {
    const s = await sandbox(ctx);
    const pid = pidParam(ctx);
    const offset = offsetParam(ctx);
    const follow = flagParam(ctx.query, 'follow');
    // An unknown pid is a 404 before the stream starts.
    await processes.info(s, pid);
    const { res } = ctx;
    let seq = 0;
    res.writeHead(200, { 'Content-Type': 'application/x-ndjson', 'Cache-Control': 'no-store', 'X-Accel-Buffering': 'no' });
    const emit = (event: ProcessOutputEvent): Promise<void> | undefined => {
      if (res.writableEnded || res.destroyed) return;
      if (res.write(JSON.stringify({ ...event, seq: seq++, ts: Date.now() }) + '\n')) return;
      return drainedOrClosed(res);
    };
    try {
      await processes.output(s, pid, offset, follow, emit, () => res.destroyed);
    } catch (err) {
      // The stream has begun: say why it ends (the sandbox went away, the agent failed).
      emit({ type: 'stderr', data: `[podflare] output stream ended: ${(err as Error).message}\n`, offset });
    } finally {
      if (!res.writableEnded) res.end();
    }
  });
}
