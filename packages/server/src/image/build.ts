/**
 * The two builders behind ensureImage():
 *   - buildBase: mmdebstrap → post-steps → rename into <imagesDir>/base-<hash>/rootfs (minutes, rare)
 *   - buildAgent: copy agent/*.py (+ *.json: the protocol document) → byte-compile → rename into <imagesDir>/agent-<hash>/ (milliseconds)
 * Both write into a private `.tmp-*` directory next to the target and rename it into place, so a
 * reader never sees a half-built image and a crash leaves only a `.tmp-*` to clean up.
 */
import { createHash, randomBytes } from 'node:crypto';
import { createWriteStream, existsSync } from 'node:fs';
import { chmod, copyFile, mkdir, readFile, readdir, rename, rm, writeFile, lstat, unlink } from 'node:fs/promises';
import path from 'node:path';
import { canonicalJson, IMAGE_BUILDER_VERSION, recipeHash, type BaseRecipe, type PostStep } from './recipe.js';
import { execQuiet, isDir, removeTree } from './tree.js';
import { runLogged } from './run-logged.js';

/** A failed build, with the last lines of the builder's output (what the user needs to see). */
export class ImageBuildError extends Error {
  override readonly name = 'ImageBuildError';
  constructor(
    message: string,
    /** The last lines mmdebstrap printed. */
    readonly outputTail: string[] = [],
    /** The full build log, kept for inspection. */
    readonly logFile?: string,
  ) {
    super(
      message +
        (outputTail.length ? `\n--- last ${outputTail.length} lines of the build's output ---\n${outputTail.join('\n')}` : '') +
        (logFile ? `\n(full log: ${logFile})` : ''),
    );
  }
}

export interface BuildHooks {
  /** mmdebstrap's latest `I:` line, and the package dpkg is working on. */
  onStep?: (step: string, detail?: string) => void;
  log?: (msg: string) => void;
  signal?: AbortSignal;
}

/** `<prefix>-<hash>-<pid>-<random>`, hidden: a crashed build's leftovers are recognisable by pid. */
export function tempName(imagesDir: string, kind: 'base' | 'agent' | 'tpl', hash: string): string {
  return path.join(imagesDir, `.tmp-${kind}-${hash}-${process.pid}-${randomBytes(3).toString('hex')}`);
}

export function baseDir(imagesDir: string, hash: string): string {
  return path.join(imagesDir, `base-${hash}`);
}

export function agentLayerDir(imagesDir: string, hash: string): string {
  return path.join(imagesDir, `agent-${hash}`);
}

const TAIL_LINES = 40;

/**
 * Builds the base image for `recipe` and renames it to <imagesDir>/base-<hash>. With `replace`, an
 * existing one is moved to `.trash-*` first (a running sandbox keeps working on it: its overlay
 * holds the directories, not the name); the caller deletes the trash when nothing uses it.
 * Returns the rootfs path.
 */
export async function buildBase(imagesDir: string, recipe: BaseRecipe, hooks: BuildHooks & { replace?: boolean } = {}): Promise<string> {
  if (process.getuid?.() !== 0) {
    throw new ImageBuildError('building the image needs root (mmdebstrap --mode=root): run `sudo podflare image build` once');
  }
  const hash = recipeHash(recipe);
  const tmp = tempName(imagesDir, 'base', hash);
  const rootfs = path.join(tmp, 'rootfs');
  await mkdir(tmp, { recursive: true });
  const sourcesFile = path.join(tmp, recipe.sources.format === 'deb822' ? 'podflare.sources' : 'podflare.list');
  await writeFile(sourcesFile, recipe.sources.text);
  const logFile = path.join(tmp, 'build.log');
  hooks.log?.(`building base image base-${hash} (Debian ${recipe.suite}/${recipe.arch}, sources from ${recipe.sources.origin})`);
  try {
    await runMmdebstrap(recipe, rootfs, sourcesFile, logFile, hooks);
    hooks.onStep?.('applying post-steps');
    await applyPostSteps(rootfs, recipe.postSteps);
    await rm(sourcesFile, { force: true });
    await writeFile(path.join(tmp, 'recipe.json'), JSON.stringify({ hash, builtAt: new Date().toISOString(), recipe }, null, 2) + '\n');
    const target = baseDir(imagesDir, hash);
    if (hooks.replace && existsSync(target)) {
      await rename(target, path.join(imagesDir, `.trash-base-${hash}-${Date.now()}`));
    }
    await rename(tmp, target).catch(async (err: NodeJS.ErrnoException) => {
      // Someone else finished the same build first (their lock was judged stale): use theirs.
      if ((err.code === 'ENOTEMPTY' || err.code === 'EEXIST') && (await isDir(path.join(target, 'rootfs')))) {
        hooks.log?.(`base-${hash} appeared while building; discarding this build`);
        await removeTree(tmp);
        return;
      }
      throw err;
    });
    return path.join(target, 'rootfs');
  } catch (err) {
    // Keep the log for a post-mortem, then remove the half-built tree (unmounting what mmdebstrap left).
    const kept = path.join(imagesDir, `base-${hash}.failed.log`);
    await copyFile(logFile, kept).catch(() => undefined);
    await removeTree(tmp).catch((e: Error) => hooks.log?.(`could not remove ${tmp}: ${e.message}`));
    if (err instanceof ImageBuildError) {
      throw existsSync(kept) && !err.logFile ? new ImageBuildError(err.message.split('\n')[0]!, err.outputTail, kept) : err;
    }
    throw new ImageBuildError(`building base-${hash} failed: ${(err as Error).message}`, [], existsSync(kept) ? kept : undefined);
  }
}

function mmdebstrapArgs(recipe: BaseRecipe, rootfs: string, sourcesFile: string): string[] {
  return [
    '--mode=root',
    `--variant=${recipe.variant}`,
    '--format=directory',
    `--architectures=${recipe.arch}`,
    `--include=${recipe.packages.join(',')}`,
    ...recipe.aptOptions.map((o) => `--aptopt=${o}`),
    ...recipe.dpkgOptions.map((o) => `--dpkgopt=${o}`),
    ...recipe.customizeHooks.map((h) => `--customize-hook=${h}`),
    recipe.suite,
    rootfs,
    // Always an explicit mirror: with none, mmdebstrap reads sources from stdin when stdin is not a TTY.
    sourcesFile,
  ];
}

async function runMmdebstrap(recipe: BaseRecipe, rootfs: string, sourcesFile: string, logFile: string, hooks: BuildHooks): Promise<void> {
  const args = mmdebstrapArgs(recipe, rootfs, sourcesFile);
  // setpriv --pdeathsig: if this process dies, mmdebstrap gets SIGTERM and unmounts what it
  // mounted in the tree, instead of building on as an orphan nobody waits for.
  const setpriv = existsSync('/usr/bin/setpriv') ? ['/usr/bin/setpriv', '--pdeathsig', 'TERM', '--'] : [];
  const [cmd, ...cmdArgs] = [...setpriv, 'mmdebstrap', ...args] as [string, ...string[]];
  const log = createWriteStream(logFile);
  log.write(`$ mmdebstrap ${args.map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`)).join(' ')}\n`);
  const tail: string[] = [];
  let step = '';
  const onLine = (line: string) => {
    log.write(line + '\n');
    if (!line.trim()) return;
    tail.push(line);
    if (tail.length > TAIL_LINES) tail.shift();
    if (line.startsWith('I: ')) {
      step = line.slice(3).replace(/^running --customize-hook in shell: .*$/, 'running customize hooks');
      hooks.onStep?.(step);
    } else {
      const m = /^(?:Unpacking|Setting up|Preparing to unpack \S*?)\s*([a-z0-9][a-z0-9+.-]+)/.exec(line);
      if (m && step) hooks.onStep?.(step, m[1]);
    }
  };
  const code = await runLogged(cmd, cmdArgs, {
    // No stdin at all: see the explicit mirror above.
    env: { ...process.env, LC_ALL: 'C', DEBIAN_FRONTEND: 'noninteractive', DEBCONF_NONINTERACTIVE_SEEN: 'true' },
    onLine, signal: hooks.signal, killSignal: 'SIGTERM',
    onSpawnError: (err) => err.code === 'ENOENT'
      ? new ImageBuildError('mmdebstrap is not installed: run `bash scripts/setup.sh` (or apt-get install mmdebstrap)')
      : err,
  });
  await new Promise<void>((resolve) => log.end(resolve));
  if (hooks.signal?.aborted) throw new ImageBuildError('image build aborted', tail);
  if (code !== 0) throw new ImageBuildError(`mmdebstrap failed (exit ${code})`, tail);
}

/** Applies the recipe's post-steps. Files are written fresh (a symlink such as /etc/resolv.conf is replaced). */
export async function applyPostSteps(rootfs: string, steps: readonly PostStep[]): Promise<void> {
  for (const step of steps) {
    const target = path.join(rootfs, step.path);
    if (step.kind === 'dir') {
      await mkdir(target, { recursive: true });
      await chmod(target, step.mode);
    } else {
      await mkdir(path.dirname(target), { recursive: true });
      try {
        if ((await lstat(target)).isSymbolicLink()) await unlink(target);
      } catch {
        /* absent */
      }
      await writeFile(target, step.content, { mode: step.mode });
      await chmod(target, step.mode);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Agent layer

export interface AgentFile {
  /** Relative to agentDir, '/'-separated. */
  rel: string;
  abs: string;
}

/**
 * Every *.py under agentDir and the data files the agent reads (*.json: podflare_protocol.json, the
 * generated protocol document), skipping tests/, caches and hidden directories, in a stable order.
 */
export async function listAgentFiles(agentDir: string): Promise<AgentFile[]> {
  const out: AgentFile[] = [];
  const walk = async (dir: string, rel: string) => {
    const entries = await readdir(dir, { withFileTypes: true });
    for (const e of entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))) {
      const childRel = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) {
        if (e.name === 'tests' || e.name === 'test' || e.name === '__pycache__' || e.name.startsWith('.')) continue;
        await walk(path.join(dir, e.name), childRel);
      } else if (e.isFile() && isAgentFileName(e.name)) {
        out.push({ rel: childRel, abs: path.join(dir, e.name) });
      }
    }
  };
  await walk(agentDir, '');
  return out;
}

/** A module of the agent (not a test) or a JSON document it reads. */
function isAgentFileName(name: string): boolean {
  if (name.endsWith('.json')) return true;
  return name.endsWith('.py') && !/^test_.*\.py$|_test\.py$/.test(name);
}

/**
 * The agent layer's hash: the builder version, the Python cache tag the files are compiled for,
 * and every file's path and content.
 */
export async function agentHash(files: AgentFile[], pythonTag: string): Promise<string> {
  const h = createHash('sha256');
  h.update(canonicalJson({ builderVersion: IMAGE_BUILDER_VERSION, pythonTag, files: files.map((f) => f.rel) }));
  for (const f of files) {
    h.update(`\0${f.rel}\0`);
    h.update(await readFile(f.abs));
  }
  return h.digest('hex').slice(0, 12);
}

/** The base's Python as `python3.11`, from its /usr/lib; '' if there is none. */
export async function basePythonTag(rootfs: string): Promise<string> {
  try {
    const names = (await readdir(path.join(rootfs, 'usr/lib'))).filter((n) => /^python3\.\d+$/.test(n));
    return names.sort((a, b) => Number(b.split('.')[1]) - Number(a.split('.')[1]))[0] ?? '';
  } catch {
    return '';
  }
}

export const AGENT_MOUNT = '/opt/podflare';

/**
 * Builds <imagesDir>/agent-<hash>/opt/podflare/ from agentDir's files and byte-compiles the *.py
 * with the base's own interpreter (run under bubblewrap with the base as its root), so a fresh
 * sandbox imports the agent without compiling it. Compilation is an optimisation: if it fails the
 * layer is still built, just without __pycache__.
 */
export async function buildAgent(imagesDir: string, agentDir: string, baseRootfs: string, hooks: BuildHooks & { replace?: boolean } = {}): Promise<{ dir: string; hash: string }> {
  const files = await listAgentFiles(agentDir);
  if (files.length === 0) throw new ImageBuildError(`no *.py files in the agent directory ${agentDir}`);
  const pythonTag = await basePythonTag(baseRootfs);
  const hash = await agentHash(files, pythonTag);
  const target = agentLayerDir(imagesDir, hash);
  if (!hooks.replace && (await isDir(target))) return { dir: target, hash };
  const tmp = tempName(imagesDir, 'agent', hash);
  const dest = path.join(tmp, AGENT_MOUNT);
  try {
    for (const f of files) {
      const to = path.join(dest, f.rel);
      await mkdir(path.dirname(to), { recursive: true });
      await copyFile(f.abs, to);
      await chmod(to, 0o644);
    }
    await chmodTree(tmp, 0o755);
    if (pythonTag) await compileAgent(baseRootfs, dest, pythonTag, hooks);
    if (hooks.replace && (await isDir(target))) await rename(target, path.join(imagesDir, `.trash-agent-${hash}-${Date.now()}`));
    await rename(tmp, target).catch(async (err: NodeJS.ErrnoException) => {
      if ((err.code === 'ENOTEMPTY' || err.code === 'EEXIST') && (await isDir(target))) return removeTree(tmp);
      throw err;
    });
    return { dir: target, hash };
  } catch (err) {
    await removeTree(tmp).catch(() => undefined);
    throw err;
  }
}

/** Directories of the layer get `mode`; they become directories of every sandbox's root. */
async function chmodTree(dir: string, mode: number): Promise<void> {
  await chmod(dir, mode);
  for (const e of await readdir(dir, { withFileTypes: true })) {
    if (e.isDirectory()) await chmodTree(path.join(dir, e.name), mode);
  }
}

async function compileAgent(baseRootfs: string, dest: string, pythonTag: string, hooks: BuildHooks): Promise<void> {
  // checked-hash: the .pyc stays valid whatever the files' mtimes become (copies, ext4 images).
  const res = await execQuiet(
    'bwrap',
    [
      '--unshare-all', '--die-with-parent',
      '--ro-bind', baseRootfs, '/',
      '--dev', '/dev', '--proc', '/proc',
      '--tmpfs', '/tmp',
      '--bind', dest, '/tmp/agent',
      '--setenv', 'PATH', '/usr/bin:/bin',
      '--chdir', '/tmp/agent',
      `/usr/bin/${pythonTag}`, '-m', 'compileall', '-q', '-j', '1',
      '--invalidation-mode', 'checked-hash',
      '-s', '/tmp/agent', '-p', AGENT_MOUNT,
      '/tmp/agent',
    ],
    30_000,
  );
  if (res.code !== 0) {
    hooks.log?.(`agent byte-compilation skipped (${(res.stderr || res.stdout).trim().split('\n').slice(-3).join(' | ') || `exit ${res.code}`})`);
  }
}
