/**
 * Memory of idle pooled sandboxes, seen from the host. The pool is internal to the server, so the
 * sandboxes are found from /proc: each one is a `bwrap` child of this process (the server runs
 * in-process) with its descendants (the sandbox's init, the agent's supervisor and worker), plus the
 * `slirp4netns` attached to it (started by the server's spawner; its arguments name a pid of that tree).
 * PSS comes from /proc/<pid>/smaps_rollup, so pages shared between sandboxes (the image's
 * libraries in the page cache) are split between them rather than counted once per sandbox.
 */
import { readFile, readdir } from 'node:fs/promises';

export interface SandboxMemory {
  bwrapPid: number;
  pids: number[];
  slirpPid: number | null;
  pssBytes: number;
}

/**
 * `state` is the one-letter state of /proc/<pid>/stat (Z: a zombie, ended but not reaped);
 * `cpuMs` its user + system CPU time so far (ended threads' included; 10 ms ticks).
 */
export interface Proc { pid: number; ppid: number; comm: string; state: string; args: string[]; cpuMs: number }

/** Every process on the host (pid, parent, command name, arguments). */
export async function processes(): Promise<Proc[]> {
  const out: Proc[] = [];
  for (const name of await readdir('/proc')) {
    const pid = Number(name);
    if (!Number.isInteger(pid)) continue;
    try {
      const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
      const open = stat.indexOf('(');
      const close = stat.lastIndexOf(')');
      const comm = stat.slice(open + 1, close);
      const fields = stat.slice(close + 2).split(' ');
      const ppid = Number(fields[1]);
      const cpuMs = (Number(fields[11]) + Number(fields[12])) * 10; // utime, stime (USER_HZ = 100)
      const args = (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0').filter(Boolean);
      out.push({ pid, ppid, comm, state: fields[0] ?? '?', args, cpuMs });
    } catch { /* ended meanwhile */ }
  }
  return out;
}

export async function pssBytes(pid: number): Promise<number> {
  try {
    const rollup = await readFile(`/proc/${pid}/smaps_rollup`, 'utf8');
    const m = /^Pss:\s+(\d+) kB/m.exec(rollup);
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}

export function childrenMap(procs: Proc[]): Map<number, Proc[]> {
  const children = new Map<number, Proc[]>();
  for (const p of procs) {
    const list = children.get(p.ppid) ?? [];
    list.push(p);
    children.set(p.ppid, list);
  }
  return children;
}

function treeOf(root: number, children: Map<number, Proc[]>): number[] {
  const pids: number[] = [];
  const queue = [root];
  while (queue.length) {
    const pid = queue.shift()!;
    pids.push(pid);
    for (const c of children.get(pid) ?? []) queue.push(c.pid);
  }
  return pids;
}

/** Every slirp4netns of the server in process `parentPid`: its spawner (a python3 child) starts them. */
export function spawnedSlirps(children: Map<number, Proc[]>, parentPid = process.pid): Proc[] {
  return (children.get(parentPid) ?? []).filter((p) => p.comm === 'python3')
    .flatMap((h) => children.get(h.pid) ?? []).filter((p) => p.comm === 'slirp4netns');
}

/** The slirp4netns processes attached to a pid of `tree` (their arguments name it). */
function slirpsOf(tree: Set<string>, slirps: Proc[]): Proc[] {
  return slirps.filter((s) => s.args.some((a) => tree.has(a) || tree.has(/^--userns-path=\/proc\/(\d+)\//.exec(a)?.[1] ?? '')));
}

/** Every sandbox (bwrap tree + its slirp4netns) started by this process, with its summed PSS. */
export async function sandboxMemory(parentPid = process.pid): Promise<SandboxMemory[]> {
  const children = childrenMap(await processes());
  const mine = children.get(parentPid) ?? [];
  const slirps = spawnedSlirps(children, parentPid);
  const result: SandboxMemory[] = [];
  for (const b of mine.filter((p) => p.comm === 'bwrap')) {
    const pids = treeOf(b.pid, children);
    const slirp = slirpsOf(new Set(pids.map(String)), slirps)[0];
    let pss = 0;
    for (const pid of pids) pss += await pssBytes(pid);
    if (slirp) pss += await pssBytes(slirp.pid);
    result.push({ bwrapPid: b.pid, pids, slirpPid: slirp?.pid ?? null, pssBytes: pss });
  }
  return result;
}

/** Number of processes below `parentPid` (sandboxes, their slirp4netns, the host helper). */
export async function descendantCount(parentPid = process.pid): Promise<number> {
  return treeOf(parentPid, childrenMap(await processes())).length - 1;
}

/**
 * The `bwrap` child of this process whose sandbox has the API id `sandboxId`: its agent (bwrap's
 * child) carries PODFLARE_SANDBOX_ID in its environment. Null when none does.
 */
export async function findSandboxBwrap(sandboxId: string, parentPid = process.pid): Promise<number | null> {
  const children = childrenMap(await processes());
  const needle = `PODFLARE_SANDBOX_ID=${sandboxId}\0`;
  for (const b of (children.get(parentPid) ?? []).filter((p) => p.comm === 'bwrap')) {
    for (const agent of children.get(b.pid) ?? []) {
      const environ = await readFile(`/proc/${agent.pid}/environ`, 'utf8').catch(() => '');
      if (environ.includes(needle)) return b.pid;
    }
  }
  return null;
}

export interface TreeMemory {
  /** Every process of the bwrap tree (fork children of the sandbox are nested in it), zombies excluded. */
  pids: number[];
  /** Zombies in the tree (ended, not reaped yet: no memory left to count). */
  zombies: number;
  treePssBytes: number;
  /** The slirp4netns processes (started by the server's spawner) attached to a pid of the tree. */
  slirpPids: number[];
  slirpPssBytes: number;
}

/**
 * Summed PSS of the whole process tree below a sandbox's bwrap, and of its slirp4netns apart.
 * Read again while the tree changes under the reading (a fork child starting its worker splits
 * its pages with a process a snapshot taken before would not count): the sum is of one set of
 * processes, all of them.
 */
export async function treeMemory(bwrapPid: number, parentPid = process.pid): Promise<TreeMemory> {
  const snapshot = async () => {
    const procs = await processes();
    const children = childrenMap(procs);
    const zombie = new Set(procs.filter((p) => p.state === 'Z').map((p) => p.pid));
    const all = treeOf(bwrapPid, children);
    const pids = all.filter((pid) => !zombie.has(pid));
    const slirps = slirpsOf(new Set(pids.map(String)), spawnedSlirps(children, parentPid)).map((p) => p.pid);
    return { pids, zombies: all.length - pids.length, slirps, key: [...pids, 0, ...slirps].join() };
  };
  let read: TreeMemory | null = null;
  for (let attempt = 0; attempt < 10; attempt++) {
    const before = await snapshot();
    let treePss = 0;
    for (const pid of before.pids) treePss += await pssBytes(pid);
    let slirpPss = 0;
    for (const pid of before.slirps) slirpPss += await pssBytes(pid);
    read = { pids: before.pids, zombies: before.zombies, treePssBytes: treePss, slirpPids: before.slirps, slirpPssBytes: slirpPss };
    if ((await snapshot()).key === before.key) break;
  }
  return read!;
}

/** Pid namespace levels of a process (NSpid in /proc/<pid>/status: its pid at every level). */
async function nsLevels(pid: number): Promise<number[]> {
  try {
    const m = /^NSpid:\s+(.+)$/m.exec(await readFile(`/proc/${pid}/status`, 'utf8'));
    return m ? m[1]!.trim().split(/\s+/).map(Number) : [];
  } catch {
    return [];
  }
}

export interface ZygoteMemory {
  /** Each sandbox forked from a zygote (PID 1 of a pid namespace nested in the zygote's), with its slirp4netns. */
  children: SandboxMemory[];
  /** The zygotes themselves (their own processes only), one per bwrap tree holding such children. */
  zygotes: SandboxMemory[];
  /** Sandboxes started by bwrap with no fork children (cold starts). */
  plain: SandboxMemory[];
}

/**
 * Like sandboxMemory, but a bwrap tree holding fork children (a zygote and the pooled sandboxes
 * forked from it) is split: each child on its own, the zygote apart.
 */
export async function sandboxMemoryByNamespace(parentPid = process.pid): Promise<ZygoteMemory> {
  const children = childrenMap(await processes());
  const slirps = spawnedSlirps(children, parentPid);
  const out: ZygoteMemory = { children: [], zygotes: [], plain: [] };
  const sum = async (root: number, pids: number[]) => {
    const slirp = slirpsOf(new Set(pids.map(String)), slirps)[0];
    let pss = 0;
    for (const pid of pids) pss += await pssBytes(pid);
    if (slirp) pss += await pssBytes(slirp.pid);
    return { bwrapPid: root, pids, slirpPid: slirp?.pid ?? null, pssBytes: pss };
  };
  for (const b of (children.get(parentPid) ?? []).filter((p) => p.comm === 'bwrap')) {
    const tree = treeOf(b.pid, children);
    const init = (children.get(b.pid) ?? [])[0]?.pid;
    const depth = init ? (await nsLevels(init)).length : 0;
    const roots: number[] = [];
    for (const pid of tree) {
      const levels = await nsLevels(pid);
      if (depth && levels.length === depth + 1 && levels[depth] === 1) roots.push(pid);
    }
    if (roots.length === 0) {
      out.plain.push(await sum(b.pid, tree));
      continue;
    }
    const inChildren = new Set<number>();
    for (const r of roots) {
      const pids = treeOf(r, children);
      pids.forEach((p) => inChildren.add(p));
      out.children.push(await sum(r, pids));
    }
    out.zygotes.push(await sum(b.pid, tree.filter((p) => !inChildren.has(p))));
  }
  return out;
}
