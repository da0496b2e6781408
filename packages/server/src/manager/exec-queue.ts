/**
 * Running code in a sandbox: one exec at a time per sandbox (its queue), limit kills reported as
 * such, the exit returned (never emitted) so it reaches the caller once, every exec timed and
 * recorded for the dashboard's history; and interrupting the one running.
 */
import { KILLED_EXIT_CODE, TIMEOUT_EXIT_CODE, type AgentRequestBody, type ExecStreamMessage } from '@podflare/protocol';
import type { ExecEventSink, ExecOutputMessage } from '../agent-channel.js';
import { SandboxError } from '@podflare/runtime';
import type { SandboxRecord } from '../store/store.js';
import type { ManagerContext } from './context.js';
import type { Checkpoints, ExecUndo } from './checkpoints.js';
import type { LimitWatch } from './limit-watch.js';
import type { LiveSandbox } from './live-sandbox.js';

export class ExecQueue {
  constructor(private readonly ctx: ManagerContext, private readonly limits: LimitWatch, private readonly checkpoints: Checkpoints) {}

  /**
   * Runs code; `onEvent` sees its output (a promise it returns holds the agent's channel until it
   * settles: backpressure); resolves with the exit. Queued behind other execs of the same sandbox.
   */
  async exec(s: LiveSandbox, body: AgentRequestBody<'exec'>, onEvent: ExecEventSink, opts: { atomic?: boolean } = {}) {
    const { live, metrics, history } = this.ctx;
    return s.queue.run(async () => {
      if (!live.has(s.record.id)) throw new SandboxError('sandbox_gone', `sandbox ${s.record.id} is gone`);
      s.running++;
      this.setState(s, 'running');
      const timed = metrics.execSeconds.time();
      const recorded = history.begin(s.record.id, s.record.owner, body.language, body.code);
      let exit: { code: number; execution_count?: number | null; state_lost?: boolean } = { code: KILLED_EXIT_CODE, state_lost: true };
      let undo: ExecUndo | null = null;
      try {
        // A history checkpoint, or an atomic exec's own (undone below if the exec fails).
        undo = await this.checkpoints.beforeExec(s, body, opts.atomic === true);
        const rt = s.rt;
        // Everything the caller sees is also recorded for the dashboard's history.
        const emit = (msg: ExecOutputMessage) => {
          recorded.message(msg);
          return onEvent(msg);
        };
        // The exit is not emitted: it is what this resolves with, for the caller to write last.
        if (!rt.limitCounters) return await this.checkpoints.afterExec(s, undo, (exit = await rt.channel.exec(body, emit)));
        // The error is held back until the exit: if a limit caused the error (or the exit), it is
        // reported as such.
        let held: Extract<ExecStreamMessage, { type: 'error' }> | undefined;
        const result = await rt.channel.exec(body, (m) => {
          if (m.type === 'error') held = m;
          else return emit(m);
        });
        // Read after every exec (two small cgroup files): a bash child killed for memory
        // leaves a zero exit code, and the kill must not be blamed on the next exec.
        const hit = await this.limits.hit(s, rt, result.id, held);
        if (hit) held = hit;
        if (held) void emit(held);
        exit = result;
        return await this.checkpoints.afterExec(s, undo, result);
      } finally {
        this.checkpoints.discard(undo);
        timed();
        recorded.end(exit);
        const outcome = exit.code === 0 ? 'ok' : exit.code === TIMEOUT_EXIT_CODE ? 'timeout' : 'error';
        metrics.execs.inc({ language: body.language, outcome });
        s.running--;
        s.record.lastActiveAt = Date.now();
        if (live.has(s.record.id)) this.setState(s, 'ready');
      }
    });
  }

  /** Interrupts the running exec; false when none runs. */
  async interrupt(s: LiveSandbox): Promise<boolean> {
    if (!s.running) return false;
    const answer = await s.rt.channel.request({ op: 'interrupt' });
    return answer.interrupted;
  }

  /** The interpreter's variables (queued like an exec: they are read between execs). */
  async vars(s: LiveSandbox) {
    return s.queue.run(async () => (await s.rt.channel.request({ op: 'vars' })).vars);
  }

  private setState(s: LiveSandbox, state: SandboxRecord['state']): void {
    s.record.state = state;
    this.ctx.changes.emit('change', s.record.id);
  }
}
