/** Small helpers over child processes and /proc, shared by the runtimes. */
import { execFile } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { readFile, readdir } from 'node:fs/promises';

/** Runs a command to completion; rejects with its stderr when it fails. */
export function run(cmd: string, args: string[], opts: { timeoutMs?: number } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: opts.timeoutMs ?? 30_000, maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} ${args.join(' ')} failed: ${String(stderr).trim() || err.message}`));
      else resolve(String(stdout));
    });
  });
}

/** Every descendant of `root` (and root itself); with `maxDepth`, those at most that many generations below it. */
export async function processTree(root: number, maxDepth = Infinity): Promise<number[]> {
  try {
    return await processTreeFromChildren(root, maxDepth);
  } catch {
    return processTreeFromScan(root, maxDepth);
  }
}

/**
 * Walks /proc/<pid>/task/<tid>/children (a few reads instead of one per process on the host).
 * Synchronous reads: procfs answers from memory in microseconds, and this sits on the fork path,
 * where each thread-pool hop of an asynchronous read would cost more than the read itself.
 */
async function processTreeFromChildren(root: number, maxDepth: number): Promise<number[]> {
  const out: number[] = [];
  const queue: Array<[number, number]> = [[root, 0]];
  while (queue.length) {
    const [pid, depth] = queue.shift()!;
    out.push(pid);
    if (depth >= maxDepth) continue;
    let tasks: string[];
    try {
      tasks = readdirSync(`/proc/${pid}/task`);
    } catch {
      continue; // ended meanwhile
    }
    for (const tid of tasks) {
      let text = '';
      try {
        text = readFileSync(`/proc/${pid}/task/${tid}/children`, 'utf8');
      } catch { /* ended meanwhile */ }
      for (const child of text.split(' ')) if (child.trim()) queue.push([Number(child), depth + 1]);
    }
  }
  return out;
}

/** The same from every process's parent link, where the kernel has no children files. */
async function processTreeFromScan(root: number, maxDepth: number): Promise<number[]> {
  const parents = new Map<number, number[]>();
  for (const name of await readdir('/proc')) {
    const pid = Number(name);
    if (!Number.isInteger(pid)) continue;
    try {
      const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
      // The command name may contain spaces and parentheses: fields start after the last ')'.
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      const list = parents.get(ppid) ?? [];
      list.push(pid);
      parents.set(ppid, list);
    } catch { /* the process ended meanwhile */ }
  }
  const out: number[] = [];
  const queue: Array<[number, number]> = [[root, 0]];
  while (queue.length) {
    const [pid, depth] = queue.shift()!;
    out.push(pid);
    if (depth < maxDepth) queue.push(...(parents.get(pid) ?? []).map((c): [number, number] => [c, depth + 1]));
  }
  return out;
}

/** Sum of the processes' PSS (kernel smaps_rollup), in bytes. */
export async function pssOf(pids: number[]): Promise<number> {
  let kb = 0;
  for (const pid of pids) {
    try {
      const rollup = await readFile(`/proc/${pid}/smaps_rollup`, 'utf8');
      const m = /^Pss:\s+(\d+) kB/m.exec(rollup);
      if (m) kb += Number(m[1]);
    } catch { /* gone */ }
  }
  return kb * 1024;
}

/** Whether a process exists (EPERM: it does, but belongs to someone else). */
export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
