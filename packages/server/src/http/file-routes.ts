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
import { pathParam as pathParamOf, streamFile } from './file-stream.js';
import { sandboxId } from './sandbox-routes.js';

const pathParam = (ctx: RequestContext) => pathParamOf(ctx, 'e.g. ?path=/root/data.csv');

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
    await streamFile(ctx.res, manager, s, path, await manager.files.read(s, path, 0), 'application/octet-stream', ctx.req.method === 'HEAD');
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
