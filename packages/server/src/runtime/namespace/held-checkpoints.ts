/**
 * Checkpoints held inside a namespace sandbox (issue 23; the agent's half is
 * agent/podflare_checkpoint.py).
 *
 * A checkpoint is two frozen things, both the sandbox's own:
 * - its interpreter: one plain fork of the worker, left in the sandbox's namespaces and cgroup
 *   (memory shared copy-on-write; what either side writes afterwards is charged to the
 *   sandbox's memory group), blocked until restored or dropped;
 * - its files: the sandbox's upper layer frozen into a fork layer in the sandbox's directory (its
 *   subvolume: the layer counts against the sandbox's disk limit), over the lowers it had then.
 * Nothing a runnable sandbox needs (namespaces, root, holder, channel, cgroups, network) is made
 * for it: a checkpoint costs one fork of the interpreter and one layer copy, done at once.
 *
 * A restore is in place. A fresh upper (in the sandbox's directory) over the checkpoint's layers
 * is mounted into the sandbox's mount namespace at the spawn area; the agent ends the live state,
 * switches its root to it and makes the checkpoint's interpreter the worker. Then the fresh upper
 * takes the canonical `upper` name (renames in the sandbox's root-owned directory; the mount
 * refers to its directories, not their names) and the replaced upper is removed. The sandbox
 * keeps everything else — runtime object, namespaces, network, cgroups, holder, channel — so
 * a restore nests no pid namespace and adds nothing to the sandbox's disk but its new writes:
 * however many checkpoints and restores, one subvolume, one disk limit, one memory group.
 */
import { randomBytes } from 'node:crypto';
import { chown, mkdir, rename } from 'node:fs/promises';
import path from 'node:path';
import type { VarInfo } from '@podflare/protocol';
import { SandboxError, type DiffOptions, type FileDiff, type HeldCheckpoint, type HeldCheckpoints } from '@podflare/runtime';
import type { Logger } from '../../log.js';
import type { HostHelper } from './hostd.js';
import type { NsSandbox } from './ns-sandbox.js';

/** What held checkpoints need of the namespace runtime. */
export interface HeldCheckpointHost {
  hostd: HostHelper;
  log: Logger;
  /** Host uid of sandbox root (owner of an upper's top directory). */
  uidBase: number;
  /** Where a fork child's root is placed in a sandbox's mount namespace (a tmpfs made on first use). */
  spawnArea: string;
  /** The sandbox's upper frozen into a new fork layer: the checkpoint's lowers, topmost first. */
  freezeUpper(s: NsSandbox): Promise<string[]>;
  retainLayer(layer: string): void;
  releaseLayer(layer: string): Promise<void>;
  /** The sandbox's holder record, rewritten (its lowers changed). */
  saveRecord(s: NsSandbox): Promise<void>;
  /** Runs `work` as the runtime runs a fork: after its start-up steps, and waited for by its close. */
  busy<T>(work: () => Promise<T>): Promise<T>;
}

/** One held checkpoint: the agent's name for its interpreter, and its files. */
interface NsCheckpoint extends HeldCheckpoint {
  readonly lowers: string[];
  released: boolean;
}

/** Debug timings of a checkpoint or restore's phases (ms since its start). */
function phaseLog(log: Logger, what: string, sandbox: string): (name: string) => void {
  const t0 = performance.now();
  return (name) => log.debug(`${what}: ${name}`, { sandbox, ms: Math.round((performance.now() - t0) * 10) / 10 });
}

/** An agent that does not know the op (an older agent adopted after an upgrade). */
function unknownOp(err: unknown): boolean {
  return err instanceof Error && /unknown op/.test(err.message);
}

export class NsHeldCheckpoints implements HeldCheckpoints<NsSandbox> {
  constructor(private readonly host: HeldCheckpointHost) {}

  take(s: NsSandbox): Promise<HeldCheckpoint> {
    return this.host.busy(() => this.takeNow(s));
  }

  restore(s: NsSandbox, held: HeldCheckpoint, keep: boolean): Promise<{ kept: boolean }> {
    return this.host.busy(() => this.restoreNow(s, held, keep));
  }

  private async takeNow(s: NsSandbox): Promise<HeldCheckpoint> {
    if (!s.initPid || s.ended) throw new SandboxError('sandbox_gone', `sandbox ${s.id} is gone`);
    await s.ready;
    const ref = 'c' + randomBytes(8).toString('hex');
    const phase = phaseLog(this.host.log, 'checkpoint', s.id);
    // The interpreter forks while the layer is copied: both are of this idle moment.
    const forking = s.channel.request({ op: 'checkpoint', ref }).finally(() => phase('interpreter forked'));
    const freezing = this.host.freezeUpper(s).finally(() => phase('layer frozen'));
    const [forked, frozen] = await Promise.allSettled([forking, freezing]);
    if (frozen.status === 'fulfilled') for (const l of frozen.value) this.host.retainLayer(l);
    const cp: NsCheckpoint = { ref, lowers: frozen.status === 'fulfilled' ? frozen.value : [], released: false };
    if (forked.status === 'rejected' || frozen.status === 'rejected') {
      await this.drop(s, cp);
      const err = forked.status === 'rejected' ? forked.reason : (frozen as PromiseRejectedResult).reason;
      if (unknownOp(err)) throw new SandboxError('not_supported', `sandbox ${s.id}'s agent is too old to hold checkpoints`);
      throw err;
    }
    return cp;
  }

  private async restoreNow(s: NsSandbox, held: HeldCheckpoint, keep: boolean): Promise<{ kept: boolean }> {
    const cp = held as NsCheckpoint;
    if (!s.initPid || s.ended) throw new SandboxError('sandbox_gone', `sandbox ${s.id} is gone`);
    const { hostd } = this.host;
    const initPid = s.initPid;
    const phase = phaseLog(this.host.log, 'restore', s.id);
    // The spawn area (lost with the root a restore leaves) is made while the new root is.
    const spawnArea = s.spawnAreaReady ? Promise.resolve() : hostd.tmpfs(initPid, this.host.spawnArea, this.host.uidBase);
    spawnArea.catch(() => undefined);
    const tag = randomBytes(6).toString('hex');
    const next = { upper: path.join(s.dirs.dir, `upper-${tag}`), work: path.join(s.dirs.dir, `work-${tag}`) };
    let attached = false;
    try {
      await Promise.all([mkdir(next.upper).then(() => chown(next.upper, this.host.uidBase, this.host.uidBase)), mkdir(next.work)]);
      const handle = await hostd.prepareOverlay({ lowers: cp.lowers, upper: next.upper, work: next.work });
      phase('root made');
      await spawnArea;
      s.spawnAreaReady = true;
      await hostd.attachOverlay(handle, initPid, this.host.spawnArea).catch(async (e: Error) => {
        await hostd.discardOverlay(handle).catch(() => undefined);
        throw e;
      });
      attached = true;
      phase('root attached');
      const reply = await s.channel.request({ op: 'checkpoint_restore', ref: cp.ref, root: this.host.spawnArea, keep });
      phase('agent restored');
      // The spawn area was in the root the agent has just left.
      s.spawnAreaReady = false;
      await this.swapFiles(s, next, cp.lowers);
      phase('files swapped');
      if (!reply.kept) this.releaseLayers(cp);
      return { kept: reply.kept };
    } catch (err) {
      if (!attached) for (const dir of [next.upper, next.work]) void hostd.removeTree(dir).catch(() => undefined);
      // Attached but refused (the checkpoint's process is gone): the agent left its root as it was.
      if (attached) s.spawnAreaReady = false;
      throw err;
    }
  }

  /** The restored files become the sandbox's (canonical names), the replaced upper goes. */
  private async swapFiles(s: NsSandbox, next: { upper: string; work: string }, lowers: string[]): Promise<void> {
    const tag = randomBytes(6).toString('hex');
    const old = { upper: path.join(s.dirs.dir, `old-upper-${tag}`), work: path.join(s.dirs.dir, `old-work-${tag}`) };
    await rename(s.dirs.upper, old.upper);
    await rename(next.upper, s.dirs.upper);
    await rename(s.dirs.work, old.work);
    await rename(next.work, s.dirs.work);
    const before = s.lowers;
    for (const l of lowers) this.host.retainLayer(l);
    s.lowers = lowers;
    for (const l of before) void this.host.releaseLayer(l);
    void this.host.saveRecord(s).catch(() => undefined);
    for (const dir of [old.upper, old.work]) {
      void this.host.hostd.removeTree(dir).catch((e: Error) => this.host.log.warn('a restored sandbox\'s old files could not be removed', { sandbox: s.id, error: e.message }));
    }
  }

  async drop(s: NsSandbox, held: HeldCheckpoint): Promise<void> {
    const cp = held as NsCheckpoint;
    if (!s.ended && s.initPid) {
      await s.channel.request({ op: 'checkpoint_drop', ref: cp.ref }).catch(() => undefined);
    }
    this.releaseLayers(cp);
  }

  /**
   * Drops every checkpoint the sandbox's agent holds (a server restart: the books that named them
   * are gone). Their layers go with the sandbox's directory. An agent without the op holds none.
   */
  async forgetAll(s: NsSandbox): Promise<void> {
    await s.channel.request({ op: 'checkpoint_drop', ref: null }).catch(() => undefined);
  }

  async diff(held: HeldCheckpoint, s: NsSandbox, opts: DiffOptions): Promise<FileDiff> {
    return this.host.hostd.diff((held as NsCheckpoint).lowers, s.stack, opts);
  }

  async vars(s: NsSandbox, held: HeldCheckpoint): Promise<Record<string, VarInfo>> {
    return (await s.channel.request({ op: 'checkpoint_vars', ref: held.ref })).vars;
  }

  private releaseLayers(cp: NsCheckpoint): void {
    if (cp.released) return;
    cp.released = true;
    for (const l of cp.lowers) void this.host.releaseLayer(l);
  }
}
