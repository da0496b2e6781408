/** Once a second: ends sandboxes past their maximum lifetime or idle timeout (idle persistent ones freeze). */
import type { ManagerContext } from './context.js';
import type { Freezer } from './freezer.js';
import type { Lifecycle } from './lifecycle.js';

export class Sweeper {
  private readonly timer: NodeJS.Timeout;

  constructor(private readonly ctx: ManagerContext, private readonly lifecycle: Lifecycle, private readonly freezer: Freezer) {
    this.timer = setInterval(() => this.sweep(), 1000);
    this.timer.unref();
  }

  stop(): void {
    clearInterval(this.timer);
  }

  /** Idle timeouts (not while an exec runs or waits) and maximum lifetimes. */
  private sweep(): void {
    const now = Date.now();
    for (const s of [...this.ctx.live.values()]) {
      const r = s.record;
      if (now - r.createdAt > r.maxLifetimeSeconds * 1000) {
        this.ctx.counters.expired++;
        void this.lifecycle.end(s, 'stopped', `max lifetime of ${r.maxLifetimeSeconds}s reached`);
      } else if (!s.running && s.queue.length === 0 && now - r.lastActiveAt > r.idleTimeoutSeconds * 1000) {
        if (r.persistent && s.runtime.capabilities.freeze) {
          // Idle persistent sandboxes go to disk instead of away.
          r.lastActiveAt = now; // not picked again while the freeze runs
          void this.freezer.freeze(s).catch((err: Error) => this.ctx.log.warn('idle freeze failed', { sandbox: r.id, error: err.message }));
          continue;
        }
        this.ctx.counters.expired++;
        void this.lifecycle.end(s, 'stopped', `idle for more than ${r.idleTimeoutSeconds}s`);
      }
    }
  }
}
