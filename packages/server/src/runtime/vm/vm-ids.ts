/**
 * Host ids for VMs: every VM's QEMU runs as a uid (and gid) of its own, and every fork point's
 * files belong to a gid of their own that only its children have, so one QEMU escape reaches one
 * VM (and the fork layers under it), not every tenant's disks, RAM and processes.
 *
 * The range is `[base, base + count)`: `base` is the group of every VM (it may read the frozen
 * templates), the others are handed out. Several servers on one machine may share a range (tests
 * do, all in one process or not): an id is taken by an exclusive lock file in a machine-wide,
 * root-only directory naming its owner (pid and process start time, like the state directory's
 * lock), and a lock whose process is gone is taken over. Before an id is given back (and when one
 * left by a crash is taken over), every process still running as it is killed (`kill -KILL -1` as
 * that uid: one pass under the kernel's task-list lock, so a forking escapee cannot slip past), so
 * nothing of the last VM lives on to meet the next one.
 */
import { randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { lstat, mkdir, open, readdir, readFile, rename, stat, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { Spawner } from '../shared/spawner.js';

/** Machine-wide (every server's ids), on tmpfs: gone with a reboot, as every VM is. */
export const DEFAULT_ID_LOCK_DIR = '/run/podflare-vm-ids';

export class VmIdsExhaustedError extends Error {
  constructor(count: number) {
    super(`all ${count - 1} VM ids are in use (raise PODFLARE_VM_UID_COUNT)`);
  }
}

export class VmIdPool {
  /** Where the next search starts: ids are spread, so a freed id is not reused at once. */
  private cursor = 0;
  private readonly held = new Map<number, string>();
  /** The processes named in each held id's lock (addHolders). */
  private readonly holders = new Map<number, ProcessRef[]>();
  /** The last change queued on each id's lock (serially). */
  private readonly changing = new Map<number, Promise<void>>();
  /** Lock content naming this pool: its process, and the pool itself (two servers in one process). */
  private readonly owner: Promise<string>;

  constructor(private readonly opts: { base: number; count: number; lockDir?: string; spawner: Spawner }) {
    this.owner = startTime(process.pid).then((t) => `${process.pid} ${t} ${randomBytes(6).toString('hex')}\n`);
  }

  /** The group of every VM's QEMU. */
  get group(): number {
    return this.opts.base;
  }

  private get lockDir(): string {
    return this.opts.lockDir ?? DEFAULT_ID_LOCK_DIR;
  }

  /** An id no VM (of any server) holds, with no process running as it. */
  async allocate(): Promise<number> {
    await this.ensureLockDir();
    const slots = this.opts.count - 1;
    for (let i = 0; i < slots; i++) {
      const id = this.opts.base + 1 + ((this.cursor + i) % slots);
      const took = await this.tryTake(id);
      if (took === 'taken') continue;
      this.cursor = (id - this.opts.base) % slots;
      if (took === 'stale') await killAllOf(this.opts.spawner, id); // left by a crashed server: whatever runs as it goes
      return id;
    }
    throw new VmIdsExhaustedError(this.opts.count);
  }

  /**
   * Names processes that keep an id taken beyond this server's life (its lock stays live while
   * any of them runs): a VM that outlives the server (vm-held.ts) holds its uid, and every VM on a
   * fork layer holds the layer's group. Otherwise another server sharing the range would take the
   * id over as stale once this one is gone, and kill the VM or read its layers. The holders come
   * first in the lock, this server's line last: a server that reads only a lock's first line
   * (before holders existed) still sees a live owner.
   */
  addHolders(id: number, holders: ProcessRef[]): Promise<void> {
    return this.serially(id, async () => {
      if (!this.held.has(id)) return;
      await this.rewrite(id, [...(this.holders.get(id) ?? []), ...holders]);
    });
  }

  /** Runs `work` after every earlier change of `id`'s lock (concurrent forks add holders to one layer's group). */
  private serially(id: number, work: () => Promise<void>): Promise<void> {
    const next = (this.changing.get(id) ?? Promise.resolve()).then(work);
    const settled = next.catch(() => undefined);
    this.changing.set(id, settled);
    void settled.then(() => { if (this.changing.get(id) === settled) this.changing.delete(id); });
    return next;
  }

  /**
   * Takes over an id an earlier server on this state directory held for VMs that outlived it
   * (`holders`, named in its lock), leaving what runs as it alone: false if another live server
   * holds it.
   */
  async adopt(id: number, holders: ProcessRef[]): Promise<boolean> {
    if (id <= this.opts.base || id >= this.opts.base + this.opts.count) return false;
    await this.ensureLockDir();
    let took = false;
    await this.serially(id, async () => {
      if (this.held.has(id)) {
        await this.rewrite(id, [...(this.holders.get(id) ?? []), ...holders]);
        took = true;
        return;
      }
      const file = path.join(this.lockDir, String(id));
      const lines = (await readFile(file, 'utf8').catch(() => '')).split('\n');
      const named = holders.some((h) => lines.some((l) => l.startsWith(`${h.pid} ${h.start}`)));
      if (!named && (await lockLive(file))) return; // another server's now
      await this.rewrite(id, holders);
      took = true;
    });
    return took;
  }

  /**
   * Lets go of every id without giving it back: the VMs run on (a stop that keeps them); their
   * locks stay live through their holders, for the next server to adopt.
   */
  forgetAll(): void {
    this.held.clear();
    this.holders.clear();
  }

  /** Replaces an id's lock with its holders and this server (atomically: a reader sees the old lock or the new). */
  private async rewrite(id: number, holders: ProcessRef[]): Promise<void> {
    const content = holders.map((h) => `${h.pid} ${h.start} holder\n`).join('') + (await this.owner);
    const file = path.join(this.lockDir, String(id));
    const tmp = path.join(this.lockDir, `.${id}.${randomBytes(4).toString('hex')}.tmp`);
    await writeFile(tmp, content, { mode: 0o600, flag: 'wx' });
    await rename(tmp, file);
    this.held.set(id, content);
    this.holders.set(id, holders);
  }

  /**
   * Gives an id back once nothing runs as it any more: its processes are killed, then `cleanup`
   * runs (removing what the id owned: nothing of it can change those files meanwhile), then the
   * id is free.
   */
  release(id: number, cleanup?: () => Promise<void>): Promise<void> {
    return this.serially(id, () => this.releaseNow(id, cleanup));
  }

  private async releaseNow(id: number, cleanup?: () => Promise<void>): Promise<void> {
    const mine = this.held.get(id);
    if (mine === undefined) return void (await cleanup?.());
    this.held.delete(id);
    this.holders.delete(id);
    try {
      await killAllOf(this.opts.spawner, id);
      await cleanup?.();
    } finally {
      const file = path.join(this.lockDir, String(id));
      if ((await readFile(file, 'utf8').catch(() => '')) === mine) await unlink(file).catch(() => undefined);
    }
  }

  /** Gives back every id this pool holds (the server is closing). */
  async releaseAll(): Promise<void> {
    await Promise.all([...this.held.keys()].map((id) => this.release(id)));
  }

  /**
   * Ids of this range left locked by servers that are gone (a crash): whatever still runs as them
   * is killed and they are free again. Run before removing a crashed server's VM files.
   */
  async reclaimStale(): Promise<void> {
    await this.ensureLockDir();
    for (const name of await readdir(this.lockDir)) {
      const id = Number(name);
      if (!/^\d+$/.test(name) || id <= this.opts.base || id >= this.opts.base + this.opts.count) continue;
      const file = path.join(this.lockDir, name);
      if (await lockLive(file)) continue;
      await killAllOf(this.opts.spawner, id);
      await unlink(file).catch(() => undefined);
    }
  }

  private async tryTake(id: number): Promise<'fresh' | 'stale' | 'taken'> {
    const file = path.join(this.lockDir, String(id));
    const owner = await this.owner;
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        const fd = await open(file, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOFOLLOW, 0o600);
        try {
          await fd.writeFile(owner);
        } finally {
          await fd.close();
        }
        this.held.set(id, owner);
        return attempt === 0 ? 'fresh' : 'stale';
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      }
      // Its owner runs (this process included: another pool, or this one): taken.
      if (await lockLive(file)) return 'taken';
      // Written by a process that is gone (or half-written by one that died at it): take it over.
      await unlink(file).catch(() => undefined);
    }
    return 'taken';
  }

  /** The lock directory: a real directory of root's, which nobody else may write. */
  private async ensureLockDir(): Promise<void> {
    await mkdir(this.lockDir, { recursive: true, mode: 0o700 });
    const st = await lstat(this.lockDir);
    if (!st.isDirectory() || st.uid !== 0 || (st.mode & 0o022) !== 0) {
      throw new Error(`${this.lockDir} must be a directory of root's that nobody else may write`);
    }
  }
}

/** A process, by pid and start time (a pid alone may be reused). */
export interface ProcessRef {
  pid: number;
  start: string;
}

/**
 * Whether a lock's owner runs, or any of the processes it names after the owner's line (VMs that
 * outlive their server: addHolders); a lock still empty is being written (unless it is old: its
 * writer died).
 */
async function lockLive(file: string): Promise<boolean> {
  const text = await readFile(file, 'utf8').catch(() => null);
  if (text === null) return false;
  const lines = text.split('\n').filter((l) => l.trim());
  const [pid, started] = (lines[0] ?? '').trim().split(' ');
  if (!pid || !started) return Date.now() - (await stat(file).then((st) => st.mtimeMs, () => 0)) < 10_000;
  for (const line of lines) {
    const [p, t] = line.trim().split(' ');
    if (p && t && (await startTime(Number(p))) === t) return true;
  }
  return false;
}

/** The start time of a process (clock ticks since boot), or null when it is not running. */
async function startTime(pid: number): Promise<string | null> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => null);
  if (!stat) return null;
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return fields[0] === 'Z' ? null : (fields[19] ?? null);
}

/**
 * SIGKILLs every process running as `uid` (its real or saved uid): `kill -1` sent from a process
 * of that uid, which the kernel delivers in one pass over all processes.
 */
export async function killAllOf(spawner: Spawner, uid: number): Promise<void> {
  const p = await spawner.spawn(['setpriv', `--reuid=${uid}`, `--regid=${uid}`, '--clear-groups', '--', 'kill', '-KILL', '-1']);
  await p.exited; // "no such process" when none was left: the usual case
}
