/**
 * Checkpoints, restore, rewind (docs/api.md, issue 23). Every call runs in the sandbox's queue: a
 * checkpoint, restore or rewind asked for while an exec runs waits for that exec to finish.
 */
import { CHECKPOINT_ID_PATTERN, CheckpointBody, RewindBody } from '@podflare/protocol';
import { ApiError } from './api-error.js';
import type { SandboxManager } from '../sandbox-manager.js';
import { readBody, sendEmpty, sendJson } from './body.js';
import { pathsParam } from './fork-routes.js';
import { flagParam } from './params.js';
import type { RequestContext, Router } from './router.js';
import { sandboxId } from './sandbox-routes.js';

function checkpointId(ctx: RequestContext): string {
  const id = ctx.params.checkpoint ?? '';
  if (!CHECKPOINT_ID_PATTERN.test(id)) throw new ApiError('bad_request', `"${id}" is not a checkpoint id (ckpt_ followed by 24 hex digits)`, 'checkpoint');
  return id;
}

export function addCheckpointRoutes(router: Router, manager: SandboxManager): void {
  const cps = manager.checkpoints;

  router.add('POST', '/v1/sandboxes/:id/checkpoints', async (ctx) => {
    const body = await readBody(ctx.req, CheckpointBody);
    const s = await manager.get(sandboxId(ctx), ctx.owner || undefined);
    sendJson(ctx.res, 201, await cps.create(s, body.name));
  });

  router.add('GET', '/v1/sandboxes/:id/checkpoints', async (ctx) => {
    const s = await manager.get(sandboxId(ctx), ctx.owner || undefined);
    sendJson(ctx.res, 200, { checkpoints: cps.list(s) });
  });

  router.add('DELETE', '/v1/sandboxes/:id/checkpoints/:checkpoint', async (ctx) => {
    const id = checkpointId(ctx);
    const s = await manager.get(sandboxId(ctx), ctx.owner || undefined);
    await cps.delete(s, id);
    sendEmpty(ctx.res);
  });

  router.add('POST', '/v1/sandboxes/:id/checkpoints/:checkpoint/restore', async (ctx) => {
    const id = checkpointId(ctx);
    const s = await manager.get(sandboxId(ctx), ctx.owner || undefined);
    const checkpoint = await cps.restore(s, id);
    sendJson(ctx.res, 200, { id: s.record.id, restored: checkpoint });
  });

  router.add('GET', '/v1/sandboxes/:id/checkpoints/:checkpoint/diff', async (ctx) => {
    const id = checkpointId(ctx);
    const s = await manager.get(sandboxId(ctx), ctx.owner || undefined);
    const paths = pathsParam(ctx.query.get('paths'));
    sendJson(ctx.res, 200, await cps.diff(s, id, { paths, content: flagParam(ctx.query, 'content'), vars: flagParam(ctx.query, 'vars') }));
  });

  router.add('POST', '/v1/sandboxes/:id/rewind', async (ctx) => {
    const body = await readBody(ctx.req, RewindBody);
    const s = await manager.get(sandboxId(ctx), ctx.owner || undefined);
    const done = await cps.rewind(s, body.steps ?? 1);
    sendJson(ctx.res, 200, { id: s.record.id, restored: done.checkpoint, steps: done.steps, history_left: done.left });
  });
}
