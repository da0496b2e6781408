/**
 * Directories as tar streams (docs/api.md, Files): `GET /v1/sandboxes/:id/files/tar?path=DIR`
 * answers an uncompressed tar of DIR's contents; `PUT` with a tar body unpacks it into DIR.
 */
import type { SandboxManager } from '../sandbox-manager.js';
import { ApiError } from './api-error.js';
import { sendJson } from './body.js';
import { drainedOrClosed } from './drain.js';
import type { RequestContext, Router } from './router.js';
import { sandboxId } from './sandbox-routes.js';

function dirParam(ctx: RequestContext): string {
  const p = ctx.query.get('path');
  if (!p) throw new ApiError('bad_request', 'path: required (query parameter, the directory, e.g. ?path=/root/project)', 'path');
  if (p.length > 4096 || p.includes('\0')) throw new ApiError('bad_request', 'path: at most 4096 characters, no NUL', 'path');
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
      let chunk = await manager.files.read(s, tmp, 0);
      const size = chunk.size;
      ctx.res.writeHead(200, { 'Content-Type': 'application/x-tar', 'Content-Length': size });
      let sent = 0;
      for (;;) {
        const bytes = chunk.data.subarray(0, size - sent);
        sent += bytes.length;
        if (!ctx.res.write(bytes)) await drainedOrClosed(ctx.res);
        if (ctx.res.destroyed) return;
        if (chunk.eof || sent >= size || bytes.length === 0) break;
        chunk = await manager.files.read(s, tmp, sent);
      }
      if (sent < size) ctx.res.destroy();
      else ctx.res.end();
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
