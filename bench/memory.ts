/**
 * Memory of idle pooled sandboxes, seen from the host. The pool is internal to the server, so the
 * sandboxes are found from /proc: each one is a `bwrap` child of this process (the server runs
 * in-process) with its descendants (the sandbox's init, the agent's supervisor and worker), plus the
 * `slirp4netns` child of this process attached to it (its arguments name a pid of that tree).
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

interface Proc { pid: number; ppid: number; comm: string; args: string[] }

async function processes(): Promise<Proc[]> {
  const out: Proc[] = [];
  for (const name of await readdir('/proc')) {
    const pid = Number(name);
    if (!Number.isInteger(pid)) continue;
    try {
      const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
      const open = stat.indexOf('(');
      const close = stat.lastIndexOf(')');
      const comm = stat.slice(open + 1, close);
      const ppid = Number(stat.slice(close + 2).split(' ')[1]);
      const args = (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0').filter(Boolean);
      out.push({ pid, ppid, comm, args });
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

/** Every sandbox (bwrap tree + its slirp4netns) started by this process, with its summed PSS. */
export async function sandboxMemory(parentPid = process.pid): Promise<SandboxMemory[]> {
  const procs = await processes();
  const children = new Map<number, Proc[]>();
  for (const p of procs) {
    const list = children.get(p.ppid) ?? [];
    list.push(p);
    children.set(p.ppid, list);
  }
  const mine = children.get(parentPid) ?? [];
  const slirps = mine.filter((p) => p.comm === 'slirp4netns');
  const result: SandboxMemory[] = [];
  for (const b of mine.filter((p) => p.comm === 'bwrap')) {
    const pids: number[] = [];
    const queue = [b.pid];
    while (queue.length) {
      const pid = queue.shift()!;
      pids.push(pid);
      for (const c of children.get(pid) ?? []) queue.push(c.pid);
    }
    const tree = new Set(pids.map(String));
    const slirp = slirps.find((s) => s.args.some((a) => tree.has(a) || tree.has(/^--userns-path=\/proc\/(\d+)\//.exec(a)?.[1] ?? '')));
    let pss = 0;
    for (const pid of pids) pss += await pssBytes(pid);
    if (slirp) pss += await pssBytes(slirp.pid);
    result.push({ bwrapPid: b.pid, pids, slirpPid: slirp?.pid ?? null, pssBytes: pss });
  }
  return result;
}
