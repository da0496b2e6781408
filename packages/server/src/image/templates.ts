/**
 * The templates a server offers, and where each one's layers are:
 *   - `default`: the base image (no layer of its own);
 *   - built-ins (`python-datasci`): a recipe in code, its layer built over the current base on
 *     first use (or ahead of time by `podflare template build python-datasci`);
 *   - user templates: registered in <imagesDir>/templates/<name>.json once their layer is built
 *     (`podflare template build recipe.json`), read on each lookup, so a server picks up a
 *     template built while it runs.
 *
 * A registered template names its lower layers (topmost first, the base last) rather than a
 * recipe: a template keeps working on the base it was built over when `default` moves on, and a
 * template whose root is any read-only directory (e.g. one saved from a live sandbox) registers
 * the same way (`registerTemplate` with `source: 'directory'`).
 */
import { link, mkdir, readFile, readdir, rename, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { acquireLock } from './lock.js';
import type { ImageProgress } from './progress.js';
import { buildTemplateLayer, templateLayerDir } from './template-build.js';
import { BUILTIN_TEMPLATES, DEFAULT_TEMPLATE_NAME, TEMPLATE_NAME_PATTERN, templateHash, type TemplateRecipe } from './template-recipe.js';
import { isAlive } from '../proc.js';
import { isDir, processesUsing, removeTree, treeSize } from './tree.js';

/** What a registry file holds. */
export interface TemplateRecord {
  name: string;
  /** How its root was made. */
  source: 'recipe' | 'directory';
  description?: string;
  /** Read-only lower layers, topmost first; the last is a Debian base. The agent layer goes on top. */
  layers: string[];
  /** Bytes the template adds to its base (its own layers). */
  sizeBytes?: number;
  builtAt: string;
  hash?: string;
  recipe?: TemplateRecipe;
  /**
   * A template made from a live sandbox: the owner of that sandbox (its API key's digest; '' on a
   * server without keys). Only that owner sees, starts and deletes it: it holds that owner's files.
   */
  owner?: string;
  /** A template made from a live sandbox: that sandbox's id. */
  fromSandbox?: string;
}

/** One line of `GET /v1/templates` and `podflare template ls`. */
export interface TemplateSummary {
  name: string;
  kind: 'base' | 'builtin' | 'recipe' | 'directory';
  description?: string;
  /** Whether a sandbox can start from it now (a built-in is built on first use otherwise). */
  built: boolean;
  /** Disk bytes of its own layers (for `default`: the base), when known. */
  size_bytes: number | null;
  /** Runtimes that can start it. */
  runtimes: string[];
  built_at: string | null;
}

/** No template of that name: the message names the ones there are. */
export class UnknownTemplateError extends Error {
  override readonly name = 'UnknownTemplateError';
  constructor(readonly template: string, readonly available: string[]) {
    super(`unknown template "${template}" (available: ${available.join(', ')})`);
  }
}

/** A built-in template asked for before it is built: its build has started (or is under way). */
export class TemplateBuildingError extends Error {
  override readonly name = 'TemplateBuildingError';
  constructor(readonly template: string, readonly elapsedMs: number, readonly lastFailure?: string) {
    super(`template ${template} is being built on its first use (${Math.round(elapsedMs / 1000)} s so far; it takes a few minutes): ` +
      `retry later, or build it ahead with \`podflare template build ${template}\`` +
      (lastFailure ? ` (the previous attempt failed: ${lastFailure})` : ''));
  }
}

/** A registered template whose layers are gone (pruned, or its base removed). */
export class BrokenTemplateError extends Error {
  override readonly name = 'BrokenTemplateError';
}

const REGISTRY_DIR = 'templates';
const LOCK_NAME = '.build.lock';

export function registryDir(imagesDir: string): string {
  return path.join(imagesDir, REGISTRY_DIR);
}

/** A template of that name is registered already (registerTemplate with `exclusive`). */
export class TemplateExistsError extends Error {
  override readonly name = 'TemplateExistsError';
}

/**
 * Adds (or replaces) a template in the registry, atomically. `exclusive`: fails with
 * TemplateExistsError instead of replacing one (two servers sharing the images directory included).
 */
export async function registerTemplate(imagesDir: string, record: TemplateRecord, opts: { exclusive?: boolean } = {}): Promise<void> {
  if (!TEMPLATE_NAME_PATTERN.test(record.name) || record.name === DEFAULT_TEMPLATE_NAME || record.name in BUILTIN_TEMPLATES) {
    throw new Error(`cannot register a template named "${record.name}"`);
  }
  const dir = registryDir(imagesDir);
  await mkdir(dir, { recursive: true });
  const tmp = path.join(dir, `.${record.name}.${randomBytes(4).toString('hex')}.tmp`);
  await writeFile(tmp, JSON.stringify(record, null, 2) + '\n');
  if (!opts.exclusive) return void (await rename(tmp, path.join(dir, `${record.name}.json`)));
  try {
    await link(tmp, path.join(dir, `${record.name}.json`)); // unlike rename, never replaces
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw new TemplateExistsError(`a template named "${record.name}" exists already`);
    throw err;
  } finally {
    await unlink(tmp).catch(() => undefined);
  }
}

/** Removes a template from the registry; false if it was not there. Its layers are the caller's to remove. */
export async function unregisterTemplate(imagesDir: string, name: string): Promise<boolean> {
  if (!TEMPLATE_NAME_PATTERN.test(name)) return false;
  try {
    await unlink(path.join(registryDir(imagesDir), `${name}.json`));
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw err;
  }
}

/** Whether `owner` may see a registered template (undefined: the server itself, sees all). */
function visibleTo(r: TemplateRecord, owner: string | undefined): boolean {
  return owner === undefined || r.owner === undefined || r.owner === owner;
}

/** Every registered template (files that do not parse are skipped). */
export async function readRegistry(imagesDir: string): Promise<TemplateRecord[]> {
  let names: string[];
  try {
    names = (await readdir(registryDir(imagesDir))).filter((n) => n.endsWith('.json'));
  } catch {
    return [];
  }
  const out: TemplateRecord[] = [];
  for (const n of names.sort()) {
    try {
      const r = JSON.parse(await readFile(path.join(registryDir(imagesDir), n), 'utf8')) as TemplateRecord;
      if (r.name === n.slice(0, -'.json'.length) && TEMPLATE_NAME_PATTERN.test(r.name) && Array.isArray(r.layers)) out.push(r);
    } catch {
      /* half-written or foreign: not a template */
    }
  }
  return out;
}

export interface BuildTemplateOptions {
  imagesDir: string;
  /** The default image's base (what layers are built over). */
  base: { rootfs: string; hash: string };
  onProgress?: (p: ImageProgress) => void;
  log?: (msg: string) => void;
  signal?: AbortSignal;
}

/**
 * Builds `recipe`'s layer over the base (instant when built already) and, for a user recipe,
 * registers it. Returns the template's lower layers (topmost first, base last).
 */
export async function buildTemplate(recipe: TemplateRecipe, opts: BuildTemplateOptions): Promise<TemplateRecord> {
  const started = Date.now();
  const report = (message: string, step?: string, detail?: string, stage: 'template' | 'done' = 'template') =>
    opts.onProgress?.({ stage, message, step, detail, elapsedMs: Date.now() - started });
  const hash = await templateHash(recipe, opts.base.hash);
  const layer = path.join(templateLayerDir(opts.imagesDir, hash), 'layer');
  if (!(await isDir(layer))) {
    // One build of the images directory at a time (the base's builder takes the same lock).
    const lock = await acquireLock(path.join(opts.imagesDir, LOCK_NAME), {
      signal: opts.signal,
      onWait: (holder) => report(`another process${holder ? ` (pid ${holder.pid})` : ''} is building an image; waiting`),
    });
    try {
      await removeDeadBuilds(opts.imagesDir, opts.log);
      report(`building template ${recipe.name}`);
      await buildTemplateLayer(opts.imagesDir, opts.base, recipe, hash, {
        signal: opts.signal, log: opts.log, onStep: (step, detail) => report(`building template ${recipe.name}`, step, detail),
      });
    } finally {
      await lock.release();
    }
  }
  const record: TemplateRecord = {
    name: recipe.name, source: 'recipe', description: recipe.description, layers: [layer, opts.base.rootfs],
    sizeBytes: await treeSize(layer), builtAt: new Date().toISOString(), hash, recipe,
  };
  if (!(recipe.name in BUILTIN_TEMPLATES)) await registerTemplate(opts.imagesDir, record);
  report(`template ${recipe.name} ready`, undefined, undefined, 'done');
  return record;
}

/**
 * With the lock held: the `.tmp-tpl-*` trees of template builds whose process died (killed
 * mid-build). They hold plain files only (the build's mounts lived in its own mount namespace),
 * but one of its processes may still run in it: such a tree is left for a later build.
 */
async function removeDeadBuilds(imagesDir: string, log?: (msg: string) => void): Promise<void> {
  for (const name of await readdir(imagesDir)) {
    const pid = Number(/^\.tmp-tpl-[0-9a-f]+-(\d+)-[0-9a-f]+$/.exec(name)?.[1]);
    if (!pid || pid === process.pid || isAlive(pid)) continue;
    const full = path.join(imagesDir, name);
    if ((await processesUsing(full)).length) continue;
    log?.(`removing ${name} (left by an interrupted template build)`);
    await removeTree(full).catch((err: Error) => log?.(`could not remove ${full}: ${err.message}`));
  }
}

export interface TemplateCatalogOptions {
  imagesDir: string;
  base: { rootfs: string; hash: string };
  /** Runtimes this server offers (all start `default`). */
  runtimes: string[];
  /** Those of them that start the other templates (capability `templates`). */
  templateRuntimes?: string[];
  log: (msg: string) => void;
  onProgress?: (p: ImageProgress) => void;
}

/** A server's view of its templates: lookups for starting sandboxes, the list for the API. */
export class TemplateCatalog {
  /** Built-ins being built on first use: creates asking meanwhile share the build. */
  private readonly building = new Map<string, { promise: Promise<TemplateRecord>; startedAt: number }>();
  /** Why the last build of a built-in failed (said once to the next create, which retries it). */
  private readonly failures = new Map<string, string>();
  private readonly sizes = new Map<string, number | null>();

  constructor(private readonly opts: TemplateCatalogOptions) {}

  /** Names a create may ask for (`owner`: those of its templates made from sandboxes only). */
  async names(owner?: string): Promise<string[]> {
    const registered = (await readRegistry(this.opts.imagesDir)).filter((r) => visibleTo(r, owner));
    return [DEFAULT_TEMPLATE_NAME, ...Object.keys(BUILTIN_TEMPLATES), ...registered.map((r) => r.name)];
  }

  /** Whether any template (anyone's) has this name. */
  async exists(name: string): Promise<boolean> {
    return (await this.names()).includes(name);
  }

  /** Every registered template (everyone's). */
  all(): Promise<TemplateRecord[]> {
    return readRegistry(this.opts.imagesDir);
  }

  /** The registered template of that name, if `owner` may see it. */
  async record(name: string, owner?: string): Promise<TemplateRecord | undefined> {
    return (await readRegistry(this.opts.imagesDir)).find((r) => r.name === name && visibleTo(r, owner));
  }

  /** Throws UnknownTemplateError unless `name` is a template of this server (that `owner` may start). */
  async check(name: string, owner?: string): Promise<void> {
    const names = await this.names(owner);
    if (!names.includes(name)) throw new UnknownTemplateError(name, names);
  }

  /**
   * Throws TemplateBuildingError for a built-in template that is not built yet, having started
   * its build: a create answers at once (503, retry) instead of waiting minutes for apt-get.
   */
  async ensureReady(name: string): Promise<void> {
    const builtin = BUILTIN_TEMPLATES[name];
    if (!builtin) return;
    const hash = await templateHash(builtin, this.opts.base.hash);
    if (await isDir(path.join(templateLayerDir(this.opts.imagesDir, hash), 'layer'))) return;
    const lastFailure = this.failures.get(name);
    this.failures.delete(name);
    const build = this.build(name, builtin);
    throw new TemplateBuildingError(name, Date.now() - build.startedAt, lastFailure);
  }

  /** A built-in's build: the one under way, or a new one. */
  private build(name: string, recipe: TemplateRecipe): { promise: Promise<TemplateRecord>; startedAt: number } {
    let b = this.building.get(name);
    if (!b) {
      const { imagesDir, base, log, onProgress } = this.opts;
      b = { promise: buildTemplate(recipe, { imagesDir, base, log, onProgress }), startedAt: Date.now() };
      this.building.set(name, b);
      // Kept once built (the lookup is then instant); a failed build is retried next time.
      b.promise.catch((err: Error) => {
        this.building.delete(name);
        this.failures.set(name, err.message.split('\n')[0]!);
        this.opts.log(`building template ${name} failed: ${err.message}`);
      });
    }
    return b;
  }

  /**
   * The lower layers of a template below the agent layer, topmost first (base last), building a
   * built-in one first if needed. `default` has none of its own: just the base.
   */
  async layers(name: string): Promise<string[]> {
    if (name === DEFAULT_TEMPLATE_NAME) return [this.opts.base.rootfs];
    const builtin = BUILTIN_TEMPLATES[name];
    if (builtin) return (await this.build(name, builtin).promise).layers;
    const record = (await readRegistry(this.opts.imagesDir)).find((r) => r.name === name);
    if (!record) throw new UnknownTemplateError(name, await this.names());
    for (const layer of record.layers) {
      if (!(await isDir(layer))) throw new BrokenTemplateError(`template ${name} is broken: its layer ${layer} is gone (build it again)`);
    }
    return record.layers;
  }

  /** Every template with whether it is built, its size and the runtimes that can start it. */
  async list(owner?: string): Promise<TemplateSummary[]> {
    const { runtimes } = this.opts;
    const layered = this.opts.templateRuntimes ?? [];
    const out: TemplateSummary[] = [{
      name: DEFAULT_TEMPLATE_NAME, kind: 'base', description: 'Debian with Python, numpy, pandas, matplotlib, curl, wget, git, pip, requests, httpx',
      built: true, size_bytes: await this.size(this.opts.base.rootfs), runtimes, built_at: null,
    }];
    for (const recipe of Object.values(BUILTIN_TEMPLATES)) {
      const hash = await templateHash(recipe, this.opts.base.hash);
      const dir = templateLayerDir(this.opts.imagesDir, hash);
      const built = await isDir(path.join(dir, 'layer'));
      out.push({
        name: recipe.name, kind: 'builtin', description: recipe.description, built,
        size_bytes: built ? await this.size(path.join(dir, 'layer')) : null, runtimes: layered, built_at: built ? await builtAt(dir) : null,
      });
    }
    for (const r of (await readRegistry(this.opts.imagesDir)).filter((t) => visibleTo(t, owner))) {
      let built = true;
      for (const layer of r.layers) built &&= await isDir(layer);
      out.push({
        name: r.name, kind: r.source, description: r.description, built, size_bytes: r.sizeBytes ?? null, runtimes: layered, built_at: r.builtAt,
      });
    }
    return out;
  }

  private async size(dir: string): Promise<number | null> {
    if (!this.sizes.has(dir)) this.sizes.set(dir, (await treeSize(dir)) ?? null);
    return this.sizes.get(dir)!;
  }
}

async function builtAt(dir: string): Promise<string | null> {
  try {
    return (JSON.parse(await readFile(path.join(dir, 'template.json'), 'utf8')) as { builtAt?: string }).builtAt ?? null;
  } catch {
    return null;
  }
}
