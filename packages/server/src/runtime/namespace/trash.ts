import { randomBytes } from 'node:crypto';
import { rename } from 'node:fs/promises';
import path from 'node:path';
import type { SandboxDirs } from './layout.js';

/**
 * Ended sandboxes' directories, removed when sandboxes are not being made. On the disk volume each
 * is a btrfs subvolume, and deleting one sets off btrfs work (a transaction commit, quota
 * accounting) that stalls whatever else writes to the volume meanwhile: made right after its
 * children closed, the next fork took 17 ms instead of 10. So a directory is only moved into the
 * trash directory at once (out of the sandboxes' namespace: its id is free again), and the trash
 * is emptied once nothing has been started for a moment — or, past a bound, regardless, so it
 * never holds more than TRASH_MAX_ENTRIES.
 */
export class Trash {
  private entries: string[] = [];
  private lastActivity = 0;
  private timer: NodeJS.Timeout | null = null;
  private emptying: Promise<void> | null = null;

  /**
   * @param remove removes one tree without following what a sandbox planted in it (the host
   *   helper's `remove_tree`: a process outliving its sandbox may still write there)
   */
  constructor(private readonly dir: string, private readonly remove: (tree: string) => Promise<void>) {}

  /** A sandbox is being made: emptying waits until things are quiet again. */
  touch(): void {
    this.lastActivity = performance.now();
  }

  /** Moves `dirs.dir` into the trash (removes it in place where that fails). */
  async throwAway(dirs: SandboxDirs): Promise<void> {
    const doomed = path.join(this.dir, `${path.basename(dirs.dir)}-${randomBytes(4).toString('hex')}`);
    try {
      await rename(dirs.dir, doomed);
    } catch {
      return this.remove(dirs.dir); // gone already, or no trash directory
    }
    this.entries.push(doomed);
    if (this.entries.length > TRASH_MAX_ENTRIES) void this.empty(this.entries.length - TRASH_MAX_ENTRIES).then(() => this.schedule());
    else this.schedule();
  }

  /** Removes everything in it now (the runtime is closing). */
  async close(): Promise<void> {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    await this.emptying;
    await this.empty(this.entries.length);
  }

  private schedule(): void {
    if (this.timer || this.emptying) return;
    const wait = Math.max(0, this.lastActivity + TRASH_QUIET_MS - performance.now());
    this.timer = setTimeout(() => {
      this.timer = null;
      if (performance.now() - this.lastActivity < TRASH_QUIET_MS) return this.schedule();
      // One at a time, so a sandbox made meanwhile waits on one deletion at most.
      void this.empty(1).then(() => { if (this.entries.length) this.schedule(); });
    }, wait);
    this.timer.unref();
  }

  private empty(count: number): Promise<void> {
    const batch = this.entries.splice(0, count);
    const previous = this.emptying ?? Promise.resolve();
    const current: Promise<void> = previous.then(async () => {
      for (const doomed of batch) await this.remove(doomed).catch(() => undefined);
    }).finally(() => {
      if (this.emptying === current) this.emptying = null;
    });
    this.emptying = current;
    return current;
  }
}

/** Quiet time (nothing started) before the trash is emptied. */
const TRASH_QUIET_MS = 250;
/** Past this many, the oldest go at once. */
const TRASH_MAX_ENTRIES = 64;
