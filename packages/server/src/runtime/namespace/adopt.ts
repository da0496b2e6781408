/**
 * Helpers of the namespace runtime's adoption of sandboxes an earlier server left alive under their
 * holders (holder.ts): settling an adopted agent, and removing the holders and holder files of
 * sandboxes that were not adopted.
 */
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import type { NsSandbox } from './ns-sandbox.js';
import { holderPaths, holdersDir, killIfStill, loadHolderRecords, removeHolderFiles, waitProcessGone } from './holder.js';

/**
 * An adopted sandbox's agent answers, and the exec it was running when the old server died (its
 * caller is gone) is interrupted and over, so the sandbox is ready for the next one. Throws if the
 * agent does not answer within `timeoutMs`.
 */
export async function settleAdopted(s: Pick<NsSandbox, 'channel'>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  const within = <T>(p: Promise<T>): Promise<T> => {
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error('its agent does not answer')), Math.max(1, deadline - Date.now()));
    });
    return Promise.race([p, late]).finally(() => clearTimeout(timer));
  };
  await within(s.channel.request({ op: 'ping' }));
  // `interrupted: false` once no exec runs; an interrupted one ends within the interrupt grace.
  while ((await within(s.channel.request({ op: 'interrupt' }))).interrupted) {
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Whether `target` is a mount point in the mount namespace of `pid`. */
export async function hasMount(pid: number, target: string): Promise<boolean> {
  const info = await readFile(`/proc/${pid}/mountinfo`, 'utf8').catch(() => '');
  return info.split('\n').some((line) => line.split(' ')[4] === target);
}

/**
 * SIGKILLs every holder of this state directory whose sandbox is not in `keep`, and waits for
 * them: their bwrap (and so their sandbox) dies with them. A holder with a record is found by the
 * pid it names (checked against its command line); only holders without one (their server died
 * while starting them) need a pass over the process table. Returns the ids of the holders' sandboxes.
 */
export async function killStrayHolders(stateDir: string, keep: ReadonlySet<string>): Promise<string[]> {
  const dir = holdersDir(stateDir);
  const names = await readdir(dir).catch(() => [] as string[]);
  const stray = [...new Set(names.map((n) => n.replace(/\.(sock|json|log|json\.tmp)$/, '')))].filter((id) => !keep.has(id));
  if (stray.length === 0) return [];
  const records = new Map((await loadHolderRecords(stateDir)).map((r) => [r.spec.id, r]));
  const killed: number[] = [];
  const unknown = new Set<string>();
  for (const id of stray) {
    const r = records.get(id);
    if (!r) unknown.add(id);
    else if (killIfStill(r.holderPid, holderPaths(stateDir, id).socket)) killed.push(r.holderPid);
  }
  if (unknown.size) {
    for (const name of await readdir('/proc')) {
      const pid = Number(name);
      if (!Number.isInteger(pid) || pid === process.pid) continue;
      const cmdline = (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0');
      if (!cmdline.some((a) => a.endsWith('/podflare_holder.py'))) continue;
      const socket = cmdline[cmdline.indexOf('--socket') + 1] ?? '';
      if (path.dirname(socket) !== dir || !unknown.has(path.basename(socket, '.sock'))) continue;
      try {
        process.kill(pid, 'SIGKILL');
        killed.push(pid);
      } catch { /* gone meanwhile */ }
    }
  }
  await Promise.all(killed.map((pid) => waitProcessGone(pid, 10_000)));
  return stray;
}

/** Removes the holder files (sockets, records, logs) of every sandbox not in `keep`. */
export async function removeStrayHolderFiles(stateDir: string, keep: ReadonlySet<string>): Promise<void> {
  const dir = path.join(stateDir, 'holders');
  const ids = new Set((await readdir(dir).catch(() => [] as string[])).map((n) => n.replace(/\.(sock|json|log|json\.tmp)$/, '')));
  for (const id of ids) if (!keep.has(id)) await removeHolderFiles(stateDir, id);
}
