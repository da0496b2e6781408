/** What a sandbox can leave behind on the host: processes, overlay mounts, directories. */
import { readFileSync, readdirSync, existsSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import path from 'node:path';
import { SANDBOX_ID_SOURCE } from '@podflare/protocol/sandbox';

export function bwrapProcesses(): number[] {
  try {
    return execFileSync('pgrep', ['-x', 'bwrap'], { encoding: 'utf8' }).trim().split('\n').filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

export function overlayMountsUnder(dir: string): string[] {
  return readFileSync('/proc/self/mountinfo', 'utf8').split('\n')
    .map((l) => l.split(' ')[4] ?? '')
    .filter((m) => m.startsWith(dir));
}

/**
 * What is in the sandboxes' directory: sandboxes' directories, and whatever is in the runtime's
 * own fork layers' and trash directories there (those two may stay, empty).
 */
export function sandboxDirsIn(stateDir: string): string[] {
  const dir = `${stateDir}/sandboxes`;
  if (!existsSync(dir)) return [];
  const own = ['.layers', '.trash'];
  return readdirSync(dir).flatMap((name) => (own.includes(name) ? readdirSync(`${dir}/${name}`).map((n) => `${name}/${n}`) : [name]));
}

/** Processes whose command line mentions this state dir (bwrap, slirp4netns) — none may remain. */
export function processesMentioning(text: string): string[] {
  const out: string[] = [];
  for (const pid of readdirSync('/proc').filter((n) => /^\d+$/.test(n))) {
    try {
      const cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' ');
      if (cmd.includes(text)) out.push(`${pid}: ${cmd.slice(0, 200)}`);
    } catch { /* gone */ }
  }
  return out;
}

/**
 * Fork layers still on disk (none may outlive the sandboxes that use them): in the forking
 * sandbox's directory (`sandboxes/<id>/layers`), or where older versions kept them
 * (`sandboxes/.layers`, `layers`).
 */
export function forkLayersIn(stateDir: string): string[] {
  const list = (dir: string) => (existsSync(dir) ? readdirSync(dir).map((n) => `${dir}/${n}`) : []);
  const sandboxes = `${stateDir}/sandboxes`;
  const own = existsSync(sandboxes) ? readdirSync(sandboxes).filter((n) => !n.startsWith('.')).flatMap((id) => list(`${sandboxes}/${id}/layers`)) : [];
  return [...list(`${stateDir}/layers`), ...list(`${sandboxes}/.layers`), ...own].map((p) => path.relative(stateDir, p));
}

export interface ProcessStamp {
  pid: number;
  /** Start time in clock ticks since boot: with the pid, names one process even if pids are reused. */
  started: string;
  cmd: string;
}

function stamp(pid: number): ProcessStamp | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (fields[0] === 'Z') return null; // a zombie holds nothing but its pid
    return { pid, started: fields[19]!, cmd: readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' ').trim().slice(0, 160) };
  } catch {
    return null;
  }
}

function allPids(): number[] {
  return readdirSync('/proc').filter((n) => /^\d+$/.test(n)).map(Number);
}

/**
 * Every process of these sandboxes (their environment carries PODFLARE_SANDBOX_ID) and every
 * process the server `serverPid` started itself (bwrap, slirp4netns, the host helper).
 */
export function processesOf(ids: string[], serverPid?: number): ProcessStamp[] {
  const wanted = new Set(ids);
  const out: ProcessStamp[] = [];
  for (const pid of allPids()) {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      const env = readFileSync(`/proc/${pid}/environ`, 'latin1');
      const id = new RegExp(`(?:^|\\0)PODFLARE_SANDBOX_ID=(${SANDBOX_ID_SOURCE})`).exec(env)?.[1];
      if ((id && wanted.has(id)) || (serverPid !== undefined && ppid === serverPid)) {
        const s = stamp(pid);
        if (s) out.push(s);
      }
    } catch { /* gone */ }
  }
  return out;
}

/** The processes of `stamps` still running (same pid, same start time). */
export function stillRunning(stamps: ProcessStamp[]): ProcessStamp[] {
  return stamps.filter((s) => stamp(s.pid)?.started === s.started);
}

/** Cgroup directories of a sandbox (`podflare/<server scope>/<id>` under any hierarchy): none may outlive it. */
export function cgroupsOf(id: string): string[] {
  const found: string[] = [];
  const roots = existsSync('/sys/fs/cgroup/cgroup.controllers') ? ['/sys/fs/cgroup'] : readdirSync('/sys/fs/cgroup').map((c) => `/sys/fs/cgroup/${c}`);
  for (const root of roots) {
    const base = `${root}/podflare`;
    let scopes: string[] = [];
    try { scopes = readdirSync(base); } catch { continue; }
    for (const scope of scopes) if (existsSync(`${base}/${scope}/${id}`)) found.push(`${base}/${scope}/${id}`);
  }
  return found;
}

/** This state directory's own cgroup (`podflare/<scope>`, see packages/server/src/runtime/shared/cgroups.ts), wherever it is left. */
export function cgroupScopesOf(stateDir: string): string[] {
  const scope = createHash('sha256').update(path.resolve(stateDir)).digest('hex').slice(0, 12);
  const roots = existsSync('/sys/fs/cgroup/cgroup.controllers') ? ['/sys/fs/cgroup'] : readdirSync('/sys/fs/cgroup').map((c) => `/sys/fs/cgroup/${c}`);
  return roots.map((r) => `${r}/podflare/${scope}`).filter((d) => existsSync(d));
}
