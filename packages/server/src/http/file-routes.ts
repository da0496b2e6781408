/**
 * File endpoints: raw streamed bodies on the HTTP side; the manager's files part talks to the agent
 * (1 MiB chunks, one in flight at a time). Neither side ever holds a whole file: the request is
 * read only as fast as the agent writes, and the download asks for the next chunk only once the
 * previous one has drained to the client.
 */
import { ApiError } from './api-error.js';
import type { LiveSandbox, SandboxManager } from '../sandbox-manager.js';
import { sendEmpty, sendJson } from './body.js';
import { flagParam } from './params.js';
import type { RequestContext, Router } from './router.js';
import { drainedOrClosed } from './drain.js';
import { sandboxId } from './sandbox-routes.js';

function pathParam(ctx: RequestContext): string {
  const p = ctx.query.get('path');
  if (!p) throw new ApiError('bad_request', 'path: required (query parameter, e.g. ?path=/root/data.csv)', 'path');
  if (p.length > 4096) throw new ApiError('bad_request', 'path: longer than 4096 characters', 'path');
  if (p.includes('\0')) throw new ApiError('bad_request', 'path: must not contain NUL', 'path');
  return p;
}

export function addFileRoutes(router: Router, manager: SandboxManager): void {
  const sandbox = (ctx: RequestContext): Promise<LiveSandbox> => manager.get(sandboxId(ctx), ctx.owner || undefined);

  router.add('PUT', '/v1/sandboxes/:id/files', async (ctx) => {
    const path = pathParam(ctx);
    const s = await sandbox(ctx);
    const size = await manager.files.upload(s, path, ctx.req as AsyncIterable<Buffer>, () => ctx.req.complete);
    sendJson(ctx.res, 201, { path, size });
  });

  router.add('GET', '/v1/sandboxes/:id/files', async (ctx) => {
    const path = pathParam(ctx);
    const s = await sandbox(ctx);
    const stat = await manager.files.stat(s, path);
    if (stat.type === 'dir') throw new ApiError('bad_request', `${path} is a directory (list it with /files/list)`, 'path');
    const first = await manager.files.read(s, path, 0);
    const size = first.size;
    ctx.res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': size });
    if (ctx.req.method === 'HEAD') return void ctx.res.end();
    let chunk = first;
    let sent = 0;
    for (;;) {
      const bytes = chunk.data.subarray(0, size - sent);
      sent += bytes.length;
      if (!ctx.res.write(bytes)) await drainedOrClosed(ctx.res);
      if (ctx.res.destroyed) return;
      if (chunk.eof || sent >= size || bytes.length === 0) break;
      chunk = await manager.files.read(s, path, sent);
    }
    // A file that shrank while we read it: the length promised can no longer be met.
    if (sent < size) ctx.res.destroy();
    else ctx.res.end();
  });

  router.add('DELETE', '/v1/sandboxes/:id/files', async (ctx) => {
    const path = pathParam(ctx);
    const recursive = flagParam(ctx.query, 'recursive');
    await manager.files.remove(await sandbox(ctx), path, recursive);
    sendEmpty(ctx.res);
  });

  router.add('GET', '/v1/sandboxes/:id/files/list', async (ctx) => {
    const path = pathParam(ctx);
    const entries = await manager.files.list(await sandbox(ctx), path);
    sendJson(ctx.res, 200, { entries });
  });

  router.add('GET', '/v1/sandboxes/:id/files/stat', async (ctx) => {
    const path = pathParam(ctx);
    const stat = await manager.files.stat(await sandbox(ctx), path);
    sendJson(ctx.res, 200, { stat });
  });

  router.add('POST', '/v1/sandboxes/:id/files/mkdir', async (ctx) => {
    const path = pathParam(ctx);
    await manager.files.mkdir(await sandbox(ctx), path);
    sendJson(ctx.res, 201, { path });
  });
}
