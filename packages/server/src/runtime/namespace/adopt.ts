/**
 * Helpers of the namespace runtime's adoption of sandboxes an earlier server left alive under their
 * holders (holder.ts): settling an adopted agent, and removing the holders and holder files of
 * sandboxes that were not adopted.
 */
import { readdir } from 'node:fs/promises';
import path from 'node:path';
import type { NsSandbox } from './ns-sandbox.js';
import { holderPaths, holdersDir, killIfStill, loadHolderRecords, removeHolderFiles, waitProcessGone } from './holder.js';
import { MOUNTINFO_READ_CAP, ProcFileTooLargeError, readCmdline, readProcWhole } from './proc-read.js';

/**
 * An adopted sandbox's agent answers, and the exec it was running when the old server died (its
 * caller is gone) is interrupted and over, so the sandbox is ready for the next one. Throws if the
 * agent does not answer within `timeoutMs`.
 */
export async function settleAdopted(s: Pick<NsSandbox, 'channel'>, timeoutMs: number): Promise<void> {
  const orphan = await interruptOrphanedExec(s, timeoutMs);
  await orphan?.over;
}

/**
 * Interrupts the exec an adopted sandbox's agent was running when the old server died. Resolves
 * once the agent has answered (the proof that it answers: one round trip per sandbox, a restart
 * settles them all at once): null when no exec ran, else `over`, which settles once the
 * interrupted exec has ended (within the interrupt grace) — a restart need not wait for it before
 * listening; the sandbox's execs do. Throws (or `over` rejects) if the agent does not answer
 * within `timeoutMs`.
 */
export async function interruptOrphanedExec(s: Pick<NsSandbox, 'channel'>, timeoutMs: number): Promise<{ over: Promise<void> } | null> {
  const deadline = Date.now() + timeoutMs;
  const within = <T>(p: Promise<T>): Promise<T> => {
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error('its agent does not answer')), Math.max(1, deadline - Date.now()));
    });
    return Promise.race([p, late]).finally(() => clearTimeout(timer));
  };
  const interrupt = async () => (await within(s.channel.request({ op: 'interrupt' }))).interrupted;
  if (!(await interrupt())) return null;
  // `interrupted: false` once no exec runs; an interrupted one ends within the interrupt grace.
  const over = (async () => {
    do await new Promise((r) => setTimeout(r, 10));
    while (await interrupt());
  })();
  over.catch(() => undefined);
  return { over };
}

/**
 * Whether `target` is a mount point in the mount namespace of `pid` (a sandbox's PID 1). The mount
 * table is the sandbox's to grow: past MOUNTINFO_READ_CAP this throws ProcFileTooLargeError (the
 * sandbox is not adopted) rather than reading what it likes into the server's memory.
 */
export async function hasMount(pid: number, target: string): Promise<boolean> {
  let info: string;
  try {
    info = await readProcWhole(`/proc/${pid}/mountinfo`, MOUNTINFO_READ_CAP);
  } catch (err) {
    if (err instanceof ProcFileTooLargeError) throw err;
    return false; // gone: its adoption fails on the agent's silence instead
  }
  return info.split('\n').some((line) => line.split(' ')[4] === target);
}

/**
 * SIGKILLs every holder of this state directory that has a record and whose sandbox is not in
 * `keep`, and waits for them: their bwrap (and so their sandbox) dies with them. A holder is found
 * by the pid its record names (checked against its command line). Returns the ids of those
 * sandboxes (`stray`), and those of holder files without a record (`unrecorded`: their server died
 * while starting them; killUnrecordedHolders finds their holders).
 */
export async function killStrayHolders(stateDir: string, keep: ReadonlySet<string>): Promise<{ stray: string[]; unrecorded: Set<string> }> {
  const names = await readdir(holdersDir(stateDir)).catch(() => [] as string[]);
  const ids = [...new Set(names.map((n) => n.replace(/\.(sock|json|log|json\.tmp)$/, '')))].filter((id) => !keep.has(id));
  if (ids.length === 0) return { stray: [], unrecorded: new Set() };
  const records = new Map((await loadHolderRecords(stateDir)).map((r) => [r.spec.id, r]));
  const killed: number[] = [];
  const unrecorded = new Set<string>();
  for (const id of ids) {
    const r = records.get(id);
    if (!r) unrecorded.add(id);
    else if (killIfStill(r.holderPid, holderPaths(stateDir, id).socket)) killed.push(r.holderPid);
  }
  await Promise.all(killed.map((pid) => waitProcessGone(pid, 10_000)));
  return { stray: ids.filter((id) => !unrecorded.has(id)), unrecorded };
}

/**
 * SIGKILLs the holders of `ids` (sandboxes of this state directory without a holder record), found
 * by a pass over the process table, and waits for them. Command lines are read capped: one longer
 * than any holder's is some other process's (a sandbox's may be megabytes).
 */
export async function killUnrecordedHolders(stateDir: string, ids: ReadonlySet<string>): Promise<void> {
  if (ids.size === 0) return;
  const dir = holdersDir(stateDir);
  const killed: number[] = [];
  for (const name of await readdir('/proc')) {
    const pid = Number(name);
    if (!Number.isInteger(pid) || pid === process.pid) continue;
    const cmdline = await readCmdline(pid).catch(() => null);
    if (!cmdline?.some((a) => a.endsWith('/podflare_holder.py'))) continue;
    const socket = cmdline[cmdline.indexOf('--socket') + 1] ?? '';
    if (path.dirname(socket) !== dir || !ids.has(path.basename(socket, '.sock'))) continue;
    try {
      process.kill(pid, 'SIGKILL');
      killed.push(pid);
    } catch { /* gone meanwhile */ }
  }
  await Promise.all(killed.map((pid) => waitProcessGone(pid, 10_000)));
}

/** Removes the holder files (sockets, records, logs) of every sandbox not in `keep`. */
export async function removeStrayHolderFiles(stateDir: string, keep: ReadonlySet<string>): Promise<void> {
  const dir = path.join(stateDir, 'holders');
  const ids = new Set((await readdir(dir).catch(() => [] as string[])).map((n) => n.replace(/\.(sock|json|log|json\.tmp)$/, '')));
  for (const id of ids) if (!keep.has(id)) await removeHolderFiles(stateDir, id);
}
