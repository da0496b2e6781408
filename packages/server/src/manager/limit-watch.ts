/** Tells whether a sandbox ran into one of its limits since the last look (cgroup counters moved). */
import type { ExecStreamMessage } from '@podflare/protocol';
import { limitError } from '../limits.js';
import type { LimitCounters, RuntimeSandbox } from '../runtime/runtime.js';
import type { ManagerContext } from './context.js';
import type { LiveSandbox } from './live-sandbox.js';

export class LimitWatch {
  /** Limit counters last seen per runtime sandbox: an exec that moved them ran into a limit. */
  private readonly baseline = new WeakMap<RuntimeSandbox, LimitCounters>();

  constructor(private readonly ctx: ManagerContext) {}

  /** The limit error for what happened since the last look, if the sandbox ran into a limit. */
  async hit(s: LiveSandbox, rt: RuntimeSandbox, id: number, original?: Extract<ExecStreamMessage, { type: 'error' }>) {
    if (!rt.limitCounters) return null;
    const before = this.baseline.get(rt) ?? { oomKills: 0, pidsRefused: 0 };
    const after = await rt.limitCounters();
    this.baseline.set(rt, after);
    const hit = limitError(id, before, after, s.record.limits ?? this.ctx.config.defaultLimits, original);
    if (hit) {
      this.ctx.counters.limitKills++;
      this.ctx.metrics.countLimitKill(hit.data.name);
    }
    return hit;
  }
}
