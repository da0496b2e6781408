/**
 * What a namespace server killed with SIGKILL leaves behind, and how the next server on the same
 * state directory removes it.
 *
 * Live sandboxes under their holders are adopted first (holder.ts, adopt.ts) and are left alone
 * here (`adopted`); this removes what is left of the others. What can be left:
 * - processes: sandboxes still dying, or whose holder was killed: bwrap (its command line names
 *   the sandbox's root under the state directory),
 *   the agent and everything it started (their environment carries PODFLARE_SANDBOX_ID);
 *   slirp4netns attached to one of them (it exits once its exit pipe to the server closes, but may
 *   lag); the host helper, if it was busy copying a layer (it exits at the end of its stdin), and
 *   the short-lived helper that opens egress listeners in a sandbox's network namespace;
 * - host mounts: a sandbox's overlay is mounted on the host between its start and its agent's hello;
 * - files: every sandbox's directory (upper layer, work dir; a btrfs subvolume on the disk volume)
 *   and the fork layers. (Cgroups are the runtime's to remove, before this runs.)
 * Processes are killed first (so nothing writes while files go), then mounts, then files.
 */
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { SANDBOX_ID_PATTERN, SANDBOX_ID_SOURCE } from '@podflare/protocol/sandbox';
import { run } from '../../proc.js';
import { sandboxesDir, trashDir } from './layout.js';
import { CMDLINE_READ_CAP, readProcHead } from './proc-read.js';

export interface LeftoverReport {
  /** Sandbox ids with anything left (a directory, a process or a mount). */
  sandboxes: string[];
  /** Processes killed (pid and the start of their command line). */
  killed: string[];
  unmounted: string[];
  /** Directories removed: sandboxes' and fork layers. */
  removed: string[];
}

interface ProcInfo {
  pid: number;
  ppid: number;
  cmdline: string[];
}

/** Far more than the server gives a sandbox's processes. */
const ENVIRON_READ_CAP = 256 * 1024;
const SANDBOX_ID_ENV = new RegExp(`(?:^|\\0)PODFLARE_SANDBOX_ID=(${SANDBOX_ID_SOURCE})(?:\\0|$)`);
/** The server's own helper processes: they exit once the server is gone, but may lag behind. */
const HELPERS = ['/podflare_hostd.py', '/netns-listen-child.js'];

/**
 * Kills, unmounts and removes everything the sandboxes of an earlier server on `stateDir` left.
 * `knownIds` are sandboxes the store still lists as live (their directories may already be gone).
 * `removeTree` removes one tree without following what a sandbox planted in it (the host helper's).
 */
export async function removeLeftovers(
  stateDir: string, layersDir: string, knownIds: Iterable<string>, removeTree: (tree: string) => Promise<void>,
  adopted: ReadonlySet<string> = new Set(),
): Promise<LeftoverReport> {
  const root = sandboxesDir(stateDir);
  // Everything in the sandboxes' directory is a sandbox's, or the fork layers (`.layers`); what
  // an adopted sandbox has is its own again, and stays.
  const onDisk = (await readdir(root).catch(() => [] as string[])).filter((name) => !adopted.has(name));
  const ids = new Set([...knownIds, ...onDisk.filter((name) => SANDBOX_ID_PATTERN.test(name))]);
  const report: LeftoverReport = { sandboxes: [], killed: [], unmounted: [], removed: [] };
  const touched = new Set<string>(onDisk.filter((name) => ids.has(name)));

  const victims = await leftoverProcesses(root, ids, touched, adopted);
  for (const p of victims) {
    try {
      process.kill(p.pid, 'SIGKILL');
      report.killed.push(`${p.pid} ${p.cmdline.join(' ').slice(0, 120)}`);
    } catch { /* gone already */ }
  }
  await waitGone(victims.map((p) => p.pid), 10_000);

  // Deepest first, so a mount below another comes off before it.
  const mounts = (await readFile('/proc/self/mountinfo', 'utf8')).split('\n')
    .map((line) => unescapeMount(line.split(' ')[4] ?? ''))
    .filter((m) => m.startsWith(root + '/') && !adopted.has(path.relative(root, m).split('/')[0]!))
    .sort((a, b) => b.length - a.length);
  for (const m of mounts) {
    await run('umount', ['-l', m]).catch(() => undefined);
    report.unmounted.push(m);
    touched.add(path.relative(root, m).split('/')[0]!);
  }

  // The layers' and trash directories stay (the runtime made them already); what is in them goes.
  const kept = new Set([layersDir, trashDir(stateDir)]);
  for (const name of onDisk) {
    const p = path.join(root, name);
    if (kept.has(p)) continue;
    await removeTree(p);
    report.removed.push(p);
  }
  for (const dir of kept) {
    for (const name of await readdir(dir).catch(() => [] as string[])) {
      await removeTree(path.join(dir, name));
      report.removed.push(path.join(dir, name));
    }
  }
  report.sandboxes = [...touched].filter((id) => ids.has(id)).sort();
  return report;
}

/**
 * One pass over the process table: bwrap of our sandboxes (by command line), every process of
 * theirs (by environment), slirp4netns attached to any of those, and host helpers whose server
 * is gone. Other servers' sandboxes on this host are left alone: their ids are not ours.
 */
async function leftoverProcesses(root: string, ids: Set<string>, touched: Set<string>, adopted: ReadonlySet<string>): Promise<ProcInfo[]> {
  const all = await processTable();
  const byPid = new Map(all.map((p) => [p.pid, p]));
  const victims = new Map<number, ProcInfo>();
  for (const p of all) {
    if (p.pid === process.pid) continue;
    const mentioned = p.cmdline.find((arg) => arg.startsWith(root + '/'));
    if (mentioned && adopted.has(path.relative(root, mentioned).split('/')[0]!)) continue;
    if (mentioned) {
      victims.set(p.pid, p);
      touched.add(path.relative(root, mentioned).split('/')[0]!);
      continue;
    }
    // Capped, like command lines: a sandbox's process sets its own (its cgroup catches it regardless).
    const environ = (await readProcHead(`/proc/${p.pid}/environ`, ENVIRON_READ_CAP).catch(() => null))?.text ?? '';
    const id = SANDBOX_ID_ENV.exec(environ)?.[1];
    if (id && ids.has(id)) {
      victims.set(p.pid, p);
      touched.add(id);
    }
  }
  for (const p of all) {
    if (basename(p.cmdline[0]) === 'slirp4netns') {
      // The last argument but one is the pid of the sandbox it serves.
      const target = Number(p.cmdline[p.cmdline.length - 2]);
      const orphaned = !isServer(byPid.get(p.ppid));
      if (victims.has(target) || (orphaned && !byPid.has(target))) victims.set(p.pid, p);
    } else if (p.cmdline.some((arg) => HELPERS.some((h) => arg.endsWith(h))) && !isServer(byPid.get(p.ppid))) {
      victims.set(p.pid, p);
    }
  }
  return [...victims.values()];
}

/** A host helper or slirp4netns is someone's only while its parent is a live Node server. */
function isServer(parent: ProcInfo | undefined): boolean {
  return !!parent && parent.pid !== 1 && /(^|\/)node(js)?$/.test(parent.cmdline[0] ?? '');
}

async function processTable(): Promise<ProcInfo[]> {
  const out: ProcInfo[] = [];
  for (const name of await readdir('/proc')) {
    const pid = Number(name);
    if (!Number.isInteger(pid)) continue;
    try {
      // The command line capped: a sandbox's process may have one of megabytes (its head is enough here).
      const [stat, { text: cmdline }] = await Promise.all([readFile(`/proc/${pid}/stat`, 'utf8'), readProcHead(`/proc/${pid}/cmdline`, CMDLINE_READ_CAP)]);
      // The command name may hold spaces and parentheses: fields start after the last ')'.
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (fields[0] === 'Z') continue;
      out.push({ pid, ppid: Number(fields[1]), cmdline: cmdline.split('\0').filter((a, i, arr) => a !== '' || i < arr.length - 1) });
    } catch { /* ended meanwhile */ }
  }
  return out;
}

/** Waits until none of `pids` is alive any more (zombies count as gone: their parent reaps). */
async function waitGone(pids: number[], timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let left = pids;
  while (left.length && Date.now() < deadline) {
    const still: number[] = [];
    for (const pid of left) {
      const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => null);
      if (stat && stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z') still.push(pid);
    }
    left = still;
    if (left.length) await new Promise((r) => setTimeout(r, 20));
  }
}

function basename(p: string | undefined): string {
  return p ? p.slice(p.lastIndexOf('/') + 1) : '';
}

/** mountinfo escapes space, tab, newline and backslash as octal. */
function unescapeMount(m: string): string {
  return m.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}
