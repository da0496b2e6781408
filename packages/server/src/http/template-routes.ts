/** GET /v1/templates: the templates a create may name, whether each is built, and its warm pool. */
import type { TemplateCatalog, TemplateSummary } from '../image/templates.js';
import { DEFAULT_TEMPLATE_NAME } from '../image/template-recipe.js';
import type { SandboxManager } from '../sandbox-manager.js';
import { sendJson } from './body.js';
import type { Router } from './router.js';

export function addTemplateRoutes(router: Router, templates: TemplateCatalog | undefined, manager: SandboxManager): void {
  router.add('GET', '/v1/templates', async ({ res }) => {
    const list: TemplateSummary[] = templates
      ? await templates.list()
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
