/**
 * What the sandbox manager asks about templates: whether a create may name one (and on which
 * runtime), how many of its sandboxes to keep warm, and which to warm at start-up. The templates
 * themselves (recipes, layers, the registry) live in image/templates.ts.
 */
import type { ServerConfig } from '../config.js';
import { TemplateBuildingError, UnknownTemplateError, type TemplateRecord } from '../image/templates.js';
import { DEFAULT_TEMPLATE_NAME } from '../image/template-recipe.js';
import type { Logger } from '../log.js';
import type { PoolKey } from '../pool.js';
import { SandboxError } from '@podflare/runtime';

/** The part of the TemplateCatalog the manager needs. */
export interface TemplateLookup {
  /** Throws UnknownTemplateError unless the template exists (and `owner` may start it). */
  check(name: string, owner?: string): Promise<void>;
  /** Throws TemplateBuildingError while a built-in template is built on its first use. */
  ensureReady?(name: string): Promise<void>;
  /** The registry itself, where templates can be made from live sandboxes and deleted (manager/live-templates.ts). */
  exists?(name: string): Promise<boolean>;
  record?(name: string, owner?: string): Promise<TemplateRecord | undefined>;
  all?(): Promise<TemplateRecord[]>;
}

/**
 * 400 for a template that does not exist (naming those that do), or one the runtime cannot start:
 * the VM runtime boots the default image only (its guest root is one ext4 file made from it;
 * templates are layers for the namespace runtime's overlay).
 */
export async function checkTemplate(
  template: string, runtime: { name: string; capabilities: { templates?: boolean } }, templates: TemplateLookup | undefined, owner?: string,
): Promise<void> {
  if (template === DEFAULT_TEMPLATE_NAME) return;
  if (!templates) throw new SandboxError('bad_request', `unknown template "${template}" (available: ${DEFAULT_TEMPLATE_NAME})`, { field: 'template' });
  try {
    await templates.check(template, owner);
  } catch (err) {
    if (err instanceof UnknownTemplateError) throw new SandboxError('bad_request', err.message, { field: 'template' });
    throw err;
  }
  if (!runtime.capabilities.templates) {
    throw new SandboxError('bad_request',
      `the ${runtime.name} runtime starts only the "${DEFAULT_TEMPLATE_NAME}" template; "${template}" is built for the namespace runtime (ask for runtime "ns")`,
      { field: 'template' });
  }
  try {
    await templates.ensureReady?.(template);
  } catch (err) {
    if (err instanceof TemplateBuildingError) throw new SandboxError('unavailable', err.message, { field: 'template', retryAfterSeconds: 30 });
    throw err;
  }
}

/**
 * The warm-pool size of a template asked for on demand: the configured one, else a quarter of
 * the pool size (at least 1), never more than the runtime allows.
 */
export function templatePoolTarget(config: ServerConfig, template: string, runtimeCap: number): number {
  const configured = config.templatePoolSizes[template];
  return Math.min(runtimeCap, configured ?? Math.max(1, Math.floor(config.poolSize / 4)));
}

/** At start-up: the templates given a pool size in the configuration are kept warm from now on. */
export function warmConfiguredTemplates(
  config: ServerConfig,
  templates: TemplateLookup | undefined,
  ns: unknown,
  warm: (key: PoolKey, target: number) => void,
  log: Logger,
): void {
  if (config.poolSize === 0) return;
  for (const [template, size] of Object.entries(config.templatePoolSizes)) {
    if (template === DEFAULT_TEMPLATE_NAME || size === 0) continue;
    if (!templates || !ns) {
      log.warn('PODFLARE_TEMPLATE_POOL_SIZES names a template this server cannot start', { template });
      continue;
    }
    templates.check(template).then(
      () => warm({ runtime: 'ns', template, egress: true }, size),
      (err: Error) => log.warn('PODFLARE_TEMPLATE_POOL_SIZES names an unknown template', { template, error: err.message }),
    );
  }
}
