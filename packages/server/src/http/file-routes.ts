/**
 * File endpoints: raw streamed bodies on the HTTP side, 1 MiB base64 chunks to the agent, one chunk
 * in flight at a time. Neither side ever holds a whole file: the request is read only as fast as
 * the agent writes, and the download asks the agent for the next chunk only once the previous one
 * has drained to the client.
 */
import type { ServerResponse } from 'node:http';
import { FILE_CHUNK_BYTES } from '@podflare/protocol';
import { ApiError } from '../errors.js';
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
  const sandbox = async (ctx: RequestContext): Promise<LiveSandbox> => {
    const s = await manager.get(sandboxId(ctx), ctx.owner || undefined);
    manager.touch(s);
    return s;
  };

  router.add('PUT', '/v1/sandboxes/:id/files', async (ctx) => {
    const path = pathParam(ctx);
    const s = await sandbox(ctx);
    const channel = s.rt.channel;
    const { handle } = await channel.request({ op: 'upload_begin', path });
    try {
      let pending: Buffer[] = [];
      let pendingBytes = 0;
      const flush = async () => {
        if (!pendingBytes) return;
        const data = Buffer.concat(pending).toString('base64');
        pending = [];
        pendingBytes = 0;
        await channel.request({ op: 'upload_chunk', handle, data });
        manager.touch(s);
      };
      for await (const chunk of ctx.req as AsyncIterable<Buffer>) {
        let offset = 0;
        while (offset < chunk.length) {
          const take = Math.min(FILE_CHUNK_BYTES - pendingBytes, chunk.length - offset);
          pending.push(chunk.subarray(offset, offset + take));
          pendingBytes += take;
          offset += take;
          if (pendingBytes === FILE_CHUNK_BYTES) await flush();
        }
      }
      if (!ctx.req.complete) throw new ApiError('bad_request', 'upload aborted before the body was complete');
      await flush();
      const { size } = await channel.request({ op: 'upload_end', handle });
      sendJson(ctx.res, 201, { path, size });
    } catch (err) {
      await channel.request({ op: 'upload_end', handle, abort: true }).catch(() => undefined);
      throw err;
    }
  });

  router.add('GET', '/v1/sandboxes/:id/files', async (ctx) => {
    const path = pathParam(ctx);
    const s = await sandbox(ctx);
    const channel = s.rt.channel;
    const { stat } = await channel.request({ op: 'stat', path });
    if (stat.type === 'dir') throw new ApiError('bad_request', `${path} is a directory (list it with /files/list)`, 'path');
    const first = await channel.request({ op: 'file_read', path, offset: 0, length: FILE_CHUNK_BYTES });
    const size = first.size;
    ctx.res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': size });
    if (ctx.req.method === 'HEAD') return void ctx.res.end();
    let chunk = first;
    let sent = 0;
    for (;;) {
      const bytes = Buffer.from(chunk.data, 'base64').subarray(0, size - sent);
      sent += bytes.length;
      if (!ctx.res.write(bytes)) await drainedOrClosed(ctx.res);
      if (ctx.res.destroyed) return;
      if (chunk.eof || sent >= size || bytes.length === 0) break;
      chunk = await channel.request({ op: 'file_read', path, offset: sent, length: FILE_CHUNK_BYTES });
      manager.touch(s);
    }
    // A file that shrank while we read it: the length promised can no longer be met.
    if (sent < size) ctx.res.destroy();
    else ctx.res.end();
  });

  router.add('DELETE', '/v1/sandboxes/:id/files', async (ctx) => {
    const path = pathParam(ctx);
    const recursive = flagParam(ctx.query, 'recursive');
    await (await sandbox(ctx)).rt.channel.request({ op: 'remove', path, recursive });
    sendEmpty(ctx.res);
  });

  router.add('GET', '/v1/sandboxes/:id/files/list', async (ctx) => {
    const path = pathParam(ctx);
    const { entries } = await (await sandbox(ctx)).rt.channel.request({ op: 'list', path });
    sendJson(ctx.res, 200, { entries });
  });

  router.add('GET', '/v1/sandboxes/:id/files/stat', async (ctx) => {
    const path = pathParam(ctx);
    const { stat } = await (await sandbox(ctx)).rt.channel.request({ op: 'stat', path });
    sendJson(ctx.res, 200, { stat });
  });

  router.add('POST', '/v1/sandboxes/:id/files/mkdir', async (ctx) => {
    const path = pathParam(ctx);
    await (await sandbox(ctx)).rt.channel.request({ op: 'mkdir', path, parents: true });
    sendJson(ctx.res, 201, { path });
  });
}

