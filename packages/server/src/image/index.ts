/**
 * The sandbox image: a Debian base (built once with mmdebstrap, minutes) plus a small agent layer
 * (the repo's agent/*.py, rebuilt in milliseconds whenever they change). The runtime mounts them as
 * overlay lower layers, agent over base.
 *
 *   <imagesDir>/base-<recipehash>/rootfs/        the Debian tree
 *   <imagesDir>/base-<recipehash>/recipe.json    what it was built from; build.log beside it
 *   <imagesDir>/agent-<agenthash>/opt/podflare/  the agent's files (+ __pycache__)
 *   <imagesDir>/.build.lock/                     held while building (see lock.ts)
 *
 * Old images are left in place when the recipe or the agent changes: a running server may have
 * sandboxes on them, and deleting an overlay's lower layer under it is undefined behaviour.
 * pruneImages() (`podflare image prune`) removes the ones no mount on the machine refers to.
 *
 * @example
 *   const img = await ensureImage({ imagesDir: '/var/lib/podflare/images', agentDir: 'agent' });
 *   // mount -t overlay -o lowerdir=${img.agent}:${img.base},upperdir=…,workdir=… overlay /mnt
 */
import { mkdir, readdir, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { isAlive } from '../proc.js';
import { agentHash, agentLayerDir, baseDir, basePythonTag, buildAgent, buildBase, listAgentFiles } from './build.js';
import { acquireLock, type HeldLock } from './lock.js';
import { processesWithFilesUnder, vmRootHash } from './vm-image.js';
import type { ImageProgress, ImageStage } from './progress.js';
import { baseRecipe, recipeHash } from './recipe.js';
import { readRegistry } from './templates.js';
import { BUILTIN_TEMPLATES as BUILTINS, templateHash } from './template-recipe.js';
import { formatBytes, isDir, pathInUse, processesUsing, removeTree, treeSize } from './tree.js';

export { ImageBuildError } from './build.js';
export { createProgressReporter } from './progress.js';
export { ensureVmImage, AGENT_PORT_NAME, type VmImagePaths, type EnsureVmImageOptions } from './vm-image.js';
export type { ImageProgress, ImageStage, ProgressReporter, ProgressReporterOptions } from './progress.js';
export {
  TemplateCatalog, buildTemplate, registerTemplate, readRegistry, UnknownTemplateError, BrokenTemplateError, TemplateBuildingError,
  type TemplateRecord, type TemplateSummary, type BuildTemplateOptions,
} from './templates.js';
export { BUILTIN_TEMPLATES, DEFAULT_TEMPLATE_NAME, RecipeError, loadRecipeFile, parseRecipe, type TemplateRecipe } from './template-recipe.js';
export { baseRecipe, recipeHash, IMAGE_BUILDER_VERSION, BASE_PACKAGES, type BaseRecipe } from './recipe.js';

export interface ImagePaths {
  /** `<basehash>-<agenthash>`: changes whenever either layer does. */
  id: string;
  /** The Debian root filesystem (overlay lower, bottom). */
  base: string;
  /** The agent layer, holding opt/podflare/ (overlay lower, above base). */
  agent: string;
  /** The base's recipe hash (templates are built over it). */
  baseHash: string;
}

export interface EnsureImageOptions {
  imagesDir: string;
  /** The repo's agent/ folder. */
  agentDir: string;
  /** Rebuild both layers even if they exist. */
  force?: boolean;
  onProgress?: (p: ImageProgress) => void;
  log?: (msg: string) => void;
  /** Aborts a build in progress (mmdebstrap gets SIGTERM and cleans up). */
  signal?: AbortSignal;
}

const LOCK_NAME = '.build.lock';

/**
 * Returns the image for the current recipe and agent, building what is missing. Cheap when both
 * exist (a few stat calls and hashing the agent's files, no lock). Safe to call from several
 * processes at once: one builds, the others wait for it.
 */
export async function ensureImage(opts: EnsureImageOptions): Promise<ImagePaths> {
  const started = Date.now();
  const imagesDir = path.resolve(opts.imagesDir);
  const agentSrc = path.resolve(opts.agentDir);
  const report = (stage: ImageStage, message: string, step?: string, detail?: string) =>
    opts.onProgress?.({ stage, message, step, detail, elapsedMs: Date.now() - started });
  const log = opts.log ?? (() => undefined);

  report('check', `looking for the image in ${imagesDir}`);
  await mkdir(imagesDir, { recursive: true });
  const recipe = await baseRecipe();
  const baseHash = recipeHash(recipe);
  const rootfs = path.join(baseDir(imagesDir, baseHash), 'rootfs');

  if (!opts.force) {
    const found = await existing(imagesDir, agentSrc, baseHash, rootfs);
    if (found) {
      report('done', `image ${found.id} ready`);
      return found;
    }
  }

  let lock: HeldLock | undefined;
  try {
    lock = await acquireLock(path.join(imagesDir, LOCK_NAME), {
      signal: opts.signal,
      onWait: (holder) =>
        report('wait', holder ? `another process (pid ${holder.pid} on ${holder.host}) is building the image; waiting` : 'another process is building the image; waiting'),
    });
    await cleanLeftovers(imagesDir, log);

    let builtBase = false;
    if (opts.force || !(await isDir(rootfs))) {
      const t = Date.now();
      report('base', `building base-${baseHash} with mmdebstrap`);
      await buildBase(imagesDir, recipe, {
        replace: opts.force,
        signal: opts.signal,
        log,
        onStep: (step, detail) => report('base', `building base-${baseHash} with mmdebstrap`, step, detail),
      });
      const size = await treeSize(rootfs);
      log(`base-${baseHash} built in ${((Date.now() - t) / 1000).toFixed(1)} s (${formatBytes(size)})`);
      builtBase = true;
    }

    report('agent', `agent layer from ${agentSrc}`);
    const t = Date.now();
    const before = await agentLayerExists(imagesDir, agentSrc, rootfs);
    const agent = await buildAgent(imagesDir, agentSrc, rootfs, { replace: opts.force, log });
    if (opts.force || !before) log(`agent-${agent.hash} built in ${Date.now() - t} ms`);

    // --force moved the previous build to .trash-*: delete it now unless a sandbox still runs on it.
    if (opts.force) await cleanLeftovers(imagesDir, log);
    if (builtBase || opts.force || !before) await noteOldImages(imagesDir, baseHash, agent.hash, log);
    const paths: ImagePaths = { id: `${baseHash}-${agent.hash}`, base: rootfs, agent: agent.dir, baseHash };
    report('done', `image ${paths.id} ready`);
    return paths;
  } finally {
    await lock?.release();
  }
}

async function existing(imagesDir: string, agentSrc: string, baseHash: string, rootfs: string): Promise<ImagePaths | undefined> {
  if (!(await isDir(rootfs))) return undefined;
  const files = await listAgentFiles(agentSrc);
  if (!files.length) return undefined; // let the builder say what is wrong
  const hash = await agentHash(files, await basePythonTag(rootfs));
  const dir = agentLayerDir(imagesDir, hash);
  return (await isDir(dir)) ? { id: `${baseHash}-${hash}`, base: rootfs, agent: dir, baseHash } : undefined;
}

async function agentLayerExists(imagesDir: string, agentSrc: string, rootfs: string): Promise<boolean> {
  const files = await listAgentFiles(agentSrc);
  return files.length > 0 && isDir(agentLayerDir(imagesDir, await agentHash(files, await basePythonTag(rootfs))));
}

/** `.tmp-<kind>-<hash>-<pid>-<rand>` → pid */
function tmpOwner(name: string): number | undefined {
  const m = /^\.tmp-(?:base|agent|tpl|vmkernel|vmroot)-[0-9a-f]+-(\d+)-[0-9a-f]+$/.exec(name);
  return m ? Number(m[1]) : undefined;
}


/**
 * Called with the lock held: removes half-built trees of dead builders (once no process works in
 * them any more), stale lock copies, and replaced images (`.trash-*`) nothing uses any more.
 * Returns what it removed (or, with dryRun, would remove).
 */
async function cleanLeftovers(imagesDir: string, log: (msg: string) => void, dryRun = false): Promise<string[]> {
  const removed: string[] = [];
  for (const name of await readdir(imagesDir)) {
    const full = path.join(imagesDir, name);
    try {
      const pid = tmpOwner(name);
      let remove = false;
      if (pid !== undefined && pid !== process.pid && !isAlive(pid)) {
        const users = await processesUsing(full);
        if (users.length) log(`${name} is left by an interrupted build but still in use by pid ${users.join(', ')}; removing it later`);
        else remove = true;
      } else if (name.startsWith(`${LOCK_NAME}.stale-`)) {
        remove = true;
      } else if (name.startsWith('.trash-')) {
        remove = !(await pathInUse(full));
      }
      if (!remove) continue;
      removed.push(full);
      if (dryRun) continue;
      if (pid !== undefined) log(`removing ${name} (left by an interrupted build)`);
      await removeTree(full);
    } catch (err) {
      log(`could not clean ${full}: ${(err as Error).message}`);
    }
  }
  return removed;
}

async function noteOldImages(imagesDir: string, baseHash: string, agentHash: string, log: (msg: string) => void): Promise<void> {
  const old = (await readdir(imagesDir)).filter(
    (n) => (/^base-[0-9a-f]{12}$/.test(n) && n !== `base-${baseHash}`) || (/^agent-[0-9a-f]{12}$/.test(n) && n !== `agent-${agentHash}`),
  );
  if (old.length) log(`${old.length} older image director${old.length === 1 ? 'y' : 'ies'} kept in ${imagesDir} (\`podflare image prune\` removes unused ones)`);
}

export interface ImageInfo {
  /** Hash of the recipe this host would build now. */
  recipeHash: string;
  /** base-<hash> directories present with a rootfs, newest first. */
  bases: string[];
  /** Whether the base for the current recipe is built. */
  current: boolean;
  currentBase: string;
}

/** What is in imagesDir, without building or locking anything (for `podflare doctor`). */
export async function inspectImages(imagesDir: string): Promise<ImageInfo> {
  const hash = recipeHash(await baseRecipe());
  const currentBase = path.join(baseDir(imagesDir, hash), 'rootfs');
  const bases: { dir: string; mtime: number }[] = [];
  try {
    for (const name of await readdir(imagesDir)) {
      const rootfs = path.join(imagesDir, name, 'rootfs');
      if (/^base-[0-9a-f]{12}$/.test(name) && (await isDir(rootfs))) bases.push({ dir: rootfs, mtime: (await stat(rootfs)).mtimeMs });
    }
  } catch {
    /* no imagesDir yet */
  }
  bases.sort((a, b) => b.mtime - a.mtime);
  return { recipeHash: hash, bases: bases.map((b) => b.dir), current: await isDir(currentBase), currentBase };
}

export interface PruneResult {
  removed: { path: string; bytes?: number }[];
  kept: { path: string; reason: string }[];
}

/**
 * Removes images other than the current one (for this recipe and `agentDir`), unless some mount on
 * the machine (a running sandbox's overlay) still refers to them; also removes leftovers of
 * interrupted builds and failed-build logs.
 */
export async function pruneImages(opts: { imagesDir: string; agentDir: string; dryRun?: boolean; log?: (msg: string) => void }): Promise<PruneResult> {
  const imagesDir = path.resolve(opts.imagesDir);
  const log = opts.log ?? (() => undefined);
  const result: PruneResult = { removed: [], kept: [] };
  if (!(await isDir(imagesDir))) return result;
  const lock = await acquireLock(path.join(imagesDir, LOCK_NAME));
  try {
    for (const p of await cleanLeftovers(imagesDir, log, opts.dryRun)) result.removed.push({ path: p });
    const baseHash = recipeHash(await baseRecipe());
    const rootfs = path.join(baseDir(imagesDir, baseHash), 'rootfs');
    const files = await listAgentFiles(path.resolve(opts.agentDir)).catch(() => []);
    const currentAgent = files.length && (await isDir(rootfs)) ? `agent-${await agentHash(files, await basePythonTag(rootfs))}` : undefined;
    // Bases that user templates were built over (their layers sit on them).
    const templateBases = new Set((await readRegistry(imagesDir)).flatMap((r) => r.layers).map((l) => path.dirname(l)));
    const currentBuiltins = new Set(await Promise.all(Object.values(BUILTINS).map(async (r) => `tpl-${await templateHash(r, baseHash)}`)));
    const kernels = [];
    for (const name of await readdir(imagesDir)) {
      if (/^vmkernel-[0-9a-f]{12}$/.test(name)) kernels.push({ name, mtime: (await stat(path.join(imagesDir, name))).mtimeMs });
    }
    const newestKernel = kernels.sort((a, b) => b.mtime - a.mtime)[0]?.name;
    for (const name of (await readdir(imagesDir)).sort()) {
      const full = path.join(imagesDir, name);
      if (/^vm(kernel|root)-[0-9a-f]{12}$/.test(name)) {
        // VM images: keep the root of the current image, the newest kernel, and any a QEMU has open.
        const current = name === `vmroot-${currentAgent ? vmRootHash(`${baseHash}-${currentAgent.slice('agent-'.length)}`) : ''}` || name === newestKernel;
        if (current || (await processesWithFilesUnder(full)).length) {
          result.kept.push({ path: full, reason: current ? 'current' : 'in use by a VM' });
          continue;
        }
        const bytes = await treeSize(full);
        if (!opts.dryRun) await removeTree(full);
        result.removed.push({ path: full, bytes });
        continue;
      }
      const isImage = /^(base|agent|tpl)-[0-9a-f]{12}$/.test(name);
      const isFailedLog = /^(base|tpl)-[0-9a-f]{12}\.failed\.log$/.test(name);
      if (!isImage && !isFailedLog) continue;
      // Template layers: those a registered template or a built-in over the current base uses.
      if (name.startsWith('tpl-') && isImage && (templateBases.has(full) || currentBuiltins.has(name))) {
        result.kept.push({ path: full, reason: 'a template uses it' });
        continue;
      }
      if (name === `base-${baseHash}` || name === currentAgent) {
        result.kept.push({ path: full, reason: 'current' });
        continue;
      }
      if (isImage && templateBases.has(full)) {
        result.kept.push({ path: full, reason: 'a registered template is built over it' });
        continue;
      }
      if (isImage && (await pathInUse(full))) {
        result.kept.push({ path: full, reason: 'in use by a mount' });
        continue;
      }
      const bytes = isImage ? await treeSize(full) : undefined;
      if (!opts.dryRun) {
        if (isImage) await removeTree(full);
        else await rm(full, { force: true });
      }
      result.removed.push({ path: full, bytes });
    }
    return result;
  } finally {
    await lock.release();
  }
}
