/**
 * GET /v1/templates: the templates a create may name, whether each is built, and its warm pool.
 * POST /v1/sandboxes/:id/template: a template made from a live sandbox's files; DELETE
 * /v1/templates/:name deletes a registered one (manager/live-templates.ts).
 */
import { z } from 'zod';
import type { TemplateCatalog, TemplateSummary } from '../image/templates.js';
import { DEFAULT_TEMPLATE_NAME } from '../image/template-recipe.js';
import type { SandboxManager } from '../sandbox-manager.js';
import { readBody, sendEmpty, sendJson } from './body.js';
import type { Router } from './router.js';
import { sandboxId } from './sandbox-routes.js';

/** The name is checked by the manager (a message that says what a name may be). */
const SaveTemplateBody = z.object({ name: z.string().max(200), description: z.string().max(500).optional() }).strict();

export function addTemplateRoutes(router: Router, templates: TemplateCatalog | undefined, manager: SandboxManager): void {
  router.add('POST', '/v1/sandboxes/:id/template', async (ctx) => {
    const id = sandboxId(ctx);
    const body = await readBody(ctx.req, SaveTemplateBody);
    const s = await manager.get(id, ctx.owner || undefined);
    sendJson(ctx.res, 201, await manager.liveTemplates.save(s, body.name, body.description));
  });

  router.add('DELETE', '/v1/templates/:name', async (ctx) => {
    await manager.liveTemplates.remove(ctx.params.name ?? '', ctx.owner);
    sendEmpty(ctx.res);
  });

  router.add('GET', '/v1/templates', async ({ res, owner }) => {
    const list: TemplateSummary[] = templates
      ? await templates.list(owner)
      : [{ name: DEFAULT_TEMPLATE_NAME, kind: 'base', built: true, size_bytes: null, runtimes: [manager.defaultRuntime.name], built_at: null }];
    const pools = manager.poolStats;
    sendJson(res, 200, {
      templates: list.map((t) => {
        // Every bucket of the template (runtimes, egress settings) counts.
        const mine = pools.filter((p) => p.template === t.name);
        const pool = mine.length ? { ready: mine.reduce((n, p) => n + p.ready, 0), target: mine.reduce((n, p) => n + p.target, 0) } : null;
        return { ...t, pool };
      }),
    });
  });
}
