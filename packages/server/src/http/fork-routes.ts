/** fork, diff and merge_into (docs/api.md). */
import { ForkBody } from '@podflare/protocol';
import { z } from 'zod';
import { ApiError } from './api-error.js';
import { diffVars } from '../manager/checkpoints.js';
import type { SandboxManager } from '../sandbox-manager.js';
import { readBody, sendEmpty, sendJson } from './body.js';
import { flagParam } from './params.js';
import type { Router } from './router.js';
import { sandboxId } from './sandbox-routes.js';

const MergeBody = z.object({ paths: z.array(z.string().min(1).max(4096)).min(1).max(1000).optional() }).strict();

export function pathsParam(value: string | null): string[] | undefined {
  if (!value) return undefined;
  if (value.length > 64 * 1024) throw new ApiError('bad_request', 'paths: longer than 64 KiB', 'paths');
  const paths = value.split(',').map((p) => p.trim()).filter(Boolean);
  if (paths.length > 1000) throw new ApiError('bad_request', 'paths: at most 1000 paths', 'paths');
  for (const p of paths) {
    if (!p.startsWith('/') || p.split('/').includes('..') || p.includes('\0')) {
      throw new ApiError('bad_request', `paths: "${p}" must be an absolute path without ..`, 'paths');
    }
  }
  return paths;
}

export function addForkRoutes(router: Router, manager: SandboxManager): void {
  router.add('POST', '/v1/sandboxes/:id/fork', async (ctx) => {
    const id = sandboxId(ctx);
    const body = await readBody(ctx.req, ForkBody);
    const parent = await manager.get(id, ctx.owner || undefined);
    const children = await manager.fork(parent, body.n ?? 1);
    sendJson(ctx.res, 200, { children: children.map((c) => c.id) });
  });

  router.add('GET', '/v1/sandboxes/:id/diff/:other', async (ctx) => {
    const a = await manager.get(sandboxId(ctx), ctx.owner || undefined);
    const b = await manager.get(sandboxId(ctx, 'other'), ctx.owner || undefined);
    const paths = pathsParam(ctx.query.get('paths'));
    const files = await manager.diffFiles(a, b, { paths, content: flagParam(ctx.query, 'content') });
    const result: Record<string, unknown> = { ...files };
    if (flagParam(ctx.query, 'vars')) {
      const [va, vb] = await Promise.all([manager.vars(a), manager.vars(b)]);
      result.vars = diffVars(va, vb);
    }
    sendJson(ctx.res, 200, result);
  });

  router.add('POST', '/v1/sandboxes/:id/merge_into/:winner', async (ctx) => {
    const body = await readBody(ctx.req, MergeBody);
    const { parent, winner } = await manager.mergeParties(sandboxId(ctx), sandboxId(ctx, 'winner'), ctx.owner || undefined);
    if (body.paths) {
      pathsParam(body.paths.join(','));
      await manager.mergePaths(parent, winner, body.paths);
    } else {
      await manager.mergeWhole(parent, winner);
    }
    sendEmpty(ctx.res);
  });
}
