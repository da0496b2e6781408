/**
 * Freezing a sandbox to the state directory (memory and disk) and resuming it, even after a server
 * restart; deleting a frozen one removes its files.
 */
import { rm } from 'node:fs/promises';
import path from 'node:path';
import { SandboxError } from '@podflare/runtime';
import type { SandboxRecord } from '../store/store.js';
import type { ManagerContext } from './context.js';
import type { Lifecycle } from './lifecycle.js';
import type { LiveSandbox } from './live-sandbox.js';

export class Freezer {
  private readonly resuming = new Map<string, Promise<LiveSandbox>>();

  constructor(private readonly ctx: ManagerContext, private readonly lifecycle: Lifecycle) {}

  private frozenDir(id: string): string {
    return path.join(this.ctx.config.stateDir, 'frozen', id);
  }

  /**
   * Freezes a sandbox to the state directory (memory and disk): it stops using CPU and memory, its
   * record says `frozen`, and the next call on its id resumes it, even after a server restart.
   */
  async freeze(s: LiveSandbox): Promise<void> {
    const { live, store, counters, log } = this.ctx;
    const freeze = s.runtime.freeze?.bind(s.runtime);
    if (!freeze || !s.runtime.capabilities.freeze) {
      throw new SandboxError('bad_request',
        `the ${s.runtime.name} runtime cannot freeze a sandbox (its processes' memory has no way to disk here)`);
    }
    await s.queue.run(async () => {
      if (live.get(s.record.id) !== s) throw new SandboxError('sandbox_gone', `sandbox ${s.record.id} is gone`);
      // Out of the live set first: the VM ending below is not a crash.
      live.delete(s.record.id);
      try {
        await freeze(s.rt, this.frozenDir(s.record.id));
      } catch (err) {
        live.set(s.record.id, s);
        // A VM that died during the freeze went unnoticed while out of the live set: end it now.
        const died = await Promise.race([s.rt.exited.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 50))]);
        if (died) void this.lifecycle.end(s, 'error', `the sandbox died while freezing: ${(err as Error).message}`);
        throw err;
      }
      s.record.state = 'frozen';
      await store.update(s.record.id, { state: 'frozen', lastActiveAt: s.record.lastActiveAt });
      counters.frozen++;
      log.debug('sandbox frozen', { sandbox: s.record.id });
    });
  }

  /** Resumes a frozen sandbox (one resume per id at a time; callers share it). */
  async resume(record: SandboxRecord): Promise<LiveSandbox> {
    const live = this.ctx.live.get(record.id);
    if (live) return live;
    if (record.state !== 'frozen') throw new SandboxError('conflict', `sandbox ${record.id} is not frozen (${record.state})`);
    let p = this.resuming.get(record.id);
    if (!p) {
      p = (async () => {
        if (this.ctx.status.closing) throw new SandboxError('unavailable', 'the server is shutting down');
        const runtime = this.ctx.runtimes.get(record.runtime);
        if (!runtime?.resume) {
          throw new SandboxError('unavailable', `the ${record.runtime} runtime is not available on this server to resume sandbox ${record.id}`);
        }
        const dir = this.frozenDir(record.id);
        const rt = await runtime.resume({
          id: record.id, template: record.template, egress: record.egress, hostname: `sbx-${record.id.slice(4, 16)}`,
          limits: record.limits ?? this.ctx.config.defaultLimits,
        }, dir);
        await rm(dir, { recursive: true, force: true });
        const now = Date.now();
        record.state = 'ready';
        record.lastActiveAt = now;
        await this.ctx.store.update(record.id, { state: 'ready', lastActiveAt: now });
        this.ctx.counters.resumed++;
        return this.lifecycle.adopt(record, runtime, rt);
      })();
      this.resuming.set(record.id, p);
      void p.finally(() => this.resuming.delete(record.id)).catch(() => undefined);
    }
    return p;
  }

  /** Deletes a frozen sandbox (only files); anything else, or one resuming right now, is left alone. */
  async destroyFrozen(id: string, owner: string | undefined, reason: string): Promise<void> {
    const record = await this.ctx.store.get(id);
    if (record?.state === 'frozen' && (owner === undefined || record.owner === owner) && !this.resuming.has(id)) {
      await rm(this.frozenDir(id), { recursive: true, force: true });
      await this.ctx.store.update(id, { state: 'stopped', endedAt: Date.now(), endReason: reason });
    }
  }
}
