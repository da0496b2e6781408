/**
 * Background processes of live sandboxes (protocol: @podflare/protocol processes.ts; agent side:
 * agent/podflare_processes.py), reached as `manager.processes`: the /processes routes and the PTY
 * socket call these methods and never the agent's channel. Each call counts as use of the sandbox for its idle timeout.
 *
 * They run beside the interpreter: none of these calls waits in the sandbox's exec queue.
 */
import type { ProcessInfo, ProcessOutputEvent, ProcessSignal, StartProcessBody, TerminalSize } from '@podflare/protocol';
import { setTimeout as sleep } from 'node:timers/promises';
import { SandboxError } from '@podflare/runtime';
import type { LiveSandbox } from './live-sandbox.js';

/** How long one agent read waits for new output while following (well under any HTTP idle timeout). */
const FOLLOW_WAIT_MS = 20_000;
const NO_PROGRESS_PAUSE_MS = 200;

const touch = (s: LiveSandbox) => {
  s.record.lastActiveAt = Date.now();
};

export class SandboxProcesses {
  async start(s: LiveSandbox, body: StartProcessBody): Promise<ProcessInfo> {
    touch(s);
    const { process } = await s.rt.channel.request({ op: 'proc_start', ...body });
    return process;
  }

  async list(s: LiveSandbox): Promise<ProcessInfo[]> {
    touch(s);
    return (await s.rt.channel.request({ op: 'proc_list' })).processes;
  }

  async info(s: LiveSandbox, pid: number): Promise<ProcessInfo> {
    const found = (await this.list(s)).find((p) => p.pid === pid);
    if (!found) throw new SandboxError('not_found', `no background process with pid ${pid} in sandbox ${s.record.id}`);
    return found;
  }

  async writeStdin(s: LiveSandbox, pid: number, data: string, eof: boolean): Promise<void> {
    touch(s);
    await s.rt.channel.request({ op: 'proc_write', pid, data, eof });
  }

  /** A terminal's new size (409 for a process without one). */
  async resize(s: LiveSandbox, pid: number, size: TerminalSize): Promise<void> {
    await s.rt.channel.request({ op: 'proc_resize', pid, cols: size.cols, rows: size.rows });
  }

  async signal(s: LiveSandbox, pid: number, signal: ProcessSignal): Promise<boolean> {
    touch(s);
    return (await s.rt.channel.request({ op: 'proc_signal', pid, signal })).delivered;
  }

  /**
   * The output from `offset` as events, ending with `exit` once the process has ended and all of it
   * was read; without `follow`, ends with what is there now. `emit` may return a promise (the client
   * is slow): the next read waits for it. `stopped()` says the client left.
   */
  async output(
    s: LiveSandbox, pid: number, offset: number, follow: boolean,
    emit: (event: ProcessOutputEvent) => Promise<void> | void, stopped: () => boolean,
  ): Promise<void> {
    let next = offset;
    while (!stopped()) {
      const reply = await s.rt.channel.request({ op: 'proc_read', pid, offset: next, wait_ms: follow ? FOLLOW_WAIT_MS : 0 });
      touch(s);
      if (reply.lost > 0) await emit({ type: 'lost', data: reply.lost, offset: next });
      for (const chunk of reply.chunks) await emit({ type: chunk.stream, data: chunk.data, offset: chunk.offset });
      const progressed = reply.next > next;
      next = Math.max(next, reply.next);
      if (reply.eof) {
        await emit({ type: 'exit', data: reply.process.exit_code ?? -1, offset: next });
        return;
      }
      if (!follow && !progressed) return;
      // An honest agent answers without progress only after the whole wait; one that answers at
      // once, again and again, must not make the server spin.
      if (!progressed) await sleep(NO_PROGRESS_PAUSE_MS);
    }
  }
}
