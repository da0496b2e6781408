/**
 * Builds a template's layer: the upper directory of an overlay over the default base, in which
 * apt-get, pip, the file copies and the setup script ran (chrooted). Sandboxes then mount it as
 * one more lower layer between the agent layer and the base, so a template costs only what it
 * adds on disk, and the base's files (the interpreter, numpy…) stay the same inodes, shared in the
 * page cache by every template's sandboxes.
 *
 * Everything that is mounted for the build (the overlay, /proc, a small /dev, the inputs) is
 * mounted in a private mount namespace (`unshare --mount`) that dies with the build: nothing
 * appears in the host's mount table, and the temporary directory the host later removes holds
 * plain files only. The layer is built in `.tmp-tpl-*` and renamed to `tpl-<hash>` when every
 * step succeeded: a failed build (an unknown package, a failing setup script) leaves nothing but
 * its log (`tpl-<hash>.failed.log`).
 *
 *   <imagesDir>/tpl-<hash>/layer/          the upper directory (files, whiteouts) = overlay lower
 *   <imagesDir>/tpl-<hash>/template.json   the recipe and the base it was built on
 *   <imagesDir>/tpl-<hash>/build.log
 */
import { createWriteStream, existsSync } from 'node:fs';
import { chmod, copyFile, cp, mkdir, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { ImageBuildError, tempName, type BuildHooks } from './build.js';
import type { TemplateRecipe } from './template-recipe.js';
import { isDir, removeTree } from './tree.js';
import { runLogged } from './run-logged.js';

export function templateLayerDir(imagesDir: string, hash: string): string {
  return path.join(imagesDir, `tpl-${hash}`);
}

const TAIL_LINES = 40;

/**
 * The build, as one bash script run in a private mount namespace. Inputs come in environment
 * variables (paths only; the recipe's strings are in files under $PF_INPUTS, never in the
 * script's text). Lines starting with `==> ` are steps (the progress shown).
 */
const BUILD_SCRIPT = String.raw`
set -euo pipefail
M="$PF_MERGED"
# metacopy and redirects off: the upper must hold whole files and directories, since it is used
# later as a lower layer under other mount options.
mount -t overlay overlay -o "lowerdir=$PF_BASE,upperdir=$PF_UPPER,workdir=$PF_WORK,metacopy=off,redirect_dir=off,index=off" "$M"
mount -t proc proc "$M/proc"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$M/dev"
for d in null zero full random urandom tty; do touch "$M/dev/$d"; mount --bind "/dev/$d" "$M/dev/$d"; done
ln -s /proc/self/fd "$M/dev/fd"; ln -s /proc/self/fd/0 "$M/dev/stdin"; ln -s /proc/self/fd/1 "$M/dev/stdout"; ln -s /proc/self/fd/2 "$M/dev/stderr"
mkdir "$M/dev/shm" "$M/dev/pts"; mount -t tmpfs -o mode=1777 tmpfs "$M/dev/shm"
mount -t tmpfs -o mode=1777 tmpfs "$M/tmp"
mkdir "$M/tmp/pf-build"; mount --bind "$PF_INPUTS" "$M/tmp/pf-build"; mount -o remount,bind,ro "$M/tmp/pf-build"
# The image's resolv.conf names the sandboxes' DNS; the build resolves like the host.
mount --bind /etc/resolv.conf "$M/etc/resolv.conf"
in_image() { chroot "$M" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore "$@"; }
if [ -s "$PF_INPUTS/apt.txt" ]; then
  echo "==> apt-get update"
  in_image apt-get update -q -o APT::Update::Error-Mode=any
  echo "==> apt-get install $(paste -sd ' ' "$PF_INPUTS/apt.txt")"
  # shellcheck disable=SC2046
  in_image apt-get install -y -q --no-install-recommends $(cat "$PF_INPUTS/apt.txt")
  in_image apt-get clean
  find "$M/var/lib/apt/lists" -maxdepth 1 -type f ! -name lock -delete
fi
if [ -s "$PF_INPUTS/requirements.txt" ]; then
  echo "==> pip install $(paste -sd ' ' "$PF_INPUTS/requirements.txt")"
  src=()
  if [ -d "$PF_INPUTS/wheels" ]; then src+=(--find-links /tmp/pf-build/wheels); fi
  if [ -n "$PF_PIP_INDEX_URL" ]; then src+=(--index-url "$PF_PIP_INDEX_URL"); else src+=(--no-index); fi
  in_image python3 -m pip install --no-cache-dir --break-system-packages "${"$"}{src[@]}" -r /tmp/pf-build/requirements.txt
fi
if [ -s "$PF_INPUTS/files.txt" ]; then
  echo "==> copying files"
  i=0
  while IFS= read -r dest; do
    in_image mkdir -p "$(dirname "$dest")"
    in_image cp -R --preserve=mode,timestamps "/tmp/pf-build/files/$i" "$dest"
    i=$((i + 1))
  done < "$PF_INPUTS/files.txt"
fi
if [ -f "$PF_INPUTS/setup.sh" ]; then
  echo "==> setup script"
  chroot "$M" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    DEBIAN_FRONTEND=noninteractive sh -c 'cd /root && exec bash -euo pipefail /tmp/pf-build/setup.sh'
fi
echo "==> cleaning up"
# Only what the build added: removing anything of the base's would leave a whiteout hiding it
# (the base's /root/.cache holds matplotlib's font cache).
rm -rf "$M/root/.cache/pip" "$M/var/log/apt"
rm -f "$M"/var/cache/debconf/*-old "$M"/var/lib/dpkg/*-old
umount -R "$M"
`;

/**
 * Builds the layer of `recipe` over `baseRootfs` and renames it to <imagesDir>/tpl-<hash>.
 * Returns the layer directory. Idempotent: an existing tpl-<hash> is returned as it is.
 */
export async function buildTemplateLayer(
  imagesDir: string,
  base: { rootfs: string; hash: string },
  recipe: TemplateRecipe,
  hash: string,
  hooks: BuildHooks = {},
): Promise<string> {
  const target = templateLayerDir(imagesDir, hash);
  if (await isDir(path.join(target, 'layer'))) return path.join(target, 'layer');
  if (process.getuid?.() !== 0) throw new ImageBuildError('building a template needs root (it installs packages into an image): run it with sudo');
  const tmp = tempName(imagesDir, 'tpl', hash);
  const dirs = { upper: path.join(tmp, 'layer'), work: path.join(tmp, 'work'), merged: path.join(tmp, 'merged'), inputs: path.join(tmp, 'inputs') };
  const logFile = path.join(tmp, 'build.log');
  await mkdir(tmp, { recursive: true });
  try {
    await Promise.all(Object.values(dirs).map((d) => mkdir(d)));
    await chmod(dirs.upper, 0o755);
    await writeInputs(dirs.inputs, recipe);
    hooks.log?.(`building template ${recipe.name} (tpl-${hash}) over ${base.rootfs}`);
    await runBuild(dirs, base.rootfs, recipe, logFile, hooks);
    await rm(dirs.work, { recursive: true, force: true });
    await rm(dirs.inputs, { recursive: true, force: true });
    await rm(dirs.merged, { recursive: true, force: true });
    const about = { hash, baseHash: base.hash, base: base.rootfs, builtAt: new Date().toISOString(), recipe };
    await writeFile(path.join(tmp, 'template.json'), JSON.stringify(about, null, 2) + '\n');
    await rename(tmp, target).catch(async (err: NodeJS.ErrnoException) => {
      // Another process built the same layer meanwhile: theirs is as good.
      if ((err.code === 'ENOTEMPTY' || err.code === 'EEXIST') && (await isDir(target))) return removeTree(tmp);
      throw err;
    });
    return path.join(target, 'layer');
  } catch (err) {
    const kept = path.join(imagesDir, `tpl-${hash}.failed.log`);
    await copyFile(logFile, kept).catch(() => undefined);
    await removeTree(tmp).catch((e: Error) => hooks.log?.(`could not remove ${tmp}: ${e.message}`));
    if (err instanceof ImageBuildError) throw new ImageBuildError(err.message.split('\n')[0]!, err.outputTail, existsSync(kept) ? kept : undefined);
    throw new ImageBuildError(`building template ${recipe.name} failed: ${(err as Error).message}`, [], existsSync(kept) ? kept : undefined);
  }
}

/** The recipe's inputs as files the build script reads (bound read-only into the image). */
async function writeInputs(dir: string, recipe: TemplateRecipe): Promise<void> {
  if (recipe.apt.length) await writeFile(path.join(dir, 'apt.txt'), recipe.apt.join('\n') + '\n');
  if (recipe.pip.length) await writeFile(path.join(dir, 'requirements.txt'), recipe.pip.join('\n') + '\n');
  if (recipe.pipFindLinks) await cp(recipe.pipFindLinks, path.join(dir, 'wheels'), { recursive: true });
  if (recipe.files.length) {
    await mkdir(path.join(dir, 'files'));
    for (const [i, f] of recipe.files.entries()) await cp(f.src, path.join(dir, 'files', String(i)), { recursive: true });
    await writeFile(path.join(dir, 'files.txt'), recipe.files.map((f) => f.dest).join('\n') + '\n');
  }
  if (recipe.setup !== undefined) await writeFile(path.join(dir, 'setup.sh'), recipe.setup + '\n', { mode: 0o755 });
  // The chroot reads them as root; the host's umask must not hide them.
  await chmod(dir, 0o755);
}

async function runBuild(
  dirs: { upper: string; work: string; merged: string; inputs: string },
  baseRootfs: string,
  recipe: TemplateRecipe,
  logFile: string,
  hooks: BuildHooks,
): Promise<void> {
  const log = createWriteStream(logFile);
  const tail: string[] = [];
  let step = '';
  const onLine = (line: string) => {
    log.write(line + '\n');
    if (!line.trim()) return;
    tail.push(line);
    if (tail.length > TAIL_LINES) tail.shift();
    if (line.startsWith('==> ')) {
      step = line.slice(4);
      hooks.onStep?.(step);
    } else {
      const m = /^(?:Unpacking|Setting up|Get:\d+ \S+ \S+ \S+)\s*([a-z0-9][a-z0-9+.-]+)/.exec(line);
      if (m && step) hooks.onStep?.(step, m[1]);
    }
  };
  // setpriv --pdeathsig: if the server dies, the build dies too (and its namespace, mounts and all).
  const setpriv = existsSync('/usr/bin/setpriv') ? ['/usr/bin/setpriv', '--pdeathsig', 'KILL', '--'] : [];
  const [cmd, ...args] = [...setpriv, 'unshare', '--mount', '--propagation', 'private', '--', 'bash', '-c', BUILD_SCRIPT] as unknown as
    [string, ...string[]];
  const code = await runLogged(cmd, args, {
    env: {
      PATH: '/usr/sbin:/usr/bin:/sbin:/bin', LC_ALL: 'C',
      PF_MERGED: dirs.merged, PF_BASE: baseRootfs, PF_UPPER: dirs.upper, PF_WORK: dirs.work, PF_INPUTS: dirs.inputs,
      PF_PIP_INDEX_URL: recipe.pipIndexUrl ?? '',
    },
    onLine, signal: hooks.signal, killSignal: 'SIGKILL',
  });
  await new Promise<void>((resolve) => log.end(resolve));
  if (hooks.signal?.aborted) throw new ImageBuildError(`building template ${recipe.name} aborted`, tail);
  if (code !== 0) throw new ImageBuildError(`building template ${recipe.name} failed at "${step || 'setting up the build'}" (exit ${code})`, tail);
}
