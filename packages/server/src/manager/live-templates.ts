/**
 * Templates made from live sandboxes (POST /v1/sandboxes/:id/template) and the deletion of
 * registered templates (DELETE /v1/templates/:name).
 *
 * A template made from a sandbox holds what that sandbox changed over its image, copied by its
 * runtime into a new layer of the images directory (`saveTemplateLayer`; for the namespace runtime
 * runtime/namespace/template-layer.ts, which treats the sandbox's tree as hostile), registered
 * with `source: 'directory'` over the sandbox's own image layers. From then on it is listed,
 * pooled (its own warm pool and zygote) and started like any template.
 *
 * The interpreter's state (variables, imports) is carried where the runtime forks (namespace):
 * the template's zygote is a fork of the sandbox, made over the template's files while the sandbox
 * is idle, and every sandbox of the template (pool refills, misses) is a fork of that zygote. This
 * lives in the server's memory only: after a server restart, or should that zygote die, its
 * replacement is an ordinary cold zygote and sandboxes of the template start with the files only
 * (with `default`'s preload). Never carried: background processes, terminals, the JavaScript REPL.
 *
 * It holds its owner's files: only the owner of the sandbox (its API key) sees, starts and deletes it.
 *
 * Where its layer lives: `<images>/live-<random>/layer`, the `live-*` directory root-only (0700),
 * because the layer keeps the modes the sandbox chose (set-id bits included) with owners shifted
 * to image ids (root inside = uid 0 on the host's disk): no host user may reach those files.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, rmdir } from 'node:fs/promises';
import path from 'node:path';
import { SandboxError } from '@podflare/runtime';
import { registerTemplate, TemplateExistsError, unregisterTemplate, type TemplateRecord } from '../image/templates.js';
import { BUILTIN_TEMPLATES, DEFAULT_TEMPLATE_NAME, TEMPLATE_NAME_PATTERN } from '../image/template-recipe.js';
import { removeTree } from '../image/tree.js';
import type { Runtime, RuntimeSandbox } from '../runtime/runtime.js';
import type { ManagerContext } from './context.js';
import type { LiveSandbox } from './live-sandbox.js';
import type { TemplateLookup } from './template-policy.js';

/** Entries (files, directories, links) a template made from a sandbox may hold. */
export const MAX_TEMPLATE_ENTRIES = 1_000_000;

/** What a template made from a sandbox reports (POST /v1/sandboxes/:id/template). */
export interface SavedTemplate {
  name: string;
  kind: 'directory';
  description: string;
  from_sandbox: string;
  size_bytes: number;
  built_at: string;
  runtimes: string[];
  /**
   * What a sandbox started from it has of the original: its files, and (`interpreter`) its
   * interpreter's state where the template's zygote is a fork of the sandbox.
   */
  carries: { files: true; interpreter: boolean };
}

/** The manager's view of the template registry (image/templates.ts's TemplateCatalog). */
export interface TemplateRegistryView {
  /** Whether any template (anyone's) has this name. */
  exists(name: string): Promise<boolean>;
  /** The registered template of that name, if `owner` may see it. */
  record(name: string, owner?: string): Promise<TemplateRecord | undefined>;
  /** Every registered template (everyone's). */
  all(): Promise<TemplateRecord[]>;
}

/** The registry view of a template lookup that has one (a TemplateCatalog does). */
export function registryView(t: TemplateLookup | undefined): TemplateRegistryView | undefined {
  if (!t?.exists || !t.record || !t.all) return undefined;
  return { exists: t.exists.bind(t), record: t.record.bind(t), all: t.all.bind(t) };
}

/** How a template's zygote is made from the sandbox it is made from (PoolUse). */
export interface ZygoteSeeder {
  forkZygote(runtime: Runtime, parent: RuntimeSandbox, template: string, layers: string[]): Promise<RuntimeSandbox | null>;
  adoptZygote(runtime: Runtime, template: string, zygote: RuntimeSandbox): boolean;
}

export class LiveTemplates {
  /** Names being made now (a second request for one is a 409 before any copy starts). */
  private readonly making = new Set<string>();

  constructor(
    private readonly ctx: ManagerContext,
    private readonly registry: TemplateRegistryView | undefined,
    /** Ends a template's warm pools and zygote. */
    private readonly dropPools: (template: string) => Promise<void>,
    /** Forks a sandbox into a template's zygote, and makes it the template's (manager/pool-use.ts). */
    private readonly zygotes?: ZygoteSeeder,
  ) {}

  /** Makes template `name` from `s`'s current files (waits for a running exec: it goes through the sandbox's queue). */
  async save(s: LiveSandbox, name: unknown, description?: string): Promise<SavedTemplate> {
    const registry = this.registry;
    const runtime = s.runtime;
    checkName(name);
    if (!runtime.saveTemplateLayer || !registry) {
      const can = [...this.ctx.runtimes.values()].filter((r) => r.saveTemplateLayer).map((r) => r.name);
      throw new SandboxError('not_supported',
        `the ${runtime.name} runtime cannot make a template from a live sandbox` + (can.length ? ` (sandboxes of the ${can.join(', ')} runtime can)` : ''));
    }
    if (this.making.has(name) || (await registry.exists(name))) throw new SandboxError('conflict', `a template named "${name}" exists already`, { field: 'name' });
    this.making.add(name);
    try {
      return await s.queue.run(async () => {
        if (!this.ctx.live.has(s.record.id)) throw new SandboxError('sandbox_gone', `sandbox ${s.record.id} is gone`);
        const dir = path.join(this.ctx.config.imagesDir, `live-${randomBytes(8).toString('hex')}`);
        await mkdir(dir, { mode: 0o700 });
        try {
          const limits = s.record.limits ?? this.ctx.config.defaultLimits;
          const { layers, bytes } = await runtime.saveTemplateLayer!(s.rt, path.join(dir, 'layer'), { maxBytes: limits.diskBytes, maxEntries: MAX_TEMPLATE_ENTRIES });
          // Its zygote: a fork of the sandbox (its interpreter) over the template's files, made
          // while the sandbox is idle, in use once the template is registered.
          const zygote = (await this.zygotes?.forkZygote(runtime, s.rt, name, layers)) ?? null;
          const record: TemplateRecord = {
            name, source: 'directory', description: description ?? `made from sandbox ${s.record.id}`, layers, sizeBytes: bytes,
            builtAt: new Date().toISOString(), owner: s.record.owner, fromSandbox: s.record.id,
          };
          try {
            await registerTemplate(this.ctx.config.imagesDir, record, { exclusive: true });
          } catch (err) {
            await zygote?.destroy();
            throw err;
          }
          const interpreter = zygote !== null && this.zygotes!.adoptZygote(runtime, name, zygote);
          this.ctx.log.info('template made from a sandbox', { template: name, sandbox: s.record.id, bytes, interpreter });
          const runtimes = [...this.ctx.runtimes.values()].filter((r) => r.capabilities.templates).map((r) => r.name);
          return {
            name, kind: 'directory', description: record.description!, from_sandbox: s.record.id, size_bytes: bytes, built_at: record.builtAt, runtimes,
            carries: { files: true, interpreter },
          };
        } catch (err) {
          await removeTree(dir).catch(() => undefined);
          if (err instanceof TemplateExistsError) throw new SandboxError('conflict', err.message, { field: 'name' });
          throw err;
        }
      });
    } finally {
      this.making.delete(name);
    }
  }

  /**
   * Deletes a template made from a sandbox that `owner` may see: no new sandbox starts from it, its
   * warm pool and zygote end, and its layer is removed. Refused (409) while a live sandbox of this
   * server runs on it (its root is mounted over that layer) or another template is built over it.
   * Templates built from a recipe are the operator's (no owner: every key would see them): the
   * API does not delete them (403).
   */
  async remove(name: string, owner?: string): Promise<void> {
    if (name === DEFAULT_TEMPLATE_NAME || name in BUILTIN_TEMPLATES) {
      throw new SandboxError('bad_request', `"${name}" is a built-in template: it cannot be deleted`, { field: 'name' });
    }
    const record = await this.registry?.record(name, owner);
    if (!record) throw new SandboxError('not_found', `no template named "${name}"`);
    if (record.source !== 'directory') {
      throw new SandboxError('forbidden', `template "${name}" was built from a recipe by the server's operator: the API deletes only templates made from sandboxes`);
    }
    const own = record.layers[0];
    const over = own ? (await this.registry!.all()).filter((r) => r.name !== name && r.layers.includes(own)).map((r) => r.name) : [];
    if (over.length) throw new SandboxError('conflict', `template${over.length > 1 ? 's' : ''} ${over.join(', ')} ${over.length > 1 ? 'are' : 'is'} built over "${name}": delete ${over.length > 1 ? 'them' : 'it'} first`);
    const users = [...this.ctx.live.values()].filter((s) => s.record.template === name).length;
    if (users) throw new SandboxError('conflict', `${users} live sandbox${users > 1 ? 'es' : ''} started from template "${name}": delete ${users > 1 ? 'them' : 'it'} first`);
    await unregisterTemplate(this.ctx.config.imagesDir, name);
    await this.dropPools(name);
    if (own && path.basename(own) === 'layer' && /^live-[0-9a-f]{16}$/.test(path.basename(path.dirname(own)))) {
      const dir = path.dirname(own);
      await removeTree(own).catch((err: Error) => this.ctx.log.warn('could not remove a deleted template\'s layer', { template: name, error: err.message }));
      await rmdir(dir).catch(() => undefined);
    }
  }
}

function checkName(name: unknown): asserts name is string {
  if (typeof name !== 'string' || !TEMPLATE_NAME_PATTERN.test(name)) {
    throw new SandboxError('bad_request', 'name: a template name is [a-z][a-z0-9-]*, at most 40 characters', { field: 'name' });
  }
  if (name === DEFAULT_TEMPLATE_NAME || name in BUILTIN_TEMPLATES) {
    throw new SandboxError('conflict', `"${name}" is a built-in template's name`, { field: 'name' });
  }
}
