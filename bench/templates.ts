/**
 * Templates: each template's image size and the idle PSS of its warm pool. One server per
 * template, pooling only that template (so every bwrap tree found belongs to it), with the pool
 * full and settled; PSS as in the memory measure (bench/memory.ts).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { loadConfig, startServer } from '@podflare/server';
import { sandboxMemory } from './memory.js';
import { notes, rows } from './report.js';
import { fmtMB } from './stats.js';

export const TEMPLATE_MEASURES = ['templates'] as const;

/** Templates measured: `default` and the built-in ones that are built (never builds one here). */
export async function measureTemplates(opts: { imagesDir: string; quick: boolean; poolSize?: number }): Promise<void> {
  const poolSize = opts.poolSize ?? (opts.quick ? 2 : 4);
  const sizes = new Map<string, { built: boolean; size_bytes: number | null; kind: string }>();
  for (const template of ['default', 'python-datasci']) {
    const stateDir = await mkdtemp(path.join(os.tmpdir(), 'pf-bench-'));
    try {
      const config = loadConfig({
        port: 0, logLevel: 'warn', imagesDir: opts.imagesDir, stateDir, poolSize, templatePoolSizes: { default: template === 'default' ? poolSize : 0, [template]: poolSize },
      }, { ...process.env, PODFLARE_API_KEYS: '' });
      const server = await startServer(config);
      try {
        type Listed = { templates: Array<{ name: string; built: boolean; size_bytes: number | null; kind: string }> };
        const listed = ((await (await fetch(server.url + '/v1/templates')).json()) as Listed).templates;
        for (const t of listed) if (!sizes.has(t.name)) sizes.set(t.name, t);
        if (!listed.find((t) => t.name === template)?.built) {
          notes.push(`templates: ${template} is not built (podflare template build ${template}): not measured`);
          continue;
        }
        await server.manager.waitPoolFull(600_000);
        await new Promise((r) => setTimeout(r, opts.quick ? 1000 : 3000));
        await server.manager.waitPoolFull(120_000);
        const found = await sandboxMemory();
        const pss = found.map((s) => s.pssBytes);
        const avg = pss.reduce((s, x) => s + x, 0) / Math.max(1, pss.length);
        const own = sizes.get(template)?.size_bytes ?? null;
        const image = template === 'default' ? own : own === null ? null : own + (sizes.get('default')?.size_bytes ?? 0);
        rows.push({
          measure: `template ${template}: idle pooled PSS`, n: String(found.length), p50: `avg ${fmtMB(avg)}`, p99: `max ${fmtMB(Math.max(...pss))}`,
          target: '– (reported)', peer: '–', status: '–',
        });
        notes.push(`templates: ${template}: image ${image === null ? '?' : fmtMB(image)}` +
          (template === 'default' ? '' : ` (its layer ${own === null ? '?' : fmtMB(own)} over default)`) + `; pool of ${found.length}`);
      } finally {
        await server.close();
      }
    } finally {
      await rm(stateDir, { recursive: true, force: true });
    }
  }
}
