/**
 * Directories as tar streams (docs/api.md, Files): `GET /v1/sandboxes/:id/files/tar?path=DIR`
 * answers an uncompressed tar of DIR's contents; `PUT` with a tar body unpacks it into DIR.
 */
import type { SandboxManager } from '../sandbox-manager.js';
import { ApiError } from './api-error.js';
import { sendJson } from './body.js';
import { pathParam, streamFile } from './file-stream.js';
import type { RequestContext, Router } from './router.js';
import { sandboxId } from './sandbox-routes.js';

function dirParam(ctx: RequestContext): string {
  const p = pathParam(ctx, 'the directory, e.g. ?path=/root/project');
  return p.startsWith('/') ? p : `/root/${p}`;
}

export function addArchiveRoutes(router: Router, manager: SandboxManager): void {
  router.add('GET', '/v1/sandboxes/:id/files/tar', async (ctx) => {
    const dir = dirParam(ctx);
    const s = await manager.get(sandboxId(ctx), ctx.owner || undefined);
    const stat = await manager.files.stat(s, dir);
    if (stat.type !== 'dir') throw new ApiError('bad_request', `${dir} is not a directory (download a file with /files)`, 'path');
    const tmp = await manager.archives.pack(s, dir);
    try {
      await streamFile(ctx.res, manager, s, tmp, await manager.files.read(s, tmp, 0), 'application/x-tar');
    } finally {
      await manager.archives.discard(s, tmp);
    }
  });

  router.add('PUT', '/v1/sandboxes/:id/files/tar', async (ctx) => {
    const dir = dirParam(ctx);
    const s = await manager.get(sandboxId(ctx), ctx.owner || undefined);
    await manager.archives.unpack(s, dir, ctx.req as AsyncIterable<Buffer>, () => ctx.req.complete);
    sendJson(ctx.res, 201, { path: dir });
  });
}
