/** freeze / resume (docs/api.md): a sandbox to disk and back, explicitly. */
import { ApiError } from './api-error.js';
import type { SandboxManager } from '../sandbox-manager.js';
import { sendJson } from './body.js';
import type { Router } from './router.js';
import { sandboxId } from './sandbox-routes.js';

export function addFreezeRoutes(router: Router, manager: SandboxManager): void {
  router.add('POST', '/v1/sandboxes/:id/freeze', async (ctx) => {
    const id = sandboxId(ctx);
    const owner = ctx.owner || undefined;
    const info = await manager.info(id, owner);
    if (info.state !== 'frozen') {
      if (['stopped', 'error'].includes(info.state)) throw new ApiError('sandbox_gone', `sandbox ${id} is gone (${info.state})`);
      await manager.freeze(await manager.get(id, owner));
    }
    sendJson(ctx.res, 200, { id, state: 'frozen' });
  });

  router.add('POST', '/v1/sandboxes/:id/resume', async (ctx) => {
    const id = sandboxId(ctx);
    await manager.get(id, ctx.owner || undefined); // resumes a frozen one; a live one is left as is
    sendJson(ctx.res, 200, { id, state: 'ready' });
  });
}
