/**
 * Fork (copy-on-write children of an idle sandbox), whole-state merge of a descendant back into its
 * ancestor, selective merge of chosen paths, and the file diff between two sandboxes.
 */
import { SandboxError } from '@podflare/runtime';
import { copyPaths } from '../merge-paths.js';
import type { RuntimeSandbox } from '../runtime/runtime.js';
import type { SandboxRecord } from '../store/store.js';
import type { Capacity } from './capacity.js';
import type { ManagerContext } from './context.js';
import type { Lifecycle } from './lifecycle.js';
import type { LimitWatch } from './limit-watch.js';
import { newSandboxId, type LiveSandbox } from './live-sandbox.js';

/** The live sandbox of `id` for `owner` (resuming a frozen one), or the error a user should see. */
export type GetLive = (id: string, owner?: string) => Promise<LiveSandbox>;

export class ForkMerge {
  constructor(
    private readonly ctx: ManagerContext,
    private readonly capacity: Capacity,
    private readonly lifecycle: Lifecycle,
    private readonly limits: LimitWatch,
    private readonly get: GetLive,
  ) {}

  /**
   * fork(n): n copy-on-write children of an idle sandbox (waits for a running exec: forks go
   * through the same queue). Children inherit egress, timeouts and metadata.
   */
  async fork(s: LiveSandbox, n: number): Promise<SandboxRecord[]> {
    if (!s.runtime.capabilities.fork) throw new SandboxError('bad_request', `the ${s.runtime.name} runtime cannot fork`);
    return s.queue.run(async () => {
      if (!this.ctx.live.has(s.record.id)) throw new SandboxError('sandbox_gone', `sandbox ${s.record.id} is gone`);
      const release = this.capacity.reserve(s.record.owner, n);
      try {
        return await this.forkReserved(s, n, release);
      } finally {
        release();
      }
    });
  }

  private async forkReserved(s: LiveSandbox, n: number, release: () => void): Promise<SandboxRecord[]> {
    const { config, metrics, store, counters, changes } = this.ctx;
    const specs = Array.from({ length: n }, () => {
      const id = newSandboxId();
      return {
        id, template: s.record.template, egress: s.record.egress, hostname: `sbx-${id.slice(4, 16)}`,
        limits: s.record.limits ?? config.defaultLimits,
      };
    });
    let children: RuntimeSandbox[];
    const timed = metrics.forkSeconds.time();
    try {
      children = await s.runtime.fork(s.rt, specs);
    } catch (err) {
      // The children are processes of the parent's until they have groups of their own.
      const hit = await this.limits.hit(s, s.rt, 0);
      if (hit) throw new SandboxError('conflict', `cannot fork: ${hit.data.value}`);
      throw err;
    }
    timed();
    const now = Date.now();
    const records: SandboxRecord[] = children.map((rt) => ({
      ...s.record, id: rt.id, state: 'ready', parentId: s.record.id, createdAt: now, lastActiveAt: now,
      endedAt: null, endReason: null, metadata: { ...s.record.metadata },
    }));
    // All the children's records or none (a networked store may fail half-way).
    try {
      await store.transaction(async (tx) => { for (const record of records) await tx.insert(record); });
    } catch (err) {
      await Promise.allSettled(children.map((rt) => rt.destroy()));
      throw err;
    }
    for (const [i, rt] of children.entries()) this.lifecycle.adopt(records[i]!, s.runtime, rt);
    release();
    s.record.lastActiveAt = now;
    counters.forked += children.length;
    changes.emit('change', s.record.id);
    return records;
  }

  /** True when `descendant` is below `ancestor` in the lineage. */
  private async isDescendant(descendant: string, ancestor: string): Promise<boolean> {
    const { live, store } = this.ctx;
    let current = (live.get(descendant)?.record ?? (await store.get(descendant)))?.parentId ?? null;
    for (let hops = 0; current && hops < 1000; hops++) {
      if (current === ancestor) return true;
      current = (live.get(current)?.record ?? (await store.get(current)))?.parentId ?? null;
    }
    return false;
  }

  /** Checks a merge's parties: into itself 400, unknown/retired winner 404, not a descendant 400. */
  async mergeParties(parentId: string, winnerId: string, owner?: string): Promise<{ parent: LiveSandbox; winner: LiveSandbox }> {
    if (parentId === winnerId) throw new SandboxError('bad_request', 'a sandbox cannot be merged into itself', { field: 'winner' });
    const parent = await this.get(parentId, owner);
    const winner = await this.get(winnerId, owner).catch((err: SandboxError) => {
      throw err.code === 'sandbox_gone' ? new SandboxError('not_found', err.message) : err;
    });
    if (!(await this.isDescendant(winnerId, parentId))) {
      throw new SandboxError('bad_request', `sandbox ${winnerId} is not a descendant of ${parentId}`, { field: 'winner' });
    }
    return { parent, winner };
  }

  /**
   * Whole-state merge: from now on the parent's id drives the winner's sandbox (memory and files);
   * the parent's old sandbox is destroyed and the winner's id retired. Siblings live on.
   */
  async mergeWhole(parent: LiveSandbox, winner: LiveSandbox): Promise<void> {
    const { live, store, counters, changes, eventLog } = this.ctx;
    await parent.queue.run(() => winner.queue.run(async () => {
      if (live.get(winner.record.id) !== winner) throw new SandboxError('not_found', `sandbox ${winner.record.id} not found`);
      const old = parent.rt;
      live.delete(winner.record.id);
      parent.rt = winner.rt;
      parent.runtime = winner.runtime;
      this.lifecycle.watch(parent, winner.rt);
      parent.record.lastActiveAt = Date.now();
      winner.record.state = 'merged';
      winner.record.endedAt = Date.now();
      winner.record.endReason = `merged into ${parent.record.id}`;
      // The winner retired and its children the parent's, in one transaction.
      const reparented = await store.transaction(async (tx) => {
        await tx.update(winner.record.id, { state: 'merged', endedAt: winner.record.endedAt, endReason: winner.record.endReason });
        const kids = await tx.children(winner.record.id);
        for (const child of kids) await tx.update(child, { parentId: parent.record.id });
        return kids;
      });
      for (const child of reparented) {
        const liveChild = live.get(child);
        if (liveChild) liveChild.record.parentId = parent.record.id;
      }
      counters.merged++;
      changes.emit('change', parent.record.id);
      await old.destroy();
      eventLog.drop(old.id);
    }));
  }

  /**
   * Selective merge: copies `paths` from the winner into the parent through their agents (both
   * queues held: no exec changes either side meanwhile). Both sandboxes live on.
   */
  async mergePaths(parent: LiveSandbox, winner: LiveSandbox, paths: string[]): Promise<void> {
    await parent.queue.run(() => winner.queue.run(() => copyPaths(winner.rt.channel, parent.rt.channel, paths)));
  }

  /** The files that differ between two sandboxes of one runtime (one diff per sandbox at a time). */
  diffFiles(a: LiveSandbox, b: LiveSandbox, opts: { paths?: string[]; content?: boolean }) {
    if (a.runtime !== b.runtime) {
      throw new SandboxError('bad_request', `cannot diff a ${a.runtime.name} sandbox against a ${b.runtime.name} sandbox`);
    }
    const diff = () => a.runtime.diff(a.rt, b.rt, opts);
    if (a === b) return a.diffs.run(diff);
    // Both queues, always taken in the same order (by id): two opposite diffs cannot deadlock.
    const [first, second] = a.record.id < b.record.id ? [a, b] : [b, a];
    return first.diffs.run(() => second.diffs.run(diff));
  }
}
