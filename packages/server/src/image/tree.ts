/**
 * File-tree helpers for image directories, written for trees that may still have things mounted
 * in them. mmdebstrap --mode=root mounts /proc, /sys and device nodes inside the tree while it
 * builds; if it is killed, those mounts stay. A plain recursive delete would then walk into the
 * host's /sys or /dev, so every delete here first unmounts what is under the tree and then runs
 * `rm --one-file-system`, which refuses to cross into any other file system it meets.
 */
import { execFile } from 'node:child_process';
import { readFile, readdir, readlink, stat } from 'node:fs/promises';
import path from 'node:path';

function exec(cmd: string, args: string[], timeoutMs = 120_000): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: timeoutMs, maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? ((err as { code: number }).code) : 127) : 0;
      resolve({ code, stdout: String(stdout), stderr: String(stderr) || (err && code === 127 ? err.message : '') });
    });
  });
}

/** mountinfo escapes space, tab, newline and backslash as octal. */
function unescapeMountPath(p: string): string {
  return p.replace(/\\([0-7]{3})/g, (_m, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

function isUnder(p: string, dir: string): boolean {
  return p === dir || p.startsWith(dir.endsWith('/') ? dir : `${dir}/`);
}

/** Mount points of this process's mount namespace at or under `dir`, deepest first. */
export async function mountsUnder(dir: string): Promise<string[]> {
  const abs = path.resolve(dir);
  let text: string;
  try {
    text = await readFile('/proc/self/mountinfo', 'utf8');
  } catch {
    return [];
  }
  const points = text
    .split('\n')
    .map((line) => line.split(' ')[4])
    .filter((p): p is string => Boolean(p))
    .map(unescapeMountPath)
    .filter((p) => isUnder(p, abs));
  return [...new Set(points)].sort((a, b) => b.length - a.length);
}

/**
 * Deletes `dir` recursively without ever leaving its file system. Leftover mounts inside it are
 * lazily unmounted first; if one cannot be, nothing is deleted and this throws.
 */
export async function removeTree(dir: string): Promise<void> {
  const abs = path.resolve(dir);
  if (abs === '/' || abs.split('/').filter(Boolean).length < 2) throw new Error(`refusing to delete ${abs}`);
  for (const mp of await mountsUnder(abs)) {
    await exec('umount', ['-l', '--', mp]);
  }
  const left = await mountsUnder(abs);
  if (left.length) throw new Error(`cannot delete ${abs}: still mounted: ${left.join(', ')}`);
  const res = await exec('rm', ['-rf', '--one-file-system', '--', abs], 600_000);
  if (res.code !== 0) throw new Error(`rm -rf ${abs} failed: ${res.stderr.trim()}`);
}

/**
 * Whether any process on the machine has a mount that names `dir` (as mount point, source or in
 * its options, e.g. an overlay's lowerdir). Sandboxes live in their own mount namespaces, so every
 * namespace is read once through a process in it. Best effort: a namespace whose mounts were set
 * up through /proc/self/fd paths would not show the directory's name.
 */
export async function pathInUse(dir: string): Promise<boolean> {
  const abs = path.resolve(dir);
  const needles = [`${abs} `, `${abs}/`, `${abs}:`, `${abs},`, `${abs}\n`];
  const seen = new Set<string>();
  let pids: string[];
  try {
    pids = (await readdir('/proc')).filter((n) => /^\d+$/.test(n));
  } catch {
    return false;
  }
  for (const pid of ['self', ...pids]) {
    try {
      const ns = await readlink(`/proc/${pid}/ns/mnt`);
      if (seen.has(ns)) continue;
      seen.add(ns);
      const text = (await readFile(`/proc/${pid}/mountinfo`, 'utf8')) + '\n';
      if (needles.some((n) => text.includes(n))) return true;
    } catch {
      /* the process ended, or is not ours to read */
    }
  }
  return false;
}

/**
 * Processes working in `dir`: their root or cwd is inside it (dpkg chrooted by mmdebstrap), or
 * their command line names it (mmdebstrap itself). A killed build's children can outlive it for a
 * while; its tree must not be deleted under them.
 */
export async function processesUsing(dir: string): Promise<number[]> {
  const abs = path.resolve(dir);
  const out: number[] = [];
  let pids: string[];
  try {
    pids = (await readdir('/proc')).filter((n) => /^\d+$/.test(n) && Number(n) !== process.pid);
  } catch {
    return out;
  }
  for (const pid of pids) {
    try {
      const links = await Promise.all(['root', 'cwd'].map((l) => readlink(`/proc/${pid}/${l}`).catch(() => '')));
      const cmdline = (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0');
      if (links.some((l) => l && isUnder(l, abs)) || cmdline.some((a) => a.includes(abs))) out.push(Number(pid));
    } catch {
      /* gone */
    }
  }
  return out;
}

/** Disk usage of a tree in bytes (`du -sx`), or undefined if du fails. */
export async function treeSize(dir: string): Promise<number | undefined> {
  const res = await exec('du', ['-sx', '--block-size=1', '--', dir], 300_000);
  const n = Number(res.stdout.split(/\s/)[0]);
  return res.code === 0 && Number.isFinite(n) ? n : undefined;
}

export function formatBytes(n: number | undefined): string {
  if (n === undefined) return '?';
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

export async function isDir(p: string): Promise<boolean> {
  try {
    return (await stat(p)).isDirectory();
  } catch {
    return false;
  }
}

export { exec as execQuiet };
